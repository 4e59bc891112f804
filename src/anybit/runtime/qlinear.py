"""`QuantLinear`: a linear layer that holds only the packed quantized weight.

The packed tensors are registered buffers, so `.to(device)` and `state_dict()` see exactly what is
stored. Products run on one of these backends, chosen per layer in `QuantLinear.backend`:

- "triton": the fused kernels on CUDA (`anybit.kernels.lut_gemv`);
- "fast": the CPU's integer kernel (`anybit.kernels.cpu_fast`: int8 activations and codebook tables,
  codes re-laid at load time), the default on the CPU where it serves the layout;
- "exact": the CPU's C kernel on the stored codes and float activations (`anybit.kernels.cpu`), exactly
  the reference's numbers; what evaluation uses by default;
- "reference": dequantize on every call, then multiply.

`QuantLinear.kernel` asks for one ("auto": Triton on CUDA, else fast, else exact, else reference);
`set_kernel` sets it for a whole model. `dense_weights` caches the dequantized matrices for the duration
of a block (evaluation, of the layers no CPU kernel serves), which changes speed, not results.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from anybit.format.vector import CodedTensor, coded_tensor_from_stored
from anybit.kernels import MAX_BATCH, cpu_fast, triton_available
from anybit.kernels import cpu as cpu_exact
from anybit.memory import release_file_pages, return_freed_memory

KERNELS = ("auto", "fast", "exact", "triton", "reference")  # backends of the quantized linears

CPU_BACKENDS = {"fast": cpu_fast, "exact": cpu_exact}  # each: unavailable(qt), prepare(qt), product(p, x)
CPU_PREFERENCE = {"auto": ("fast", "exact"), "fast": ("fast", "exact"), "exact": ("exact",)}


def kernel_unavailable(qtensor: CodedTensor) -> str:
    """Why the fused kernel cannot serve this tensor ("" when it can)."""
    if not triton_available():
        return "triton is not installed (pip install 'anybit[cuda]')"
    from anybit.kernels.lut_gemv import unsupported_reason

    return unsupported_reason(qtensor) or ""


class PackedModule(nn.Module):
    """A module holding one coded matrix (`QuantizedTensor` or `VectorTensor`) as registered buffers:
    `.to(device)` and `state_dict()` see exactly what is stored; device moves apply, dtype casts do not (the
    stored dtypes are the format)."""

    def __init__(self, qtensor: CodedTensor) -> None:
        super().__init__()
        self.meta = qtensor.meta()
        self._buffer_names = []
        for name, tensor in qtensor.to_tensors().items():
            self.register_buffer(name, tensor)
            self._buffer_names.append(name)
        self._qtensor: CodedTensor | None = qtensor

    @property
    def qtensor(self) -> CodedTensor:
        if self._qtensor is None:
            buffers = {n: getattr(self, n) for n in self._buffer_names}
            self._qtensor = coded_tensor_from_stored(self.meta, buffers, check=False)  # checked when built
        return self._qtensor

    def _apply(self, fn, recurse=True):
        def move_only(t: torch.Tensor) -> torch.Tensor:
            moved = fn(t)
            return moved if moved.dtype == t.dtype else t.to(moved.device)

        self._qtensor = None  # buffers may have moved: rebuild the view on next use
        return super()._apply(move_only, recurse)


class QuantLinear(PackedModule):
    """y = x Ŵᵀ + b with Ŵ decoded from a coded matrix."""

    stored = True  # part of the quantized model as written (False: made at run time, `runtime.head`)

    def __init__(self, qtensor: CodedTensor, bias: torch.Tensor | None = None) -> None:
        super().__init__(qtensor)
        self.out_features, self.in_features = qtensor.shape
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        self._dense: torch.Tensor | None = None
        self.kernel = "auto"  # one of KERNELS: the backend asked for
        self.tables = "int8"  # the fast kernel's codebook tables (`cpu_fast.TABLES`)
        self._chosen: dict[tuple[str, str], str] = {}  # (kernel asked, device type) -> backend
        self._prepared: dict[str, object] = {}  # backend -> its prepared view of the codes

    def _apply(self, fn, recurse=True):
        """Kernel choices and prepared views follow the buffers; a dense cache (dense_weights) follows the
        module, casts included."""
        self._chosen.clear()
        self._prepared.clear()
        if self._dense is not None:
            self._dense = fn(self._dense)
        return super()._apply(fn, recurse)

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
        """flat Ŵᵀ on the chosen backend's kernel, None for the reference path."""
        backend = self.backend(flat.device)
        if backend == "reference":
            return None
        flat = self.qtensor.rotated_input(flat)  # the kernels multiply the coded part, W Rᵀ, by R x
        prepared = self.prepared(backend)
        if backend == "triton":
            from anybit.kernels.lut_gemv import lut_matmul, lut_matvec

            return (lut_matvec if flat.shape[0] <= MAX_BATCH else lut_matmul)(prepared, flat)
        return CPU_BACKENDS[backend].product(prepared, flat)

    def prepared(self, backend: str):
        """The backend's prepared view of this layer's codes (made on first use, kept). Where it holds a
        re-laid copy, the stored codes are not read again: pages they hold of a memory-mapped checkpoint are
        handed back, and so is the heap the re-laying's temporaries left (glibc keeps it otherwise: 51 MB of
        SmolLM2's 74 MB of re-laid copies on the AVX2 path)."""
        if backend not in self._prepared:
            options = {"tables": self.tables} if backend == "fast" else {}
            self._prepared[backend] = self._backend_module(backend).prepare(self.qtensor, **options)
            if getattr(self._prepared[backend], "owns_codes", False):
                release_file_pages(self.qtensor.code_streams())
                return_freed_memory()
        return self._prepared[backend]

    @staticmethod
    def _backend_module(backend: str):
        if backend == "triton":
            from anybit.kernels import lut_gemv

            return lut_gemv
        return CPU_BACKENDS[backend]

    def backend(self, device: torch.device | str) -> str:
        """The backend that serves this layer's products with inputs on `device` (see the module doc)."""
        device_type = torch.device(device).type
        key = (self.kernel, device_type)
        if key not in self._chosen:
            self._chosen[key] = self._choose_backend(device_type)
        return self._chosen[key]

    def _choose_backend(self, device_type: str) -> str:
        if self.kernel not in KERNELS:
            raise ValueError(f"kernel must be one of {', '.join(KERNELS)}, got {self.kernel!r}")
        if self.kernel == "reference":
            return "reference"
        if device_type == "cuda" or self.kernel == "triton":
            reason = kernel_unavailable(self.qtensor)
            if reason:
                warnings.warn(f"anybit: no fused kernel ({reason}); using the reference path", stacklevel=5)
                return "reference"
            return "triton"
        if device_type != "cpu" or self.qtensor.code_streams()[0].device.type != "cpu":
            return "reference"
        for backend in CPU_PREFERENCE[self.kernel]:
            if not CPU_BACKENDS[backend].unavailable(self.qtensor):
                return backend
        return "reference"

    def use_tables(self, tables: str) -> None:
        """The fast kernel's codebook tables from now on (one of `cpu_fast.TABLES`)."""
        if tables != self.tables:
            self.tables = tables
            self._prepared.pop("fast", None)

    def cpu_kernel_serves(self) -> bool:
        """Whether a C kernel serves this layer's products on the CPU."""
        return self.backend("cpu") in CPU_BACKENDS

    def extra_repr(self) -> str:
        qt = self.qtensor
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, kind={qt.kind}, "
            f"group_size={qt.group_size}, bits/weight={qt.bits_per_weight():.3f}"
        )


