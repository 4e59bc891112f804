"""Per-column codebooks (axis 1: CLAQ's layout) on the fast CPU kernel (`int8_lut.c`, "Per-column codebooks").

Column j of such a matrix has one codebook (or uniform grid) of 2^b entries for all its rows. The kernel holds
each as a table of integer entries e_j of at most 12 bits and a float step σ_j (w[r, j] ≈ σ_j e_j[c]: codebooks
rounded with σ_j = max |entry| / 2047, uniform grids exact: e = code − zero, σ = scale), and rounds each token
once with the steps folded in, x'_j = round(x_j σ_j / s) with s = max_j |x_j σ_j| / 32767 (int16), so that
y_r = s Σ_j x'_j e_j[c_rj] sums integer products: per 32 rows and two columns, two table lookups per column
(pshufb: a low and a high byte) and one madd_epi16 on AVX2. The entries keep 12 bits whatever the fast path's
`tables`: the lookups cost the same for both. `emulate` computes the same product in torch; tests bound the
kernel's error by these two roundings.

Codes are re-laid once, per block of 32 rows, column after column, each column's 32 codes in 4 b bytes (the
stored bytes, rows padded to a multiple of 32), columns of one width together (a permutation of the kernel's
own, composed with the stored one). Served: one segment per column (the group size is the row count) and an even
number of columns; perm, scaling vector, outliers and rotation as on the other layouts.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from anybit.format.packing import unpack_codes
from anybit.format.qtensor import QuantizedTensor
from anybit.kernels import check_cpu_input, coded_input, cpu_placement_unavailable
from anybit.kernels.cpu_fast import KERNEL, Matrix, PreparedMatrix, matmul, outliers_in_order, part_runs, pointer

ROWS = 32  # COLUMN_ROWS in int8_lut.c
ENTRY_MAX = 2047  # a table entry's largest magnitude
INPUT_MAX = 32767  # a rounded activation's
RELAY_COLUMNS = 256  # columns re-laid at once (bounds the temporaries)


def unavailable(qt: QuantizedTensor) -> str:
    """Why the kernel cannot serve this axis-1 tensor ("" when it can)."""
    rows, cols = qt.shape
    if qt.group_size != rows:
        return f"per-column segments of {qt.group_size} of {rows} rows (the kernel takes one segment per column)"
    if cols % 2:
        return f"an odd number of columns ({cols}; the kernel multiplies them two by two)"
    return cpu_placement_unavailable(qt.bitmap, KERNEL.library())


@dataclass
class ColumnPrepared(PreparedMatrix):
    """A per-column tensor re-laid for the kernel; its columns in the kernel's order (`perm`)."""

    qt: QuantizedTensor
    codes: torch.Tensor  # uint8 (blocks * block_bytes,): see the module docstring
    block_bytes: int
    bits: torch.Tensor  # uint8 (cols,): each kernel column's width
    tables: torch.Tensor  # uint8: per kernel column, the low then the high bytes of its entries
    table_offset: torch.Tensor  # int64 (cols,)
    step: torch.Tensor  # float32 (cols,): σ of each kernel column
    runs: torch.Tensor  # int64: where each run of kernel columns of one width starts, then cols
    order: torch.Tensor  # int64 (rows,): the rows in order (the outliers' positions)
    perm: torch.Tensor  # int64 (cols,): the input column each kernel column reads
    col_scale: torch.Tensor | None  # float32: the scaling vector
    outliers: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None  # as FastPrepared's
    owns_codes = True  # the packed codes are not read again

    def nbytes(self) -> int:
        """Bytes the kernel holds for this tensor besides the stored ones: codes, tables, steps, orders, outliers."""
        held = [self.codes, self.bits, self.tables, self.table_offset, self.step, self.runs, self.order, self.perm]
        held += list(self.outliers or ())
        return sum(t.numel() * t.element_size() for t in held)

    def _build_matrix(self, extras: dict) -> Matrix:
        start, rows, cols, deltas = self.outliers if self.outliers is not None else (None,) * 4
        return Matrix(
            rows=self.qt.shape[0], cols=self.qt.shape[1], group_size=self.qt.group_size, order=self.order.data_ptr(),
            perm=self.perm.data_ptr(), col_scale=pointer(self.col_scale),
            n_outliers=0 if cols is None else cols.numel(), outlier_start=pointer(start), outlier_rows=pointer(rows),
            outlier_cols=pointer(cols), outlier_deltas=pointer(deltas), col_codes=self.codes.data_ptr(),
            col_bits=self.bits.data_ptr(), col_tables=self.tables.data_ptr(),
            col_table_off=self.table_offset.data_ptr(), col_step=self.step.data_ptr(),
            col_block_bytes=self.block_bytes, col_runs=self.runs.data_ptr(), col_n_runs=self.runs.numel() - 1,
            **extras,
        )  # fmt: skip


