"""Vector-coded matrices (`format.vector`) on the CPU, served by both C backends, "fast" and "exact".

Their products run in the fast kernel's library (`int8_lut.c`, `vq_row_product`): per row, each piece's table
entry (float32, from a table of at least 32 KB shared by every matrix of one dimension and index width,
`kernel_table`) multiplied with its four or two inputs, the row's sum times its scale; 1-8 tokens per pass over a
row's indices, OpenMP over rows. The activations stay float32
(the int8 rounding of the segment layouts would cost accuracy and save nothing here: the entries are loaded,
not looked up in registers), so both backends compute the reference's numbers up to summation order. The
indices are re-laid once into one little-endian stream of k-bit fields per row, the kernel's order (as many
bytes as the stored codes, which are not read again: in memory a vq model holds its counted bits). The
native decoder (`runtime.native`) runs
these matrices inside its decode step, the input rotation included. On the eager path, inputs longer than
`GEMM_TOKENS` decode the matrix in C into a transient float32 matrix and take one GEMM.
"""

from __future__ import annotations

import ctypes
import functools
from dataclasses import dataclass

import torch

from anybit.format.vector import VectorTensor
from anybit.format.vector_tables import vector_table
from anybit.kernels import check_cpu_input, coded_input, cpu_fast, cpu_placement_unavailable
from anybit.kernels.cpu_fast import KERNEL, Matrix, PreparedMatrix

DIMS = (2, 4)  # the piece lengths the kernel reads (vq_dim in int8_lut.c)
MAX_INDEX_BITS = 14  # VQ_MAX_BITS in int8_lut.c
RELAY_ROWS = 256  # rows re-laid at once (bounds the temporaries)
GEMM_TOKENS = 64  # longer eager inputs multiply the decoded matrix
# The kernel's tables spread their entries over this many bytes of float32 pieces where they have fewer: random
# lookups into a table of 16 KB or less ran 1.5-1.8x slower per piece than into 32 KB on the
# Intel Xeon of RESULTS ("vq on the native decoder"), for reasons the measurements do not show.
TABLE_BYTES = 32768


def unavailable(qt: VectorTensor) -> str:
    """Why the kernel cannot serve this tensor ("" when it can)."""
    if qt.dim not in DIMS:
        return f"pieces of {qt.dim} (the kernel reads pieces of {' or '.join(map(str, DIMS))})"
    if qt.index_bits > MAX_INDEX_BITS:
        return f"{qt.index_bits}-bit indices (the kernel reads at most {MAX_INDEX_BITS})"
    return cpu_placement_unavailable(qt.codes, KERNEL.library())


@dataclass
class VectorPrepared(PreparedMatrix):
    """A vector-coded tensor re-laid for the kernel."""

    qt: VectorTensor
    codes: torch.Tensor  # uint8: per row, its codes as one little-endian bit stream (`bit_streams`), then 8 bytes
    row_bytes: int
    table: torch.Tensor  # float32 (slots, dim): shared by every tensor of one dimension and index width
    slot_shift: int  # code c's entry is in slot c << slot_shift
    scale: torch.Tensor  # float32 (rows,)
    order: torch.Tensor  # int64 (rows,): the rows in order
    perm: torch.Tensor | None  # int64: the coded column order
    owns_codes = True  # the packed codes are not read again

    def nbytes(self) -> int:
        """Bytes the kernel holds for this tensor besides the stored ones (the shared table left out)."""
        held = [self.codes, self.scale, self.order] + ([self.perm] if self.perm is not None else [])
        return sum(t.numel() * t.element_size() for t in held)

    def _build_matrix(self, extras: dict) -> Matrix:
        rows, cols = self.qt.shape
        return Matrix(
            rows=rows, cols=cols, group_size=self.qt.dim, order=self.order.data_ptr(),
            perm=None if self.perm is None else self.perm.data_ptr(), vq_codes=self.codes.data_ptr(),
            vq_table=self.table.data_ptr(), vq_scale=self.scale.data_ptr(), vq_bits=self.qt.index_bits,
            vq_row_bytes=self.row_bytes, vq_slot_shift=self.slot_shift, vq_dim=self.qt.dim, **extras,
        )  # fmt: skip

    def dense(self) -> torch.Tensor:
        """The coded matrix (rows, columns) in float32, in the coded column order."""
        out = torch.empty(self.qt.shape, dtype=torch.float32)
        matrix = self._plain_matrix
        KERNEL.library().anybit_vector_dequantize(ctypes.byref(matrix), out.data_ptr(), torch.get_num_threads())
        return out


