"""Triton kernels for decode-time products y = W x with W packed by `QuantizedTensor` (batch 1-8).

Row layouts (one segment per output row: SKIM/anybit/SqueezeLLM per-row codebooks, per-channel
uniform grids) take one launch for the whole matrix, whatever the mix of widths: rows are visited
grouped by width, each program takes a block of rows and a slice of the columns (split-K, partial
sums added atomically), reads each row's bit planes straight from its width's stream (a per-row
byte offset from one base pointer: no copy of the codes is made), decodes in registers, looks the
codes up in the row's codebook and multiplies by a tile of x loaded once for all its rows. Block
sizes and the split are autotuned per shape on CUDA.

Grouped layouts take one launch per code width present in the matrix. A program takes a block of segments of that width
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

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from anybit.format.packing import unpack_codes
from anybit.format.qtensor import QuantizedTensor
from anybit.kernels import MAX_BATCH, coded_input, outlier_corrections

BLOCK_S = 16  # segments per program (grouped layouts)


@triton.jit
def _row_codes(codes_ptr, code_off, bits, n_planes, chunk, m, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    """Codes of the 8-code chunks `chunk` of a block of rows, (rows, chunks, 2, 4), and their columns.

    Codes are decoded four per 32-bit word: each nibble of a bit-plane byte is spread to one bit per
    byte lane by a multiply (n · 0x204081 & 0x01010101; the four shifted copies never overlap), so a
    plane costs about 1.5 integer operations per code instead of 4 bit by bit (1.4-1.6× faster on the H100).
    """
    half = tl.arange(0, 2)
    lane = tl.arange(0, 4)
    byte_ptr = codes_ptr + code_off[:, None] + chunk[None, :] * bits[:, None]
    packed = tl.zeros([BLOCK_R, BLOCK_K // 8, 2], dtype=tl.int32)  # codes 0-3 and 4-7 of each chunk
    for j in range(0, n_planes):
        byte = tl.load(byte_ptr + j, mask=m & (j < bits)[:, None], other=0).to(tl.int32)
        nibble = (byte[:, :, None] >> (4 * half)[None, None, :]) & 0xF
        packed |= ((nibble * 0x204081) & 0x01010101) << j
    code = (packed[:, :, :, None] >> (8 * lane)[None, None, None, :]) & 0xFF
    k = chunk[:, None, None] * 8 + 4 * half[None, :, None] + lane[None, None, :]
    return code, k


@triton.jit
def _segment_zeros(zeros_ptr, seg, seg_ok, BITS: tl.constexpr, BLOCK_S: tl.constexpr):
    """The zero point of each segment in `seg` (packed like codes: one bit plane per byte of 8 segments)."""
    zero = tl.zeros([BLOCK_S], dtype=tl.int32)
    for j in tl.static_range(BITS):
        zbyte = tl.load(zeros_ptr + (seg // 8) * BITS + j, mask=seg_ok, other=0).to(tl.int32)
        zero |= ((zbyte >> (seg % 8)) & 1) << j
    return zero


@triton.jit
def _segment_codes(
    codes_ptr, seg, kb, k_ok, group_size, BITS: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_K: tl.constexpr
):
    """Codes of the 8-code chunks `kb` of segments `seg` of one width: (segments, chunks, 8)."""
    bit = tl.arange(0, 8)
    code = tl.zeros([BLOCK_S, BLOCK_K // 8, 8], dtype=tl.int32)
    for j in tl.static_range(BITS):
        offs = (seg[:, None] * (group_size // 8) + kb[None, :]) * BITS + j
        byte = tl.load(codes_ptr + offs, mask=k_ok, other=0).to(tl.int32)
        code |= ((byte[:, :, None] >> bit[None, None, :]) & 1) << j
    return code


@triton.jit
def _row_lut_kernel(
    codes_ptr, table_ptr, x_ptr, y_ptr, row_ptr, bits_ptr, code_off_ptr, table_off_ptr, scale_ptr, zero_ptr,
    rows, cols, stride_x, stride_y, batch,
    UNIFORM: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, K_SPLIT: tl.constexpr,
    BLOCK_B: tl.constexpr,
):  # fmt: skip
    """Rows (in width order) p = block of BLOCK_R, columns [pid_k · K_SPLIT, +K_SPLIT), accumulated in fp32."""
    p = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    p_ok = p < rows
    row = tl.load(row_ptr + p, mask=p_ok, other=0)
    bits = tl.load(bits_ptr + p, mask=p_ok, other=0)
    code_off = tl.load(code_off_ptr + p, mask=p_ok, other=0)
    if UNIFORM:
        scale = tl.load(scale_ptr + p, mask=p_ok, other=0.0)
        zero = tl.load(zero_ptr + p, mask=p_ok, other=0)
    else:
        table_off = tl.load(table_off_ptr + p, mask=p_ok, other=0)
    n_planes = tl.max(bits, axis=0)  # rows are sorted by width: a block mostly shares one
    bidx = tl.arange(0, BLOCK_B)
    acc = tl.zeros([BLOCK_R, BLOCK_B], dtype=tl.float32)
    k_start = tl.program_id(1) * K_SPLIT
    for k0 in tl.range(k_start, k_start + K_SPLIT, BLOCK_K):
        chunk = k0 // 8 + tl.arange(0, BLOCK_K // 8)
        m = p_ok[:, None] & (chunk < cols // 8)[None, :]
        code, k = _row_codes(codes_ptr, code_off, bits, n_planes, chunk, m, BLOCK_R, BLOCK_K)
        if UNIFORM:
            w = (code - zero[:, None, None, None]).to(tl.float32) * scale[:, None, None, None]
        else:
            w = tl.load(table_ptr + table_off[:, None, None, None] + code, mask=p_ok[:, None, None, None], other=0.0)
            w = w.to(tl.float32)
        for b in tl.static_range(BLOCK_B):
            row_b = tl.minimum(batch - 1, b)  # padding rows repeat the last one; never stored
            xv = tl.load(x_ptr + row_b * stride_x + k, mask=k < cols, other=0.0).to(tl.float32)
            part = tl.sum(tl.sum(tl.sum(w * xv[None, :, :, :], axis=3), axis=2), axis=1)
            acc += tl.where(bidx[None, :] == b, part[:, None], 0.0)
    out = y_ptr + bidx[None, :] * stride_y + row[:, None]
    tl.atomic_add(out, acc, mask=p_ok[:, None] & (bidx < batch)[None, :], sem="relaxed")


def _row_configs() -> list[triton.Config]:
    configs = []
    for block_r, block_k, k_split, warps in (
        (16, 256, 1024, 4), (16, 256, 2048, 4), (32, 128, 1024, 4), (32, 256, 1024, 8), (8, 512, 1024, 4),
        (16, 128, 512, 4), (64, 128, 1024, 8), (16, 256, 4096, 4), (32, 256, 2048, 8), (8, 256, 512, 2),
    ):  # fmt: skip
        configs.append(triton.Config({"BLOCK_R": block_r, "BLOCK_K": block_k, "K_SPLIT": k_split}, num_warps=warps))
    return configs


def _prune(configs, named_args, **kwargs):
    """Batch > 1 multiplies the register tile: keep the smaller tiles there; never split below a tile."""
    batch = kwargs.get("BLOCK_B", 1)
    kept = [c for c in configs if c.kwargs["BLOCK_K"] <= c.kwargs["K_SPLIT"]]
    if batch > 1:
        kept = [c for c in kept if c.kwargs["BLOCK_R"] * c.kwargs["BLOCK_K"] * batch <= 16384] or kept[:1]
    return kept


if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
    _row_kernel = triton.autotune(
        _row_configs(), key=["rows", "cols", "BLOCK_B"], reset_to_zero=["y_ptr"],
        prune_configs_by={"early_config_prune": _prune},
    )(_row_lut_kernel)  # fmt: skip
    _ROW_FIXED: dict = {}
    _ROW_TUNED: dict[tuple, dict] = {}  # (rows, cols, BLOCK_B, UNIFORM) -> the autotuner's choice
else:  # the interpreter (tests on CPU): one fixed configuration, small enough to be quick
    _row_kernel = _row_lut_kernel
    _ROW_FIXED = {"BLOCK_R": 8, "BLOCK_K": 64, "K_SPLIT": 128, "num_warps": 4}
    _ROW_TUNED = {}


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
    if UNIFORM:
        zero = _segment_zeros(zeros_ptr, seg, seg_ok, BITS, BLOCK_S)
        scale = tl.load(table_ptr + seg, mask=seg_ok, other=0.0).to(tl.float32)
    acc = tl.zeros([BLOCK_S, BLOCK_B], dtype=tl.float32)
    for k0 in range(0, group_size, BLOCK_K):
        kb = k0 // 8 + tl.arange(0, BLOCK_K // 8)
        k_ok = seg_ok[:, None] & (kb[None, :] < group_size // 8)
        code = _segment_codes(codes_ptr, seg, kb, k_ok, group_size, BITS, BLOCK_S, BLOCK_K)
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


@triton.jit
def _row_dequant_kernel(
    codes_ptr, table_ptr, out_ptr, row_ptr, bits_ptr, code_off_ptr, table_off_ptr, scale_ptr, zero_ptr,
    rows, cols, stride_out,
    UNIFORM: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """Decode rows (in width order) p = block of BLOCK_R, columns [pid_k · BLOCK_K, +BLOCK_K), into `out`."""
    p = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    p_ok = p < rows
    row = tl.load(row_ptr + p, mask=p_ok, other=0)
    bits = tl.load(bits_ptr + p, mask=p_ok, other=0)
    code_off = tl.load(code_off_ptr + p, mask=p_ok, other=0)
    chunk = tl.program_id(1) * (BLOCK_K // 8) + tl.arange(0, BLOCK_K // 8)
    m = p_ok[:, None] & (chunk < cols // 8)[None, :]
    code, k = _row_codes(codes_ptr, code_off, bits, tl.max(bits, axis=0), chunk, m, BLOCK_R, BLOCK_K)
    if UNIFORM:
        scale = tl.load(scale_ptr + p, mask=p_ok, other=0.0)
        zero = tl.load(zero_ptr + p, mask=p_ok, other=0)
        w = (code - zero[:, None, None, None]).to(tl.float32) * scale[:, None, None, None]
    else:
        table_off = tl.load(table_off_ptr + p, mask=p_ok, other=0)
        w = tl.load(table_ptr + table_off[:, None, None, None] + code, mask=p_ok[:, None, None, None], other=0.0)
    out = out_ptr + row[:, None, None, None].to(tl.int64) * stride_out + k[None, :, :, :]
    tl.store(out, w.to(out_ptr.dtype.element_ty), mask=m[:, :, None, None])


@triton.jit
def _group_dequant_kernel(
    codes_ptr, table_ptr, zeros_ptr, seg_row_ptr, seg_col_ptr, out_ptr, n_seg, group_size, stride_out,
    BITS: tl.constexpr, UNIFORM: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """Decode segments of one width, [pid · BLOCK_S, +BLOCK_S), into their places in `out`."""
    seg = tl.program_id(0) * BLOCK_S + tl.arange(0, BLOCK_S)
    seg_ok = seg < n_seg
    row = tl.load(seg_row_ptr + seg, mask=seg_ok, other=0).to(tl.int64)
    col0 = tl.load(seg_col_ptr + seg, mask=seg_ok, other=0)
    bit = tl.arange(0, 8)
    if UNIFORM:
        zero = _segment_zeros(zeros_ptr, seg, seg_ok, BITS, BLOCK_S)
        scale = tl.load(table_ptr + seg, mask=seg_ok, other=0.0).to(tl.float32)
    for k0 in range(0, group_size, BLOCK_K):
        kb = k0 // 8 + tl.arange(0, BLOCK_K // 8)
        k_ok = seg_ok[:, None] & (kb[None, :] < group_size // 8)
        code = _segment_codes(codes_ptr, seg, kb, k_ok, group_size, BITS, BLOCK_S, BLOCK_K)
        if UNIFORM:
            w = (code - zero[:, None, None]).to(tl.float32) * scale[:, None, None]
        else:
            w = tl.load(table_ptr + seg[:, None, None] * (1 << BITS) + code, mask=seg_ok[:, None, None], other=0.0)
        col = col0[:, None, None] + kb[None, :, None] * 8 + bit[None, None, :]
        tl.store(out_ptr + row[:, None, None] * stride_out + col, w.to(out_ptr.dtype.element_ty), mask=k_ok[:, :, None])


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
class _RowLaunch:
    """Per-row launch data in width order (a few bytes per row; the codes and codebooks stay where they are)."""

    codes: torch.Tensor  # base of the byte offsets: one width's code stream
    table: torch.Tensor  # base of the entry offsets: one width's codebooks (codebook kind)
    rows: torch.Tensor  # int32 row of each position
    bits: torch.Tensor  # int32 width
    code_off: torch.Tensor  # int64 byte offset of the row's codes from `codes`
    table_off: torch.Tensor  # int64 entry offset of the row's codebook from `table`
    scale: torch.Tensor  # float32 per-row scale (uniform kind)
    zero: torch.Tensor  # int32 per-row zero point (uniform kind)
    uniform: bool


@dataclass
class PreparedMatrix:
    """Device-resident launch data of one `QuantizedTensor` (only index vectors are added to it)."""

    out_features: int
    in_features: int
    group_size: int
    launches: list[_Launch]
    row_launch: _RowLaunch | None
    perm: torch.Tensor | None
    col_scale: torch.Tensor | None
    outlier_rows: torch.Tensor | None
    outlier_cols: torch.Tensor | None
    outlier_deltas: torch.Tensor | None  # stored value minus decoded value at each outlier
    coded_outlier_index: torch.Tensor | None  # flat index of each outlier in the coded (permuted, scaled) matrix
    coded_outlier_deltas: torch.Tensor | None  # its delta there (times the column's scale)


def unsupported_reason(qt: QuantizedTensor) -> str | None:
    """Why `qt` cannot use the kernel (None when it can)."""
    if qt.kind == "vector":
        return "vector codebooks have no fused kernel yet"
    if qt.axis != 0:
        return "per-column (axis 1) layouts have no kernel"
    if qt.group_size % 8:
        return f"group size {qt.group_size} is not a multiple of 8"
    return None


def _address_offset(tensor: torch.Tensor, base: torch.Tensor) -> int:
    """Elements from `base`'s first element to `tensor`'s (both on one device, same dtype)."""
    delta = tensor.data_ptr() - base.data_ptr()
    if delta % tensor.element_size():
        raise ValueError("tensors are not aligned to their element size")
    return delta // tensor.element_size()


def _prepare_rows(qt: QuantizedTensor) -> _RowLaunch:
    """Row order by width, each row's offsets into its width's stream and codebooks (one segment per row)."""
    rows, cols = qt.shape
    device = qt.bitmap.device
    widths = qt.bitmap[:, 0].to(torch.int64)
    order = torch.argsort(widths, stable=True)
    sorted_widths = widths[order]
    # rank of each row among the rows of its width = its segment index in that width's stream
    position = torch.arange(rows, device=device) - torch.searchsorted(sorted_widths, sorted_widths)

    def per_width(tensors: dict[int, torch.Tensor]) -> torch.Tensor:
        """Offset of each sorted row's width's tensor from the first width's."""
        offsets = torch.zeros(9, dtype=torch.int64)
        for b in qt.widths:
            offsets[b] = _address_offset(tensors[b], tensors[qt.widths[0]])
        return offsets.to(device)[sorted_widths]

    code_off = per_width(qt.codes) + position * (cols // 8) * sorted_widths
    uniform = qt.kind == "uniform"
    empty_f, empty_i = torch.zeros(1, device=device), torch.zeros(1, dtype=torch.int32, device=device)
    if uniform:
        table, table_off = empty_f, torch.zeros(1, dtype=torch.int64, device=device)
        scale = qt.scales[order, 0].float()
        zero = torch.zeros(rows, dtype=torch.int32, device=device)
        for b in qt.widths:
            mask = sorted_widths == b
            zero[mask] = unpack_codes(qt.zeros[b], b, int(mask.sum())).to(torch.int32)
    else:
        table = qt.codebooks[qt.widths[0]]
        table_off = per_width(qt.codebooks) + position * (1 << sorted_widths)
        scale, zero = empty_f, empty_i
    return _RowLaunch(
        qt.codes[qt.widths[0]], table, order.to(torch.int32), sorted_widths.to(torch.int32), code_off, table_off,
        scale, zero, uniform,
    )  # fmt: skip


def _prepare_groups(qt: QuantizedTensor) -> list[_Launch]:
    """One launch per width: the (row, first column) of each of its segments, and its tables."""
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
    return launches


def prepare(qt: QuantizedTensor) -> PreparedMatrix:
    """Launch data (row layouts: one launch; grouped: one per width), and the outlier corrections."""
    rows, cols = qt.shape
    row_layout = qt.group_size == cols
    row_launch = _prepare_rows(qt) if row_layout else None
    launches = [] if row_layout else _prepare_groups(qt)
    o_rows = o_cols = deltas = coded_index = coded_deltas = None
    corrections = outlier_corrections(qt)
    if corrections is not None:
        o_rows, o_cols, deltas = corrections
        # y = W_coded · (x / s)[perm]: the outlier at original column c sits at coded column perm⁻¹(c), times s[c]
        coded_cols, coded_deltas = o_cols, deltas
        if qt.perm is not None:
            coded_cols = torch.argsort(qt.perm.to(torch.int64))[o_cols]
        if qt.col_scale is not None:
            coded_deltas = deltas * qt.col_scale.float()[o_cols]
        coded_index = o_rows * cols + coded_cols
    return PreparedMatrix(
        rows, cols, qt.group_size, launches, row_launch, qt.perm, qt.col_scale, o_rows, o_cols, deltas,
        coded_index, coded_deltas,
    )  # fmt: skip


def dequantize_coded(prepared: PreparedMatrix, dtype: torch.dtype = torch.float16) -> torch.Tensor:
    """The dense coded matrix (columns in coded order, before the scaling vector), outliers included."""
    rows, cols = prepared.out_features, prepared.in_features
    out = torch.empty(rows, cols, dtype=dtype, device=(prepared.row_launch or prepared.launches[0]).codes.device)
    r = prepared.row_launch
    if r is not None:
        block_r, block_k = (8, 64) if _ROW_FIXED else (16, 256)
        _row_dequant_kernel[(triton.cdiv(rows, block_r), triton.cdiv(cols, block_k))](
            r.codes, r.table, out, r.rows, r.bits, r.code_off, r.table_off, r.scale, r.zero,
            rows, cols, out.stride(0), UNIFORM=r.uniform, BLOCK_R=block_r, BLOCK_K=block_k,
        )  # fmt: skip
    block_k = min(64, triton.next_power_of_2(prepared.group_size))
    for launch in prepared.launches:
        n_seg = launch.seg_row.numel()
        _group_dequant_kernel[(triton.cdiv(n_seg, BLOCK_S),)](
            launch.codes, launch.table, launch.zeros, launch.seg_row, launch.seg_col, out,
            n_seg, prepared.group_size, out.stride(0),
            BITS=launch.bits, UNIFORM=launch.uniform, BLOCK_S=BLOCK_S, BLOCK_K=block_k,
        )  # fmt: skip
    if prepared.coded_outlier_index is not None:
        out.view(-1).index_add_(0, prepared.coded_outlier_index, prepared.coded_outlier_deltas.to(dtype))
    return out


def lut_matmul(prepared: PreparedMatrix, x: torch.Tensor) -> torch.Tensor:
    """y = x Wᵀ for any number of rows of x (prefill): one decode into a transient dense matrix, one GEMM.

    The dense matrix lives only for this call (one layer's worth of memory at a time); the product is
    the library's matmul on x's dtype (tensor cores for fp16/bf16 on CUDA).
    """
    if x.dim() != 2 or x.shape[1] != prepared.in_features:
        raise ValueError(f"x must be (tokens, {prepared.in_features}), got {tuple(x.shape)}")
    return coded_input(x, prepared.perm, prepared.col_scale).to(x.dtype) @ dequantize_coded(prepared, x.dtype).t()


def lut_matvec(prepared: PreparedMatrix, x: torch.Tensor) -> torch.Tensor:
    """y = W x for x of shape (batch ≤ 8, in_features); float32 result (batch, out_features)."""
    if x.dim() != 2 or x.shape[1] != prepared.in_features or x.shape[0] > MAX_BATCH:
        raise ValueError(f"x must be (batch <= {MAX_BATCH}, {prepared.in_features}), got {tuple(x.shape)}")
    xs = coded_input(x, prepared.perm, prepared.col_scale)
    batch = x.shape[0]
    y = torch.zeros(batch, prepared.out_features, dtype=torch.float32, device=x.device)
    block_b = triton.next_power_of_2(batch)
    r = prepared.row_launch
    if r is not None:
        rows, cols = prepared.out_features, prepared.in_features

        args = (r.codes, r.table, xs, y, r.rows, r.bits, r.code_off, r.table_off, r.scale, r.zero,
                rows, cols, xs.stride(0), y.stride(0), batch)  # fmt: skip
        key = (rows, cols, block_b, r.uniform)
        config = _ROW_FIXED or _ROW_TUNED.get(key)
        if config is None:  # first product of this shape: the autotuner times the configurations

            def grid(meta):
                return (triton.cdiv(rows, meta["BLOCK_R"]), triton.cdiv(cols, meta["K_SPLIT"]))

            _row_kernel[grid](*args, UNIFORM=r.uniform, BLOCK_B=block_b)
            best = _row_kernel.best_config
            _ROW_TUNED[key] = {**best.kwargs, "num_warps": best.num_warps, "num_stages": best.num_stages}
        else:  # launched directly: the autotuner's dispatch costs about 35 µs of Python per call
            grid = (triton.cdiv(rows, config["BLOCK_R"]), triton.cdiv(cols, config["K_SPLIT"]))
            _row_lut_kernel[grid](*args, UNIFORM=r.uniform, BLOCK_B=block_b, **config)
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
