"""Triton kernel for decode-time products y = W x with W packed by `QuantizedTensor` (batch 1-8).

One launch per code width present in the matrix. A program takes a block of segments of that width
(a segment is `group_size` codes of one row, stored contiguously in the width's bit-plane stream:
`b` bytes per 8 codes), unpacks the codes in registers, looks each code up in its segment's 2**b
codebook (codebook kind) or applies its segment's scale and zero point (uniform kind), multiplies by
the matching slice of x and accumulates in fp32, then adds its partial sums into y (atomics, since
several segments may share a row). Everything the packed format allows on axis 0 runs here: mixed
widths per row or per group, per-row or per-group codebooks, uniform groups. Act-order permutation and
the scaling vector are applied to x beforehand, sparse outliers as a second, cheap step.

Without a GPU the same kernels run in Triton's interpreter (TRITON_INTERPRET=1), which is how the
tests check them on the CPU; no speed figure comes from there.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from anybit.format.qtensor import QuantizedTensor

BLOCK_S = 16  # segments per program
MAX_BATCH = 8


@triton.jit
def _lut_gemv_kernel(
    codes_ptr, table_ptr, zeros_ptr, seg_row_ptr, seg_col_ptr, x_ptr, y_ptr,
    n_seg, group_size, stride_x, stride_y, batch,
    BITS: tl.constexpr, UNIFORM: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_B: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    seg = pid * BLOCK_S + tl.arange(0, BLOCK_S)
    seg_ok = seg < n_seg
    row = tl.load(seg_row_ptr + seg, mask=seg_ok, other=0)
    col0 = tl.load(seg_col_ptr + seg, mask=seg_ok, other=0)
    bidx = tl.arange(0, BLOCK_B)
    b_ok = bidx < batch
    bit = tl.arange(0, 8)
    if UNIFORM:
        zero = tl.zeros([BLOCK_S], dtype=tl.int32)
        for j in tl.static_range(BITS):
            zbyte = tl.load(zeros_ptr + (seg // 8) * BITS + j, mask=seg_ok, other=0).to(tl.int32)
            zero |= ((zbyte >> (seg % 8)) & 1) << j
        scale = tl.load(table_ptr + seg, mask=seg_ok, other=0.0).to(tl.float32)
    acc = tl.zeros([BLOCK_S, BLOCK_B], dtype=tl.float32)
    for k0 in range(0, group_size, BLOCK_K):
        kb = k0 // 8 + tl.arange(0, BLOCK_K // 8)
        k_ok = seg_ok[:, None] & (kb[None, :] < group_size // 8)
        code = tl.zeros([BLOCK_S, BLOCK_K // 8, 8], dtype=tl.int32)
        for j in tl.static_range(BITS):
            offs = (seg[:, None] * (group_size // 8) + kb[None, :]) * BITS + j
            byte = tl.load(codes_ptr + offs, mask=k_ok, other=0).to(tl.int32)
            code |= ((byte[:, :, None] >> bit[None, None, :]) & 1) << j
        code = tl.reshape(code, [BLOCK_S, BLOCK_K])
        if UNIFORM:
            w = (code - zero[:, None]).to(tl.float32) * scale[:, None]
        else:
            w = tl.load(table_ptr + seg[:, None] * (1 << BITS) + code, mask=seg_ok[:, None], other=0.0)
            w = w.to(tl.float32)
        col = col0[:, None] + k0 + tl.arange(0, BLOCK_K)[None, :]
        c_ok = seg_ok[:, None] & ((k0 + tl.arange(0, BLOCK_K))[None, :] < group_size)
        xv = tl.load(
            x_ptr + bidx[None, None, :] * stride_x + col[:, :, None],
            mask=c_ok[:, :, None] & b_ok[None, None, :],
            other=0.0,
        ).to(tl.float32)
        acc += tl.sum(w[:, :, None] * xv, axis=1)
    tl.atomic_add(
        y_ptr + bidx[None, :] * stride_y + row[:, None], acc, mask=seg_ok[:, None] & b_ok[None, :], sem="relaxed"
    )


@dataclass
class _Launch:
    bits: int
    uniform: bool
    codes: torch.Tensor
    table: torch.Tensor  # codebooks (segments, 2**b) or scales (segments,)
    zeros: torch.Tensor  # packed zero points (uniform) or a dummy
    seg_row: torch.Tensor
    seg_col: torch.Tensor


@dataclass
class PreparedMatrix:
    """Device-resident launch data of one `QuantizedTensor` (only index vectors are added to it)."""

    out_features: int
    in_features: int
    group_size: int
    launches: list[_Launch]
    perm: torch.Tensor | None
    col_scale: torch.Tensor | None
    outlier_rows: torch.Tensor | None
    outlier_cols: torch.Tensor | None
    outlier_deltas: torch.Tensor | None  # stored value minus decoded value at each outlier


def unsupported_reason(qt: QuantizedTensor) -> str | None:
    """Why `qt` cannot use the kernel (None when it can)."""
    if qt.axis != 0:
        return "per-column (axis 1) layouts have no kernel"
    if qt.group_size % 8:
        return f"group size {qt.group_size} is not a multiple of 8"
    return None


def prepare(qt: QuantizedTensor) -> PreparedMatrix:
    """Index vectors for each width's launch, and the outlier corrections."""
    rows, cols = qt.shape
    groups = cols // qt.group_size
    device = qt.bitmap.device
    grid_row = torch.arange(rows, device=device)[:, None].expand(rows, groups)
    grid_col = (torch.arange(groups, device=device) * qt.group_size)[None, :].expand(rows, groups)
    launches = []
    for b in qt.widths:
        mask = qt.bitmap == b
        if qt.kind == "codebook":
            table, zeros = qt.codebooks[b], torch.zeros(1, dtype=torch.uint8, device=device)
        else:
            table, zeros = qt.scales[mask].contiguous(), qt.zeros[b]
        launches.append(
            _Launch(
                b,
                qt.kind == "uniform",
                qt.codes[b],
                table,
                zeros,
                grid_row[mask].to(torch.int32),
                grid_col[mask].to(torch.int32),
            )
        )
    o_rows = o_cols = deltas = None
    if qt.outliers is not None:
        o_rows, o_cols = qt.outliers.coordinates()
        decoded = dataclasses.replace(qt, outliers=None).dequantize(torch.float32)  # once, at preparation
        deltas = qt.outliers.values.float() - decoded[o_rows, o_cols]
    return PreparedMatrix(rows, cols, qt.group_size, launches, qt.perm, qt.col_scale, o_rows, o_cols, deltas)