def prepare(qt: VectorTensor) -> VectorPrepared:
    """The kernel's view of a tensor it serves (see `unavailable`)."""
    reason = unavailable(qt)
    if reason:
        raise ValueError(reason)
    table, slot_shift = kernel_table(qt.dim, qt.index_bits)
    codes, row_bytes = bit_streams(qt)
    perm = None if qt.perm is None else qt.perm.to(torch.int64).contiguous()
    order = torch.arange(qt.shape[0], dtype=torch.int64)
    return VectorPrepared(qt, codes, row_bytes, table, slot_shift, qt.scales.float().contiguous(), order, perm)


def bit_streams(qt: VectorTensor) -> tuple[torch.Tensor, int]:
    """The codes of each row as one little-endian stream of k-bit fields (k the index width; code p in bits
    p·k .. p·k + k - 1 of the row's bytes), rows one after another, then 8 zero bytes (the kernel reads 8
    bytes at a time); and the bytes of a row."""
    bits, rows, pieces = qt.index_bits, qt.shape[0], qt.shape[1] // qt.dim
    row_bytes = -(-pieces * bits // 8)
    position = torch.arange(pieces) * bits
    first_byte, shift = position // 8, position % 8
    spans = -(-(bits + 7) // 8)  # bytes a code can touch from its first
    out = torch.zeros(rows * row_bytes + 8, dtype=torch.uint8)
    codes = qt.unpacked_codes()
    for start in range(0, rows, RELAY_ROWS):  # a chunk at a time: small temporaries
        moved = codes[start : start + RELAY_ROWS] << shift  # each code at its bit offset within its first byte
        chunk = torch.zeros(moved.shape[0], row_bytes + spans, dtype=torch.int64)
        for j in range(spans):  # the codes' bits do not overlap: adding their bytes is OR-ing them
            chunk.index_add_(1, first_byte + j, (moved >> (8 * j)) & 255)
        out[start * row_bytes : (start + moved.shape[0]) * row_bytes] = chunk[:, :row_bytes].reshape(-1).to(torch.uint8)
    return out, row_bytes


@functools.cache
def kernel_table(dim: int, index_bits: int) -> tuple[torch.Tensor, int]:
    """The table of `index_bits`-bit indices as the kernel reads it, and its slot shift s: entry i in slot
    i << s (float32, at least TABLE_BYTES), the other slots zero."""
    table = vector_table(dim, index_bits).float()
    shift = max(0, ((TABLE_BYTES // (4 * dim)) >> index_bits).bit_length() - 1)
    slots = torch.zeros(table.shape[0] << shift, dim)
    slots[:: 1 << shift] = table
    return slots, shift


def product(prepared: VectorPrepared, x: torch.Tensor) -> torch.Tensor:
    """y = x Wᵀ (float32) for the rotated input rows x (W' of `format.vector`): from the indices up to
    GEMM_TOKENS rows (the kernel permutes x), else through the decoded matrix and one GEMM in x's dtype."""
    check_cpu_input(x, prepared.qt.shape[1])
    if x.shape[0] > GEMM_TOKENS:
        xs = coded_input(x, prepared.qt.perm, None)
        return (xs.to(x.dtype) @ prepared.dense().to(x.dtype).t()).float()
    return cpu_fast.matmul(prepared.matrix(), x)
