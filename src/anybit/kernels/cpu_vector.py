"""CPU kernel for vector-coded matrices (`format.vector`), part of the exact backend (`kernels.cpu`).

Decode-time products y = W x (batch 1-8) run in C (`vector_lut.c`: OpenMP over rows, each piece's table
entry loaded and multiplied with four inputs), from the indices re-laid once as 16-bit integers (their
packed stream is not read again) and the table in float32. Longer inputs decode the matrix in C into a
transient float32 matrix, then take one GEMM. Float activations and the stored values: the reference's
numbers up to summation order.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from pathlib import Path

import torch

from anybit.format.vector import VectorTensor
from anybit.kernels import MAX_BATCH, coded_input
from anybit.kernels.build import CompiledKernel

PIECE = 4  # the piece length the kernel reads


def _declare(lib: ctypes.CDLL) -> None:
    matrix = [ctypes.c_void_p] * 3 + [ctypes.c_int64] * 2  # indices, table, scales, rows, columns
    lib.anybit_vector_matvec.restype = lib.anybit_vector_dequantize.restype = None
    lib.anybit_vector_matvec.argtypes = [*matrix, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int]
    lib.anybit_vector_dequantize.argtypes = [*matrix, ctypes.c_void_p, ctypes.c_int]


KERNEL = CompiledKernel(Path(__file__).with_name("vector_lut.c"), _declare)


def unavailable(qt: VectorTensor) -> str:
    """Why the kernel cannot serve this tensor ("" when it can)."""
    if qt.dim != PIECE:
        return f"pieces of {qt.dim} (the kernel reads pieces of {PIECE})"
    if qt.codes.device.type != "cpu":
        return "the tensor is not in CPU memory"
    library = KERNEL.library()
    return library if isinstance(library, str) else ""


@dataclass
class VectorPrepared:
    """A vector-coded tensor re-laid for the kernel."""

    qt: VectorTensor
    index: torch.Tensor  # int16 (rows, pieces): table indices, below 2**15
    table: torch.Tensor  # float32 (entries, 4)
    scale: torch.Tensor  # float32 (rows,)
    owns_codes = True  # the packed codes are not read again

    def matrix(self) -> tuple:
        """The leading arguments both kernels take."""
        rows, cols = self.qt.shape
        return self.index.data_ptr(), self.table.data_ptr(), self.scale.data_ptr(), rows, cols

    def dense(self) -> torch.Tensor:
        """The coded matrix (rows, columns) in float32, in the coded column order."""
        out = torch.empty(self.qt.shape, dtype=torch.float32)
        KERNEL.library().anybit_vector_dequantize(*self.matrix(), out.data_ptr(), torch.get_num_threads())
        return out


def prepare(qt: VectorTensor) -> VectorPrepared:
    """The kernel's view of a tensor it serves (see `unavailable`)."""
    reason = unavailable(qt)
    if reason:
        raise ValueError(reason)
    index = qt.unpacked_codes().to(torch.int16).contiguous()
    return VectorPrepared(qt, index, qt.table(torch.float32).contiguous(), qt.scales.float().contiguous())


def product(prepared: VectorPrepared, x: torch.Tensor) -> torch.Tensor:
    """y = x Wᵀ (float32) for the rotated input rows x (W' of the module doc): from the indices up to MAX_BATCH
    rows, else through the decoded matrix and one GEMM in x's dtype."""
    qt = prepared.qt
    rows, cols = qt.shape
    if x.dim() != 2 or x.shape[1] != cols or x.device.type != "cpu":
        raise ValueError(f"x must be a CPU tensor (tokens, {cols}), got {tuple(x.shape)} on {x.device}")
    xs = coded_input(x, qt.perm, None)
    if x.shape[0] > MAX_BATCH:
        return (xs.to(x.dtype) @ prepared.dense().to(x.dtype).t()).float()
    xs = xs.float().contiguous()
    y = torch.empty(x.shape[0], rows, dtype=torch.float32)
    KERNEL.library().anybit_vector_matvec(
        *prepared.matrix(), xs.data_ptr(), x.shape[0], y.data_ptr(), torch.get_num_threads()
    )
    return y
