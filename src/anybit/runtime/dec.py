"""Dynamic error compensation (QDEC / DecDEC, Park et al., 2024): the quantization residual
R = W − Q(W) of every linear, itself stored in 4 bits in host memory, and per token the residual rows
of the input channels with the largest |x| added back to the quantized product.

Residual format (per linear, PyTorch layout W: (out, in)): `codes` uint8 (in, ceil(out / 2)), two
4-bit codes per byte (even output channel in the low nibble), so the residual row of one input
channel is contiguous; `scales` fp16 (out,), one per output channel. A code c stands for
(c − 8) · scale, c in 1..15: symmetric, 15 levels, no zero point, as in the paper.

Selection: the input vector is cut into chunks of `CHUNK` channels; a chunk of length L keeps its
floor(k_chunk · L / CHUNK) channels of largest score (exact top-k). The paper's score is |x_j|
("activation"); "contribution" scores |x_j| · ‖R̂[:, j]‖, the size of the correction channel j would
add, which costs one precomputed norm per input channel. The static baseline keeps, in each chunk,
the same number of channels with the largest mean score over calibration data. k_chunk may differ by
layer type (`DecPlan`: qkv, o, gate/up, down, as the paper's tuner sets it); a token's compensation
reads the selected rows only, `Residual.fetch_bytes` of them.

Fitted residuals (`fit_correction`, not in the paper) store, in the same format, the correction
that best predicts each layer's whole error from the channels a given k_chunk selects.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from anybit.config import DEC_SCORES
from anybit.kernels import triton_available
from anybit.model.adapters import Adapter

CHUNK = 1024  # channels per selection chunk (the paper's CHUNK_SIZE)
RESIDUAL_BITS = 4
LEVELS = 7  # codes -7..7 around 0
FIT_RIDGE = 0.1  # fit_correction's pull towards the plain residual, relative to each channel's Σx²
SCALE_CANDIDATES = 32  # scale grid: max|r|/7 · t/32 for t = 1..32, the lowest squared error wins


@dataclass
class Residual:
    """A 4-bit residual matrix stored row-per-input-channel (format in the module doc)."""

    codes: torch.Tensor  # uint8 (in, ceil(out / 2))
    scales: torch.Tensor  # fp16 (out,)

    def __post_init__(self) -> None:
        if self.scales.dim() != 1:
            raise ValueError(f"residual scales must be one per output channel, got shape {tuple(self.scales.shape)}")
        if self.scales.dtype != torch.float16 or not bool(torch.isfinite(self.scales).all()):
            raise ValueError(f"residual scales must be finite float16, got {self.scales.dtype}")
        out = self.scales.numel()
        if self.codes.dtype != torch.uint8 or self.codes.dim() != 2 or self.codes.shape[1] != (out + 1) // 2:
            raise ValueError(f"residual codes {tuple(self.codes.shape)} do not fit {out} output channels")

    @property
    def in_features(self) -> int:
        return self.codes.shape[0]

    @property
    def out_features(self) -> int:
        return self.scales.numel()

    def storage_bits(self) -> int:
        return (self.codes.numel() * self.codes.element_size() + self.scales.numel() * 2) * 8

    def fetch_bytes(self, k_chunk: int) -> int:
        """Bytes of residual codes one token's compensation reads at this k_chunk (the PCIe traffic)."""
        kept = sum(k for _, _, k in chunk_budgets(self.in_features, k_chunk))
        return kept * self.codes.shape[1] * self.codes.element_size()

    def rows(self, channels: torch.Tensor) -> torch.Tensor:
        """Dequantized residual rows (len(channels), out) of the given input channels, float32."""
        packed = self.codes.index_select(0, channels.to(self.codes.device)).to(torch.int16)
        nibbles = torch.stack([packed & 0xF, packed >> 4], dim=-1).flatten(-2)[:, : self.out_features]
        return (nibbles - 8).float() * self.scales.float()

    def dense(self) -> torch.Tensor:
        """The whole dequantized residual as (out, in) float32, the layout of W."""
        return self.rows(torch.arange(self.in_features)).t()

    def row_norms(self) -> torch.Tensor:
        """‖R̂[:, j]‖ of every input channel j, float32 (in,)."""
        return torch.linalg.vector_norm(self.dense(), dim=0)


