"""Compensation at run time: per token, the selected channels' residual rows times x added to a linear's
output (`Compensator`), as forward hooks over a model (`compensation`), on a second CUDA stream where it
can overlap the base product. The native CPU decoder applies the same in C (`layer.compensator`)."""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from anybit.kernels import triton_available
from anybit.runtime.dec.plan import per_layer
from anybit.runtime.dec.residual import Residual
from anybit.runtime.dec.select import select_channels, static_channels

DEC_SCORES = ("activation", "contribution")  # how dynamic error compensation ranks input channels


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
    k_chunks = per_layer(k_chunks, layers)
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