def prepare(qt: QuantizedTensor) -> ColumnPrepared:
    """The kernel's view of a per-column tensor it serves (see `unavailable`)."""
    reason = unavailable(qt)
    if reason:
        raise ValueError(reason)
    rows, cols = qt.shape
    kernel_columns = _kernel_columns(qt)
    bits = qt.bitmap[kernel_columns, 0].to(torch.int64)
    column_bytes = 4 * bits  # per block of ROWS rows
    start = torch.cumsum(column_bytes, 0) - column_bytes
    block_bytes = int(column_bytes.sum())
    blocks = -(-rows // ROWS)
    codes = torch.zeros(blocks, block_bytes, dtype=torch.uint8)
    entries = torch.zeros(cols, 256, dtype=torch.int16)
    step = torch.empty(cols, dtype=torch.float32)
    for b in qt.widths:  # kernel columns of width b: a run in the stored order
        first = int((bits < b).sum())
        count = int((bits == b).sum())
        stored = unpack_codes(qt.codes[b], b, count * rows, torch.uint8).view(count, rows)
        for c0 in range(0, count, RELAY_COLUMNS):
            part = _column_parts(stored[c0 : c0 + RELAY_COLUMNS], b, blocks)  # (n, blocks, 4 b)
            at = int(start[first + c0])
            codes[:, at : at + part.shape[0] * 4 * b] = part.transpose(0, 1).reshape(blocks, -1)
        values, steps = _column_entries(qt, b, count)
        entries[first : first + count, : 1 << b] = values
        step[first : first + count] = steps
    tables, table_offset = _tables(entries, bits)
    perm = kernel_columns if qt.perm is None else qt.perm.to(torch.int64)[kernel_columns]
    col_scale = None if qt.col_scale is None else qt.col_scale.float().contiguous()
    order = torch.arange(rows, dtype=torch.int64)
    change = (bits[1:] != bits[:-1]).nonzero()[:, 0] + 1
    runs = torch.cat([torch.zeros(1, dtype=torch.int64), change, torch.tensor([cols])])
    return ColumnPrepared(
        qt, codes.reshape(-1), block_bytes, bits.to(torch.uint8), tables, table_offset, step, runs, order,
        perm.contiguous(), col_scale, outliers_in_order(qt, order),
    )  # fmt: skip


def _kernel_columns(qt: QuantizedTensor) -> torch.Tensor:
    """The stored column each of the kernel's columns is: columns of one width together, stored order within."""
    return torch.sort(qt.bitmap[:, 0].to(torch.int64), stable=True).indices


def _column_parts(codes: torch.Tensor, b: int, blocks: int) -> torch.Tensor:
    """(n, rows) codes of width b as (n, blocks, 4 b) bytes: per block of 32 rows, `cpu_fast.part_runs` (4 bits:
    byte i = p[i] | p[i + 16] << 4; 2 bits: byte i = Σ_q p[i + 8 q] << 2 q; 1 bit: byte i = Σ_d p[i + 4 d] << d);
    8 bits: the codes themselves. Rows past the last are zero codes."""
    n, rows = codes.shape
    padded = torch.zeros(n, blocks * ROWS, dtype=torch.uint8)
    padded[:, :rows] = codes
    block = padded.view(n, blocks, ROWS)
    return block if b == 8 else part_runs(block, b)


def _column_entries(qt: QuantizedTensor, b: int, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The `count` columns of width b (stored order) as integer entries (count, 2^b) and steps (count,)."""
    if qt.kind == "uniform":
        zeros = unpack_codes(qt.zeros[b], b, count, torch.int64)
        values = torch.arange(1 << b)[None, :] - zeros[:, None]
        return values.to(torch.int16), qt.scales[qt.bitmap[:, 0] == b, 0].float()
    books = qt.codebooks[b].float()
    step = books.abs().amax(dim=1) / ENTRY_MAX
    step = torch.where(step > 0, step, torch.ones_like(step))
    values = torch.round(books / step[:, None]).clamp(-ENTRY_MAX, ENTRY_MAX)
    return values.to(torch.int16), step


def _tables(entries: torch.Tensor, bits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per kernel column, the low bytes of its 2^max(b, 4) entries, then their high bytes; and the offsets."""
    size = 2 * torch.clamp(1 << bits, min=16)
    offset = torch.cumsum(size, 0) - size
    tables = torch.zeros(int(size.sum()), dtype=torch.uint8)
    for n in torch.unique(size).tolist():
        columns = (size == n).nonzero()[:, 0]
        values = entries[columns, : n // 2].to(torch.int32)
        both = torch.cat([values & 255, (values >> 8) & 255], dim=1).to(torch.uint8)
        tables[(offset[columns][:, None] + torch.arange(n)).reshape(-1)] = both.reshape(-1)
    return tables, offset


def product(prepared: ColumnPrepared, x: torch.Tensor) -> torch.Tensor:
    """y = x Ŵᵀ (float32) for the rotated input rows x (the kernel permutes and scales them)."""
    check_cpu_input(x, prepared.qt.shape[1])
    return matmul(prepared.matrix(), x)


def rounded_input(prepared: ColumnPrepared, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The tokens as the kernel rounds them: x' (tokens, cols; kernel column order, float32 integers) and s
    (tokens, 1)."""
    v = coded_input(x.float(), prepared.perm, prepared.col_scale) * prepared.step[None, :]
    amax = v.abs().amax(dim=1, keepdim=True)
    # a true division, as the kernel's (`INPUT_MAX / amax` would multiply by amax's reciprocal)
    inverse = torch.where(amax > 0, torch.full_like(amax, INPUT_MAX) / amax, torch.zeros_like(amax))
    return torch.round(v * inverse).clamp(-INPUT_MAX, INPUT_MAX), amax / INPUT_MAX


def kernel_weight(prepared: ColumnPrepared) -> torch.Tensor:
    """The coded matrix as the kernel multiplies it (rows, cols in the kernel's column order): σ_j e_j[c];
    float64."""
    qt = prepared.qt
    codes = torch.empty(qt.shape[1], qt.shape[0], dtype=torch.int64)  # stored column order
    widths = qt.bitmap[:, 0]
    for b, stored in qt.unpacked_codes().items():
        codes[widths == b] = stored.to(torch.int64)
    values = torch.gather(table_entries(prepared).double(), 1, codes[_kernel_columns(qt)])
    return (values * prepared.step.double()[:, None]).t()


def table_entries(prepared: ColumnPrepared) -> torch.Tensor:
    """Each kernel column's entries as its tables hold them: int32 (cols, 256), zeros past 2^b."""
    out = torch.zeros(prepared.qt.shape[1], 256, dtype=torch.int32)
    for p, (b, at) in enumerate(zip(prepared.bits.tolist(), prepared.table_offset.tolist(), strict=True)):
        n = max(1 << b, 16)
        low, high = prepared.tables[at : at + n].to(torch.int32), prepared.tables[at + n : at + 2 * n].to(torch.int32)
        out[p, :n] = (low | high << 8).to(torch.int16).to(torch.int32)
    return out


def emulate(prepared: ColumnPrepared, x: torch.Tensor) -> torch.Tensor:
    """What `product` computes, in torch (float64): the rounded tokens times the kernel's entries, the outliers
    added. The kernel sums in float32 per 32 columns; tests allow for that."""
    xq, s = rounded_input(prepared, x)
    entries = kernel_weight(prepared) / prepared.step.double()[None, :]
    y = s.double() * (xq.double() @ entries.t())
    if prepared.outliers is not None:
        _, out_rows, out_cols, deltas = prepared.outliers
        y.index_add_(1, out_rows.long(), deltas.double()[None, :] * x.double()[:, out_cols.long()])
    return y