def lut_matvec(prepared: PreparedMatrix, x: torch.Tensor) -> torch.Tensor:
    """y = W x for x of shape (batch ≤ 8, in_features); float32 result (batch, out_features)."""
    if x.dim() != 2 or x.shape[1] != prepared.in_features or x.shape[0] > MAX_BATCH:
        raise ValueError(f"x must be (batch <= {MAX_BATCH}, {prepared.in_features}), got {tuple(x.shape)}")
    xs = x.float()
    if prepared.col_scale is not None:  # in original column order, before the coded order is applied
        xs = xs / prepared.col_scale.float()[None, :]
    if prepared.perm is not None:
        xs = xs[:, prepared.perm.to(torch.int64)]
    xs = xs.contiguous()
    batch = x.shape[0]
    y = torch.zeros(batch, prepared.out_features, dtype=torch.float32, device=x.device)
    block_b = triton.next_power_of_2(batch)
    block_k = min(64, triton.next_power_of_2(prepared.group_size))
    for launch in prepared.launches:
        n_seg = launch.seg_row.numel()
        _lut_gemv_kernel[(triton.cdiv(n_seg, BLOCK_S),)](
            launch.codes, launch.table, launch.zeros, launch.seg_row, launch.seg_col, xs, y,
            n_seg, prepared.group_size, xs.stride(0), y.stride(0), batch,
            BITS=launch.bits, UNIFORM=launch.uniform,
            BLOCK_S=BLOCK_S, BLOCK_K=block_k, BLOCK_B=block_b,
        )  # fmt: skip
    if prepared.outlier_rows is not None:
        # outliers replace decoded values: add (stored - decoded) · x at their positions
        x_orig = x.float()
        contrib = prepared.outlier_deltas[None, :] * x_orig[:, prepared.outlier_cols]
        y.index_add_(1, prepared.outlier_rows, contrib)
    return y