def set_kernel(model: nn.Module, kernel: str, tables: str | None = None) -> None:
    """Ask every QuantLinear of `model` for one backend (one of KERNELS) and, where given, the fast kernel's
    codebook tables (one of `cpu_fast.TABLES`)."""
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {', '.join(KERNELS)}, got {kernel!r}")
    if tables is not None:
        cpu_fast.check_tables(tables)
    for _, layer in quant_linears(model, runtime=True):
        layer.kernel = kernel
        if tables is not None:
            layer.use_tables(tables)


def quant_linears(model: nn.Module, runtime: bool = False) -> Iterator[tuple[str, QuantLinear]]:
    """The stored `QuantLinear` modules of a model, with their names; with `runtime`, also those made at run
    time (the 8-bit head)."""
    for name, module in model.named_modules():
        if isinstance(module, QuantLinear) and (module.stored or runtime):
            yield name, module


DENSE_CACHE_BYTES = 1 << 30  # at most this much float32 is cached: a large model is never dense in memory


@contextmanager
def dense_weights(
    model: nn.Module, skip_kernel_layers: bool = False, max_bytes: int = DENSE_CACHE_BYTES
) -> Iterator[None]:
    """Within the block, QuantLinears multiply by a cached dequantized weight, up to `max_bytes` of them in all
    (the rest decode on every call); with `skip_kernel_layers`, none of those the CPU kernels serve, which
    decode one matrix per product at about the same speed for long inputs and keep memory near the packed
    size, except rotated ones: their kernels rotate every input, their cached weight has the rotation in it."""
    layers = [
        m
        for _, m in quant_linears(model)
        if not (skip_kernel_layers and m.cpu_kernel_serves() and m.qtensor.rotation is None)
    ]
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
