"""Fitted residuals (not in the paper): calibration statistics per linear and the correction that best
predicts each layer's whole error from the channels a given k_chunk selects."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from anybit.runtime.dec.plan import per_layer
from anybit.runtime.dec.residual import Residual, quantize_residual
from anybit.runtime.dec.select import select_channels

FIT_RIDGE = 0.1  # fit_correction's pull towards the plain residual, relative to each channel's Σx²


class CalibrationStats:
    """Per linear, summed over calibration tokens x_t by forward pre-hooks: |x_t| and the token count
    (the static baseline's mean |x|) and, with `k_chunk`, the inputs of `fit_correction`: A = Σ x_t z_tᵀ,
    G = Σ z_t z_tᵀ and D = Σ x_t², where z_t is x_t with only the channels top-k per chunk keeps.
    `k_chunks` gives each linear's k_chunk (one int for all). Linears fed the same tensor with the same
    k_chunk (q/k/v, gate/up) share one computation."""

    def __init__(self, modules: dict[str, nn.Module], k_chunks: int | Mapping[str, int] | None = None) -> None:
        self.k_chunks = per_layer(k_chunks, modules) if k_chunks is not None else None
        self.sums: dict[str, dict[str, torch.Tensor]] = {}
        self._last: tuple[torch.Tensor, int | None, dict[str, torch.Tensor]] | None = None
        self._handles = [m.register_forward_pre_hook(self._hook(name)) for name, m in modules.items()]

    def _increments(self, x: torch.Tensor, k_chunk: int | None) -> dict[str, torch.Tensor]:
        if self._last is not None and self._last[0] is x and self._last[1] == k_chunk:
            return self._last[2]
        flat = x.detach().reshape(-1, x.shape[-1]).float()
        inc = {"abs": flat.abs().sum(dim=0), "count": torch.tensor(float(flat.shape[0]))}
        if k_chunk is not None:
            idx = select_channels(flat, k_chunk)
            z = torch.zeros_like(flat).scatter_(1, idx, flat.gather(1, idx))
            inc |= {"A": flat.t() @ z, "G": z.t() @ z, "D": flat.square().sum(dim=0)}
        self._last = (x, k_chunk, inc)
        return inc

    def _hook(self, name: str):
        k_chunk = None if self.k_chunks is None else self.k_chunks[name]

        def hook(_module: nn.Module, args: tuple) -> None:
            store = self.sums.setdefault(name, {})
            for key, value in self._increments(args[0], k_chunk).items():
                value = value.double().cpu()
                store[key] = store[key] + value if key in store else value

        return hook

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._last = None

    def mean_abs(self) -> dict[str, torch.Tensor]:
        """Mean |x| per input channel of every linear that saw calibration data."""
        return {name: (s["abs"] / s["count"]).float() for name, s in self.sums.items()}

    def fit(self, name: str, R: torch.Tensor, ridge: float) -> Residual:
        """The fitted correction of one linear (`fit_correction`) from its residual R = W − Ŵ, in 4 bits."""
        return quantize_residual(fit_correction(R, *(self.sums[name][key] for key in "AGD"), ridge))


def fit_correction(R: torch.Tensor, A: torch.Tensor, G: torch.Tensor, D: torch.Tensor, ridge: float) -> torch.Tensor:
    """The compensation matrix C (out, in) minimising Σ_t ‖R x_t − C z_t‖² + ridge · Σ_j D_j ‖C_j − R_j‖²
    over calibration tokens (statistics of `CalibrationStats`): the correction that, added for the
    selected channels only, best predicts the layer's whole error R x_t, including the part the
    unselected channels' residuals cancel. A channel never selected keeps C_j = R_j."""
    reg = ridge * D.double() + 1e-12 * D.double().mean().clamp(min=1e-30)
    rhs = R.double() @ (A.double() + torch.diag(reg))
    lhs = G.double() + torch.diag(reg)
    return torch.linalg.solve(lhs, rhs.t()).t().float()  # C · lhs = rhs, lhs symmetric