def quantize_residual(R: torch.Tensor) -> Residual:
    """4-bit residual of an (out, in) matrix; each output channel's scale minimises its squared error."""
    R = R.float()
    peak = R.abs().amax(dim=1).clamp(min=1e-12) / LEVELS
    best_err = torch.full_like(peak, float("inf"))
    best_scale = peak.clone()
    for t in range(1, SCALE_CANDIDATES + 1):
        scale = (peak * (t / SCALE_CANDIDATES)).half().float()
        q = torch.clamp(torch.round(R / scale[:, None]), -LEVELS, LEVELS)
        err = (R - q * scale[:, None]).square().sum(dim=1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_scale = torch.where(better, scale, best_scale)
    codes = (torch.clamp(torch.round(R / best_scale[:, None]), -LEVELS, LEVELS) + 8).to(torch.uint8).t()
    if codes.shape[1] % 2:
        codes = torch.cat([codes, torch.full_like(codes[:, :1], 8)], dim=1)
    packed = codes[:, 0::2] | (codes[:, 1::2] << 4)
    return Residual(packed.contiguous(), best_scale.half())


DEC_ROLES = ("qkv", "o", "gu", "down")  # the paper's layer types: the adapters' linear groups, in order


@dataclass(frozen=True)
class DecPlan:
    """k_chunk per layer type (`DEC_ROLES`); 0 leaves that type uncompensated.

    Written "8" (every type), "qkv=4,down=16" (types not named get 0) or "8,down=16" (a default for
    the types not named)."""

    ks: tuple[int, ...]

    def __post_init__(self) -> None:
        if len(self.ks) != len(DEC_ROLES) or min(self.ks) < 0 or max(self.ks) < 1:
            raise ValueError(f"a DEC plan needs k_chunk >= 0 for each of {', '.join(DEC_ROLES)}, one of them > 0")

    @classmethod
    def parse(cls, text: str | int) -> DecPlan:
        default, named = 0, {}
        for item in str(text).replace(" ", "").split(","):
            role, _, value = item.rpartition("=")
            if role and role not in DEC_ROLES:
                raise ValueError(f"unknown layer type {role!r} in DEC plan {text!r}; known: {', '.join(DEC_ROLES)}")
            try:
                k = int(value)
            except ValueError:
                raise ValueError(f"DEC plan {text!r}: {value!r} is not an integer k_chunk") from None
            if role:
                named[role] = k
            else:
                default = k
        try:
            return cls(tuple(named.get(role, default) for role in DEC_ROLES))
        except ValueError as exc:
            raise ValueError(f"DEC plan {text!r}: {exc}") from None

    @property
    def uniform(self) -> int | None:
        """The k_chunk shared by every layer type, or None."""
        return self.ks[0] if len(set(self.ks)) == 1 else None

    def __str__(self) -> str:
        if self.uniform is not None:
            return str(self.uniform)
        return ",".join(f"{role}={k}" for role, k in zip(DEC_ROLES, self.ks, strict=True))

    def to_json(self) -> int | str:
        return self.uniform if self.uniform is not None else str(self)

    def for_layers(self, names: Iterable[str], adapter: Adapter) -> dict[str, int]:
        """k_chunk of each named linear (dotted module names ending in one of the adapter's linears)."""
        return {name: self.ks[layer_type(name, adapter)] for name in names}

    def fetch_bytes(self, residuals: Mapping[str, Residual], adapter: Adapter) -> int:
        """Residual bytes one token's compensation reads from host memory under this plan."""
        return sum(residuals[name].fetch_bytes(k) for name, k in self.for_layers(residuals, adapter).items())


def layer_type(name: str, adapter: Adapter) -> int:
    """The position in `DEC_ROLES` of a linear's type: its group in the adapter."""
    types = [i for i, group in enumerate(adapter.groups) for linear in group if name.endswith("." + linear)]
    if len(types) != 1 or len(adapter.groups) != len(DEC_ROLES):
        raise ValueError(f"cannot tell the DEC layer type of {name}")
    return types[0]


def chunk_budgets(in_features: int, k_chunk: int) -> list[tuple[int, int, int]]:
    """(start, length, kept channels) of each selection chunk; a partial chunk keeps proportionally fewer."""
    out = []
    for start in range(0, in_features, CHUNK):
        length = min(CHUNK, in_features - start)
        out.append((start, length, min(length, k_chunk * length // CHUNK)))
    return out


def select_channels(x: torch.Tensor, k_chunk: int, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Per row of x (tokens, in): the indices of the channels kept by exact top-k per chunk of the
    score |x|, times `weight` (in,) per channel when given."""
    score = x.abs() if weight is None else x.abs() * weight
    budgets = chunk_budgets(x.shape[-1], k_chunk)
    full = [b for b in budgets if b[1] == CHUNK]
    picks = []
    if full and full[0][2]:  # all full chunks in one top-k (one launch on a GPU, not one per chunk)
        chunks = score[:, : len(full) * CHUNK].reshape(x.shape[0], len(full), CHUNK)
        offsets = torch.arange(len(full), device=x.device)[:, None] * CHUNK
        picks.append((chunks.topk(full[0][2], dim=-1).indices + offsets).flatten(1))
    for start, length, k in budgets[len(full) :]:
        if k:
            picks.append(score[:, start : start + length].topk(k, dim=-1).indices + start)
    if not picks:
        return torch.empty(x.shape[0], 0, dtype=torch.long, device=x.device)
    return torch.cat(picks, dim=-1)


def static_channels(mean_abs: torch.Tensor, k_chunk: int, weight: torch.Tensor | None = None) -> torch.Tensor:
    """The fixed channels of the static baseline: per chunk, the largest mean |x| (times `weight`) on
    calibration data."""
    return select_channels(mean_abs[None, :], k_chunk, weight)[0]


class Compensator:
    """Adds R̂[:, S] x[S] to a linear's output, with S chosen per token (or fixed, for the baseline).

    Only the residual rows of the channels some token selected are decoded (`Residual.rows`), which
    is the fetch from host memory of the GPU design; here every tier is the CPU's memory.
    """

    def __init__(
        self,
        residual: Residual,
        k_chunk: int,
        fixed: torch.Tensor | None = None,
        kernel: str = "auto",
        weight: torch.Tensor | None = None,
    ) -> None:
        self.residual = residual
        self.k_chunk = k_chunk
        self.fixed = fixed
        self.kernel = kernel  # "auto": Triton on CUDA; "triton": always (interpreter on CPU); "reference"
        self.weight = weight  # per-channel factor of the selection score (None: |x| alone)
        self._scales: torch.Tensor | None = None  # the scales on the activations' device, kept between calls

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        if self.fixed is not None:
            idx = self.fixed.to(flat.device).expand(flat.shape[0], -1)
        else:
            if self.weight is not None and self.weight.device != flat.device:
                self.weight = self.weight.to(flat.device)
            idx = select_channels(flat, self.k_chunk, self.weight)
        if idx.shape[1] == 0:
            return x.new_zeros(*x.shape[:-1], self.residual.out_features)
        if self._use_kernel(flat):
            from anybit.kernels.dec import dec_accumulate

            out = torch.zeros(flat.shape[0], self.residual.out_features, dtype=torch.float32, device=flat.device)
            if self._scales is None or self._scales.device != flat.device:
                self._scales = self.residual.scales.to(flat.device)
            scales = self._scales
            try:
                dec_accumulate(out, flat, idx, self._codes_for_kernel(flat.device), scales)
            except (RuntimeError, ValueError) as exc:  # a Triton build that refuses host pointers
                if self.residual.codes.device == flat.device:
                    raise
                warnings.warn(f"anybit: residuals copied to {flat.device} ({exc})", stacklevel=2)
                self.residual.codes = self.residual.codes.to(flat.device)
                dec_accumulate(out, flat, idx, self.residual.codes, scales)
            return out.to(x.dtype).reshape(*x.shape[:-1], -1)
        channels, local = torch.unique(idx, return_inverse=True)
        rows = self.residual.rows(channels).to(flat.device)
        values = flat.gather(1, idx).float()
        out = F.embedding_bag(local, rows, per_sample_weights=values, mode="sum")
        return out.to(x.dtype).reshape(*x.shape[:-1], -1)

    def _use_kernel(self, flat: torch.Tensor) -> bool:
        if self.kernel == "reference" or (self.kernel == "auto" and not flat.is_cuda):
            return False
        return triton_available()

    def _codes_for_kernel(self, device: torch.device) -> torch.Tensor:
        """The packed residual as the kernel reads it: pinned host memory for CUDA (no GPU copy)."""
        codes = self.residual.codes
        if device.type == "cuda" and codes.device.type == "cpu" and not codes.is_pinned():
            codes = self.residual.codes = codes.pin_memory()
        return codes


_SIDE_STREAMS: dict[torch.device, torch.cuda.Stream] = {}


def _side_stream(device: torch.device) -> torch.cuda.Stream:
    if device not in _SIDE_STREAMS:
        _SIDE_STREAMS[device] = torch.cuda.Stream(device)
    return _SIDE_STREAMS[device]


def launch_compensation(comp: Compensator, x: torch.Tensor) -> torch.Tensor:
    """comp(x); on CUDA queued on a second stream, after the work already queued, so that it overlaps the
    work queued next on the current stream (the base product). Pass the result to `join_compensation`
    before using it."""
    if not x.is_cuda:
        return comp(x)
    side = _side_stream(x.device)
    side.wait_stream(torch.cuda.current_stream(x.device))
    with torch.cuda.stream(side):
        return comp(x)


def join_compensation(y: torch.Tensor) -> torch.Tensor:
    """The result of `launch_compensation`, safe to use on the current stream."""
    if y.is_cuda:
        # No record_stream for y (allocated on the side stream): its memory can only be reused by a later
        # side-stream allocation, and every one comes after a launch that waits for this stream's work.
        torch.cuda.current_stream(y.device).wait_stream(_side_stream(y.device))
    return y


class _LayerHooks:
    """One compensated layer: the pre-hook (when registered) launches the compensation of the layer's
    input before the base product is queued; the forward hook adds it, computing it first if not launched."""

    def __init__(self, comp: Compensator) -> None:
        self.comp = comp
        self.pending: torch.Tensor | None = None

    def pre(self, _module: nn.Module, args: tuple) -> None:
        self.pending = launch_compensation(self.comp, args[0])

    def post(self, _module: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
        pending, self.pending = self.pending, None
        return out + (self.comp(args[0]) if pending is None else join_compensation(pending))


class CalibrationStats:
    """Per linear, summed over calibration tokens x_t by forward pre-hooks: |x_t| and the token count
    (the static baseline's mean |x|) and, with `k_chunk`, the inputs of `fit_correction`: A = Σ x_t z_tᵀ,
    G = Σ z_t z_tᵀ and D = Σ x_t², where z_t is x_t with only the channels top-k per chunk keeps.
    `k_chunks` gives each linear's k_chunk (one int for all). Linears fed the same tensor with the same
    k_chunk (q/k/v, gate/up) share one computation."""

    def __init__(self, modules: dict[str, nn.Module], k_chunks: int | Mapping[str, int] | None = None) -> None:
        self.k_chunks = _per_layer(k_chunks, modules) if k_chunks is not None else None
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


def _per_layer(k_chunks: int | Mapping[str, int], layers: Mapping[str, object]) -> dict[str, int]:
    if isinstance(k_chunks, int):
        return dict.fromkeys(layers, k_chunks)
    if set(k_chunks) != set(layers):
        raise ValueError("k_chunks must name exactly the compensated layers")
    return dict(k_chunks)


@contextmanager
def compensation(
    layers: dict[str, nn.Module],
    residuals: dict[str, Residual],
    k_chunks: int | Mapping[str, int],
    static_means: dict[str, torch.Tensor] | None = None,
    score: str = "activation",
    overlap: bool = True,
) -> Iterator[None]:
    """Within the block, each named layer's output gets its residual compensation added, its channels
    chosen by `score` (one of DEC_SCORES), k_chunk per layer from `k_chunks` (one int for all; a
    layer at 0 is left alone). With `overlap`, a CUDA layer's compensation runs on a second stream,
    concurrently with its base product (`launch_compensation`); the result is the same.

    With `static_means` the channels are fixed per layer (the static baseline) instead of per token.
    """
    if score not in DEC_SCORES:
        raise ValueError(f"DEC score must be one of {', '.join(DEC_SCORES)}, got {score!r}")
    k_chunks = _per_layer(k_chunks, layers)
    handles, compensated = [], []
    try:
        for name, module in layers.items():
            k_chunk = k_chunks[name]
            if k_chunk == 0:
                continue
            weight = residuals[name].row_norms() if score == "contribution" else None
            fixed = None if static_means is None else static_channels(static_means[name], k_chunk, weight)
            hooks = _LayerHooks(Compensator(residuals[name], k_chunk, fixed, weight=weight))
            if overlap:  # without the pre-hook, the forward hook computes the compensation itself
                handles.append(module.register_forward_pre_hook(hooks.pre))
            handles.append(module.register_forward_hook(hooks.post))
            module.compensator = hooks.comp  # what a native decoder applies itself (the hooks run in Python)
            compensated.append(module)
        yield
    finally:
        for handle in handles:
            handle.remove()
        for module in compensated:
            del module.compensator
