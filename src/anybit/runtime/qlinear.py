"""`QuantLinear`: a linear layer that holds only the packed quantized weight.

The packed tensors are registered buffers, so `.to(device)` and `state_dict()` see exactly what is
stored. Products run on kernels that read the packed codes: Triton on CUDA, C on the CPU
(`anybit.kernels.cpu`, every layout but per-column codebooks). Otherwise the reference path dequantizes
on every call, then multiplies; `dense_weights` caches the dequantized matrices for the duration of a
block (evaluation, of the layers no CPU kernel serves), which changes speed, not results.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from anybit.format.qtensor import QuantizedTensor
from anybit.kernels import MAX_BATCH, triton_available
from anybit.kernels import cpu as cpu_kernel


def kernel_unavailable(qtensor: QuantizedTensor) -> str:
    """Why the fused kernel cannot serve this tensor ("" when it can)."""
    if not triton_available():
        return "triton is not installed (pip install 'anybit[cuda]')"
    from anybit.kernels.lut_gemv import unsupported_reason

    return unsupported_reason(qtensor) or ""


class QuantLinear(nn.Module):
    """y = x Ŵᵀ + b with Ŵ decoded from a `QuantizedTensor`."""

    def __init__(self, qtensor: QuantizedTensor, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        self.out_features, self.in_features = qtensor.shape
        self.meta = qtensor.meta()
        self._buffer_names = []
        for name, tensor in qtensor.to_tensors().items():
            self.register_buffer(name, tensor)
            self._buffer_names.append(name)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        self._qtensor: QuantizedTensor | None = qtensor
        self._dense: torch.Tensor | None = None
        # "auto": Triton on CUDA, the C kernels on the CPU (axis-0 layouts); "triton": Triton everywhere;
        # "reference": neither
        self.kernel = "auto"
        self._kernel_unsupported: str | None = None  # None: not checked yet; "": supported
        self._cpu_unsupported: str | None = None  # the same for the CPU kernel
        self._prepared = None
        self._cpu_prepared = None

    @property
    def qtensor(self) -> QuantizedTensor:
        if self._qtensor is None:
            buffers = {n: getattr(self, n) for n in self._buffer_names}
            self._qtensor = QuantizedTensor.from_tensors(self.meta, buffers, check=False)  # checked when built
        return self._qtensor

    def _apply(self, fn, recurse=True):
        """Device moves apply; dtype casts do not: the stored dtypes are part of the format."""

        def move_only(t: torch.Tensor) -> torch.Tensor:
            moved = fn(t)
            return moved if moved.dtype == t.dtype else t.to(moved.device)

        self._qtensor = None  # buffers may have moved: rebuild the view on next use
        self._prepared = self._cpu_prepared = None
        if self._dense is not None:  # a dense cache (dense_weights) follows the module, casts included
            self._dense = fn(self._dense)
        return super()._apply(move_only, recurse)

    def dequantize(self) -> torch.Tensor:
        """The dense (out, in) float32 weight."""
        return self.qtensor.dequantize(torch.float32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        if self._dense is None:
            y = self._kernel_product(x.reshape(-1, self.in_features))
            if y is None:
                return F.linear(x, self.dequantize().to(x.dtype), bias)
            y = y.to(x.dtype)
            if bias is not None:
                y = y + bias
            return y.reshape(*x.shape[:-1], self.out_features)
        if self._dense.dtype != x.dtype:  # cast the cached weight once, not on every call
            self._dense = self._dense.to(x.dtype)
        return F.linear(x, self._dense, bias)

    def _kernel_product(self, flat: torch.Tensor) -> torch.Tensor | None:
        """flat Ŵᵀ on a kernel that reads the packed codes (Triton, or C on the CPU), None where none serves.
        Up to MAX_BATCH rows multiply straight from the codes; longer inputs (prefill) decode a transient
        dense matrix with the kernel, then take one GEMM."""
        decode = flat.shape[0] <= MAX_BATCH
        if self._use_kernel(flat):
            from anybit.kernels.lut_gemv import lut_matmul, lut_matvec, prepare

            if self._prepared is None:
                self._prepared = prepare(self.qtensor)
            return (lut_matvec if decode else lut_matmul)(self._prepared, flat)
        if flat.device.type == "cpu" and self.cpu_kernel_serves():
            if self._cpu_prepared is None:
                self._cpu_prepared = cpu_kernel.prepare(self.qtensor)
            return (cpu_kernel.matvec if decode else cpu_kernel.matmul)(self._cpu_prepared, flat)
        return None

    def _use_kernel(self, x: torch.Tensor) -> bool:
        """The kernels serve products on CUDA (or everywhere with kernel='triton')."""
        if self.kernel == "reference":
            return False
        if self.kernel == "auto" and not x.is_cuda:
            return False
        if self._kernel_unsupported is None:
            self._kernel_unsupported = kernel_unavailable(self.qtensor)
            if self._kernel_unsupported:
                warnings.warn(
                    f"anybit: no fused kernel ({self._kernel_unsupported}); using the reference path", stacklevel=4
                )
        return not self._kernel_unsupported

    def cpu_kernel_serves(self) -> bool:
        """Whether the C kernels serve this layer's products (its codes in CPU memory, a layout they have)."""
        if self.kernel != "auto" or self.qtensor.bitmap.device.type != "cpu":
            return False
        if self._cpu_unsupported is None:
            self._cpu_unsupported = cpu_kernel.unavailable(self.qtensor)
        return not self._cpu_unsupported

    def extra_repr(self) -> str:
        qt = self.qtensor
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, kind={qt.kind}, "
            f"group_size={qt.group_size}, bits/weight={qt.bits_per_weight():.3f}"
        )


def quant_linears(model: nn.Module) -> Iterator[tuple[str, QuantLinear]]:
    """All `QuantLinear` modules of a model, with their names."""
    for name, module in model.named_modules():
        if isinstance(module, QuantLinear):
            yield name, module


DENSE_CACHE_BYTES = 1 << 30  # at most this much float32 is cached: a large model is never dense in memory


@contextmanager
def dense_weights(
    model: nn.Module, skip_kernel_layers: bool = False, max_bytes: int = DENSE_CACHE_BYTES
) -> Iterator[None]:
    """Within the block, QuantLinears multiply by a cached dequantized weight, up to `max_bytes` of them in all
    (the rest decode on every call); with `skip_kernel_layers`, none of those the CPU kernels serve, which
    decode one matrix per product at about the same speed for long inputs and keep memory near the packed
    size."""
    layers = [m for _, m in quant_linears(model) if not (skip_kernel_layers and m.cpu_kernel_serves())]
    cached = []
    try:
        budget = max_bytes
        for layer in layers:
            size = layer.out_features * layer.in_features * 4
            if size > budget:
                break
            layer._dense = layer.dequantize()
            cached.append(layer)
            budget -= size
        yield
    finally:
        for layer in cached:
            layer._dense = None
