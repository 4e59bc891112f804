"""CPU kernels for the packed format on axis 0 (every layout but CLAQ's per-column codebooks).

Decode-time products y = W x (batch 1-8) multiply straight from the bit-plane codes with a small C kernel
(`segment_lut.c`: OpenMP over rows, codebook lookups by AVX2 permutes where the CPU has them), without
decoding the matrix: per-row codebooks of mixed widths (anybit, SKIM, SqueezeLLM), per-channel or
group-wise uniform grids (RTN, GPTQ), group bit maps (SliM-LLM). Longer inputs (prefill) decode the matrix
with the same kernel's decoder, then take one GEMM.

These products are exact (float activations, the stored fp16 codebooks); `cpu_fast` is the faster int8
path. Vector-coded matrices (`format.vector`) are served here too, by `cpu_vector`. The kernel is
compiled on first use (`build.py`); without a compiler the reference path serves, after one warning.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from pathlib import Path

import torch

from anybit.format.packing import unpack_codes
from anybit.format.qtensor import QuantizedTensor
from anybit.format.vector import CodedTensor, VectorTensor
from anybit.kernels import (
    MAX_BATCH,
    check_cpu_input,
    coded_input,
    cpu_unavailable,
    cpu_vector,
    outlier_corrections,
)
from anybit.kernels.build import CompiledKernel


def _declare(lib: ctypes.CDLL) -> None:
    common = [ctypes.c_void_p] * 5 + [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64]
    lib.anybit_segment_matvec.restype = lib.anybit_segment_dequantize.restype = None
    lib.anybit_segment_matvec.argtypes = [*common, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int]
    lib.anybit_segment_dequantize.argtypes = [*common, ctypes.c_void_p, ctypes.c_int]


KERNEL = CompiledKernel(Path(__file__).with_name("segment_lut.c"), _declare)


def unavailable(qt: CodedTensor) -> str:
    """Why the CPU kernels cannot serve this tensor ("" when it can)."""
    if isinstance(qt, VectorTensor):
        return cpu_vector.unavailable(qt)
    return cpu_unavailable(qt, KERNEL.library(), 8)


@dataclass
class CpuPrepared:
    """Per-segment addresses into a `QuantizedTensor`'s own code streams and codebooks (kept alive here);
    segments in row-major order, `group_size` columns each."""

    qt: QuantizedTensor
    code_addr: torch.Tensor  # int64 address of each segment's first code byte
    bits: torch.Tensor  # int32 width of each segment
    table_addr: torch.Tensor  # int64 address of each segment's fp16 codebook (codebook kind)
    scale: torch.Tensor  # float32 scale of each segment (uniform kind)
    zero: torch.Tensor  # int32 zero point of each segment (uniform kind)
    outliers: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None  # rows, cols, stored − decoded

    def arguments(self) -> tuple:
        """The leading arguments both kernels take."""
        rows, cols = self.qt.shape
        return (
            self.code_addr.data_ptr(), self.bits.data_ptr(), self.table_addr.data_ptr(), self.scale.data_ptr(),
            self.zero.data_ptr(), self.qt.kind == "uniform", rows, cols, self.qt.group_size,
        )  # fmt: skip


def prepare(qt: CodedTensor) -> CpuPrepared | cpu_vector.VectorPrepared:
    """The kernels' view of a tensor they serve (see `unavailable`)."""
    if isinstance(qt, VectorTensor):
        return cpu_vector.prepare(qt)
    reason = unavailable(qt)
    if reason:
        raise ValueError(reason)
    widths = qt.bitmap.reshape(-1).to(torch.int64)
    code_addr = torch.zeros(widths.numel(), dtype=torch.int64)
    table_addr = torch.zeros(widths.numel(), dtype=torch.int64)
    zero = torch.zeros(widths.numel(), dtype=torch.int32)
    uniform = qt.kind == "uniform"
    for b in qt.widths:  # a width's segments are stored in row-major order
        seg = (widths == b).nonzero()[:, 0]
        rank = torch.arange(seg.numel(), dtype=torch.int64)
        code_addr[seg] = qt.codes[b].data_ptr() + rank * (qt.group_size // 8) * b
        if uniform:
            zero[seg] = unpack_codes(qt.zeros[b], b, seg.numel()).to(torch.int32)
        else:
            book = qt.codebooks[b]
            table_addr[seg] = book.data_ptr() + rank * book.stride(0) * book.element_size()
    scale = qt.scales.reshape(-1).float().contiguous() if uniform else torch.zeros(1)
    return CpuPrepared(qt, code_addr, widths.to(torch.int32), table_addr, scale, zero, outlier_corrections(qt))


def _add_outliers(prepared: CpuPrepared, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    if prepared.outliers is not None:
        rows, cols, deltas = prepared.outliers
        y.index_add_(1, rows, (deltas[None, :] * x.float()[:, cols]).to(y.dtype))
    return y


def matvec(prepared: CpuPrepared, x: torch.Tensor) -> torch.Tensor:
    """y = W x for x of shape (batch ≤ 8, in_features); float32 result (batch, out_features)."""
    qt = prepared.qt
    rows, cols = qt.shape
    check_cpu_input(x, cols, MAX_BATCH)
    xs = coded_input(x, qt.perm, qt.col_scale).float().contiguous()
    y = torch.empty(x.shape[0], rows, dtype=torch.float32)
    KERNEL.library().anybit_segment_matvec(
        *prepared.arguments(), xs.data_ptr(), x.shape[0], y.data_ptr(), torch.get_num_threads()
    )
    return _add_outliers(prepared, y, x)


def matmul(prepared: CpuPrepared, x: torch.Tensor) -> torch.Tensor:
    """y = x Wᵀ for any number of rows of x (prefill): the coded matrix decoded once into a transient dense
    float32 matrix, then one GEMM in x's dtype."""
    qt = prepared.qt
    check_cpu_input(x, qt.shape[1])
    dense = torch.empty(qt.shape, dtype=torch.float32)
    KERNEL.library().anybit_segment_dequantize(*prepared.arguments(), dense.data_ptr(), torch.get_num_threads())
    y = coded_input(x, qt.perm, qt.col_scale).to(x.dtype) @ dense.to(x.dtype).t()
    return _add_outliers(prepared, y, x)


def product(prepared: CpuPrepared | cpu_vector.VectorPrepared, x: torch.Tensor) -> torch.Tensor:
    """y = x Wᵀ for any number of rows of x: straight from the codes up to MAX_BATCH rows, else `matmul`."""
    if isinstance(prepared, cpu_vector.VectorPrepared):
        return cpu_vector.product(prepared, x)
    return (matvec if x.shape[0] <= MAX_BATCH else matmul)(prepared, x)
