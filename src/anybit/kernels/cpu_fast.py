"""The fast CPU path: products on integer dot products, from codes re-laid at load time (`int8_lut.c`).

What it changes, numerically, against the exact paths: each token's activations are rounded to two int8
parts with one step (x ~ s (hi + lo / 256), s = max|x| / 127: about 15 bits, so that an outlying activation
does not flatten the rest), and each codebook's entries to one int8 part of its largest magnitude / 127
(`tables="int8"`, the default: one token then multiplies each block twice, not three times) or likewise to two
(`"int16"`) (uniform grids stay exact: their codes are the integers); the product of the two low parts is left
out, except on the AVX2 path, which multiplies the activations as whole int16 values (256 hi + lo), one
madd_epi16 per two weights and a register of tokens, and each codebook entry as its int8 part (looked up as an
unsigned byte and multiplied as a code is) or, with `"int16"`, as one integer of 12 bits (a step of its largest
magnitude / 2047, no coarser than fp16's at that magnitude), so that the products sum in int32.
`benchmarks/fast_path_quality.py` measures what this costs in perplexity; tests bound each product by the
error these roundings allow.

Re-laid codes take the same bytes as the stored ones (per 64 codes of a b-bit segment, the stored 8 b bytes on
the AVX-512 path, runs of their 4-, 2- and 1-bit parts on AVX2, b 64-bit plane words on the portable path, the
64 codes themselves at 8 bits), rows of one width together; codebook tables take 2 · 2^b bytes (a high and a
low part) and one float scale per segment.
On the AVX-512 and AVX2 paths, prompts of 16 tokens or more multiply in blocks of 16 rows, each decoded once
per 256 tokens: on AMX tiles where the CPU has them (and Linux lets the process use them), 16 rows by 16
tokens per tile product, else on vector registers, 16 (AVX-512) or 8 (AVX2) tokens' sums per register; the
same integer sums as the row path (`prompt_path`).

Served: axis-0 layouts whose segments are whole 64-column blocks (group size and row length multiples of 64),
every width 1-8, uniform or codebook, with the permutation, scaling vector and outliers of the exact path; and,
through `cpu_vector` and `cpu_columns`, vector codebooks and per-column codebooks (axis 1).
"""

from __future__ import annotations

import ctypes
import dataclasses
import functools
from dataclasses import dataclass
from pathlib import Path

import torch

from anybit.format.packing import unpack_codes
from anybit.format.qtensor import QuantizedTensor
from anybit.format.vector import CodedTensor, VectorTensor
from anybit.kernels import check_cpu_input, coded_input, cpu_unavailable, outlier_corrections
from anybit.kernels.build import CompiledKernel

BLOCK = 64  # columns per block of codes and of rounded activations
TABLE_PAD = 256  # the widest lookup reads four 64-byte registers from a table's start
RELAY_BYTES = 1 << 18  # stored bytes re-laid at once: unpacking them makes temporaries about 40 times as large
TILE_MIN_TOKENS = 16  # inputs this long multiply in blocks of rows where the build has them (int8_lut.c)
TABLES = ("int8", "int16")  # a codebook table's entries: one int8 part, or two (`_segment_tables`)
PROMPT_PATHS = ("rows", "registers", "tiles")  # PROMPT_ROWS, PROMPT_REGISTERS, PROMPT_TILES in int8_lut.c
# AVX2 tables: entries as integers of at most 12 bits, so that 32 products with the int16 activations (at most
# 32639) sum in int32: 32 · 2047 · 32639 < 2^31 (int8_lut.c's ROW_FLUSH and register_chunk)
WIDE_TABLE_MAX = 2047


_P = ctypes.c_void_p
_I = ctypes.c_int64


class Matrix(ctypes.Structure):
    """A prepared matrix as the C kernel reads it (`anybit_matrix` in `int8_lut.c`)."""

    _fields_ = [
        ("codes", _P), ("row_off", _P), ("order", _P), ("bits", _P), ("tables", _P), ("table_off", _P), ("offset", _P),
        ("scale", _P), ("rows", _I), ("cols", _I), ("group_size", _I), ("perm", _P), ("col_scale", _P),
        ("n_outliers", _I), ("outlier_start", _P), ("outlier_rows", _P), ("outlier_cols", _P),
        ("outlier_deltas", _P), ("bias", _P),
        ("dec_codes", _P), ("dec_scales", _P), ("dec_weight", _P), ("dec_fixed", _P), ("dec_row_bytes", _I),
        ("dec_k_chunk", _I), ("dec_n_fixed", _I), ("rot_signs", _P), ("rot_mix", _P), ("rot_m", _I),
        ("vq_codes", _P), ("vq_table", _P), ("vq_scale", _P), ("vq_bits", _I), ("vq_row_bytes", _I),
        ("vq_slot_shift", _I), ("vq_dim", _I), ("high_only", _I),
        ("col_codes", _P), ("col_bits", _P), ("col_tables", _P), ("col_table_off", _P), ("col_step", _P),
        ("col_block_bytes", _I), ("col_runs", _P), ("col_n_runs", _I),
    ]  # fmt: skip


@dataclass
class Compensation:
    """Dynamic error compensation as the C kernel applies it (the format of `anybit.runtime.dec`): per token,
    the k_chunk · L / 1024 channels of largest |x| (times `weight`) of each chunk of L <= 1024 input channels,
    or the `fixed` ones, add x times their 4-bit residual row."""

    codes: torch.Tensor  # uint8 (in, ceil(out / 2))
    scales: torch.Tensor  # float32 (out,)
    k_chunk: int
    weight: torch.Tensor | None = None  # float32 (in,)
    fixed: torch.Tensor | None = None  # int64 channels


def _declare(lib: ctypes.CDLL) -> None:
    lib.anybit_fast_path.restype = ctypes.c_int
    lib.anybit_fast_path.argtypes = []
    lib.anybit_fast_matmul.restype = ctypes.c_int
    lib.anybit_fast_matmul.argtypes = [ctypes.POINTER(Matrix), _P, _I, _P, ctypes.c_int]
    lib.anybit_fast_rows.restype = None
    lib.anybit_fast_rows.argtypes = [ctypes.POINTER(Matrix), _P, _I, _P]
    lib.anybit_fast_prompt_path.restype = ctypes.c_int
    lib.anybit_fast_prompt_path.argtypes = [ctypes.c_int]
    lib.anybit_fast_token_path.restype = ctypes.c_int
    lib.anybit_fast_token_path.argtypes = [ctypes.POINTER(Matrix), _I]
    lib.anybit_vector_dequantize.restype = None
    lib.anybit_vector_dequantize.argtypes = [ctypes.POINTER(Matrix), _P, ctypes.c_int]


KERNEL = CompiledKernel(Path(__file__).with_name("int8_lut.c"), _declare)


def code_path() -> str:
    """The code path the compiled kernel runs: "avx512", "avx2", "portable", or why there is none."""
    lib = KERNEL.library()
    return lib if isinstance(lib, str) else ("portable", "avx2", "avx512")[lib.anybit_fast_path()]


def prompt_path(choice: str | None = None) -> str:
    """How prompts (TILE_MIN_TOKENS tokens or more) multiply: "tiles" (AMX), "registers" (blocks of rows on
    AVX-512 or AVX2 registers) or "rows" (row by row, as single tokens do; on AVX-512 it also turns off the
    blocks of rows that 4-15 tokens multiply in). `choice` sets it, within what the
    build, the CPU and the system allow ("tiles" falls back to "registers" where the tiles are not available,
    both to "rows" on the portable path); None only asks. Returns the path now in use."""
    lib = KERNEL.library()
    if isinstance(lib, str):
        return "rows"
    if choice is not None and choice not in PROMPT_PATHS:
        raise ValueError(f"prompt path {choice!r} is not one of {', '.join(PROMPT_PATHS)}")
    return PROMPT_PATHS[lib.anybit_fast_prompt_path(-1 if choice is None else PROMPT_PATHS.index(choice))]


def unavailable(qt: CodedTensor) -> str:
    """Why the fast path cannot serve this tensor ("" when it can)."""
    layout = _other_layout(qt)
    return layout.unavailable(qt) if layout else cpu_unavailable(qt, KERNEL.library(), BLOCK)


def _other_layout(qt: CodedTensor):
    """The module that prepares `qt` for this kernel where it is not an axis-0 segment layout: `kernels.
    cpu_vector` (vector codebooks) or `kernels.cpu_columns` (per-column codebooks); None for this module's own.
    (Both import this module.)"""
    if isinstance(qt, VectorTensor):
        from anybit.kernels import cpu_vector

        return cpu_vector
    if qt.axis == 1:
        from anybit.kernels import cpu_columns

        return cpu_columns
    return None


class PreparedMatrix:
    """What every layout prepared for this kernel shares: its C structure (built once where nothing is added
    to it) and its input rotation as the kernel reads it. Subclasses hold `qt` and build the structure in
    `_build_matrix` from the fields `matrix_extras` gives."""

    def matrix(self, bias: torch.Tensor | None = None, dec: Compensation | None = None, rotate: bool = False) -> Matrix:
        """The C structure over these tensors, a float32 `bias` and a compensation (which the caller keeps
        alive); with `rotate`, the kernel applies the tensor's input rotation itself (callers that pass it the
        input as given: the native decoder; `product` takes R x). Without any, built once and kept (every product
        passes it)."""
        rotated = rotate and self.qt.rotation is not None
        if bias is None and dec is None and not rotated:
            return self._plain_matrix
        return self._build_matrix(matrix_extras(bias, dec, self._rotation if rotated else None))

    @functools.cached_property
    def _rotation(self) -> tuple[torch.Tensor, torch.Tensor]:
        return rotation_operands(self.qt)

    @functools.cached_property
    def _plain_matrix(self) -> Matrix:
        return self._build_matrix(matrix_extras(None, None, None))

    def _build_matrix(self, extras: dict) -> Matrix:
        raise NotImplementedError


@dataclass
class FastPrepared(PreparedMatrix):
    """A tensor re-laid for the fast kernel; segments in row-major order."""

    qt: QuantizedTensor
    codes: torch.Tensor  # uint8: every row's segments, 8 b bytes per block of 64 codes (see `_kernel_layout`)
    row_offset: torch.Tensor  # int64 (rows,): byte offset of each row in `codes`
    order: torch.Tensor  # int64 (rows,): the rows in the order the kernel takes them, rows of one width together
    bits: torch.Tensor  # uint8 (segments,)
    tables: torch.Tensor | None  # uint8: per codebook segment, its high then its low table (`_segment_tables`)
    table_offset: torch.Tensor | None  # int64 (segments,)
    offset: torch.Tensor  # int16 (segments,): subtracted from each value (zero point, or 128 for tables)
    scale: torch.Tensor  # float32 (segments,)
    perm: torch.Tensor | None  # int64: the coded column order
    col_scale: torch.Tensor | None  # float32: the scaling vector
    # by the rows' positions in `order`: int64 (rows + 1,) where each position's outliers start, then int32 rows,
    # int32 columns and float32 (stored - decoded) deltas
    outliers: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None
    owns_codes: bool = True  # False: `codes` is the stored stream itself (one width, read as stored)
    high_only: bool = False  # the low tables hold zero parts, which the one-token products skip (int8 tables)
    # int64 (groups,): the stored column groups in the kernel's order (`_group_order`), which the per-segment
    # fields and `perm` follow; None: the stored order
    group_order: torch.Tensor | None = None

    def nbytes(self) -> int:
        """Bytes the kernel holds besides the stored tensors: the re-laid codes (unless it reads the stored
        ones), the segment tables, the outliers in the kernel's row order and a column order of its own."""
        held = [self.row_offset, self.order, self.bits, self.offset, self.scale] + [self.codes] * self.owns_codes
        held += [t for t in (self.tables, self.table_offset) if t is not None]
        held += list(self.outliers or ())
        if self.group_order is not None:
            held += [self.group_order, self.perm]
        return sum(t.numel() * t.element_size() for t in held)

    def stored_order(self, per_segment: torch.Tensor) -> torch.Tensor:
        """A per-segment field (`bits`, `offset`, `scale`, `table_offset`) in the stored segments' order."""
        if self.group_order is None:
            return per_segment
        rows, groups = self.qt.bitmap.shape
        return per_segment.view(rows, groups)[:, torch.argsort(self.group_order)].reshape(-1)

    def _build_matrix(self, extras: dict) -> Matrix:
        start, rows, cols, deltas = self.outliers if self.outliers is not None else (None,) * 4
        return Matrix(
            codes=self.codes.data_ptr(), row_off=self.row_offset.data_ptr(), order=self.order.data_ptr(),
            bits=self.bits.data_ptr(), tables=pointer(self.tables), table_off=pointer(self.table_offset),
            offset=self.offset.data_ptr(), scale=self.scale.data_ptr(), rows=self.qt.shape[0], cols=self.qt.shape[1],
            group_size=self.qt.group_size, perm=pointer(self.perm), col_scale=pointer(self.col_scale),
            n_outliers=0 if cols is None else cols.numel(), outlier_start=pointer(start), outlier_rows=pointer(rows),
            outlier_cols=pointer(cols), outlier_deltas=pointer(deltas), high_only=int(self.high_only), **extras,
        )  # fmt: skip


def rotation_operands(qt) -> tuple[torch.Tensor, torch.Tensor]:
    """A tensor's input rotation as the kernel reads it: the signs as float32 ±1, the mixing matrix."""
    rotation, cols = qt.rotation, qt.shape[1]
    return rotation.sign_vector(cols).contiguous(), rotation.mix.float().contiguous()


def matrix_extras(
    bias: torch.Tensor | None, dec: Compensation | None, rotation: tuple[torch.Tensor, torch.Tensor] | None
) -> dict:
    """The `Matrix` fields of a float32 bias, a compensation and a rotation (`rotation_operands`) the kernel
    applies itself; the caller keeps the tensors alive."""
    extra = {"bias": pointer(bias)}
    if rotation is not None:
        signs, mix = rotation
        extra.update(rot_signs=signs.data_ptr(), rot_mix=mix.data_ptr(), rot_m=mix.shape[0])
    if dec is not None:
        extra.update(
            dec_codes=dec.codes.data_ptr(), dec_scales=dec.scales.data_ptr(), dec_weight=pointer(dec.weight),
            dec_fixed=pointer(dec.fixed), dec_row_bytes=dec.codes.shape[1], dec_k_chunk=dec.k_chunk,
            dec_n_fixed=0 if dec.fixed is None else dec.fixed.numel(),
        )  # fmt: skip
    return extra


def pointer(tensor: torch.Tensor | None) -> int | None:
    return None if tensor is None else tensor.data_ptr()


def _kernel_layout(stored: torch.Tensor, b: int, group_size: int) -> torch.Tensor:
    """A chunk of stored segments (each group_size // 8 * b bytes) as the compiled kernel reads them: as
    stored on the AVX-512 path, in 4-, 2- and 1-bit parts on the AVX2 path (`_part_runs`), else as 64-bit
    plane words (`_plane_words`)."""
    path = code_path()
    if path == "avx512":
        return stored.view(-1, group_size // 8 * b)
    codes = unpack_codes(stored, b, stored.numel() // b * 8, torch.uint8).view(-1, group_size)
    return _part_runs(codes, b) if path == "avx2" else _plane_words(codes, b)


def _part_runs(codes: torch.Tensor, b: int) -> torch.Tensor:
    """(segments, blocks * 64) codes as (segments, blocks * b * 8) bytes in the AVX2 layout: per block,
    `part_runs` (4 bits: byte i = p[i] | p[i + 32] << 4; 2 bits: byte i = p[i] | p[i + 16] << 2 | p[i + 32] << 4 |
    p[i + 48] << 6; 1 bit: bit k of byte i = p[i + 8 k]); 8-bit codes stay one byte each, in order."""
    if b == 8:
        return codes.contiguous()
    n, length = codes.shape
    return part_runs(codes.view(n, length // BLOCK, BLOCK), b).view(n, -1)


def part_runs(units: torch.Tensor, b: int) -> torch.Tensor:
    """b-bit codes (n, units, u) as bytes (n, units, u b / 8): each unit's codes split into parts of 4, 2 and 1
    bits from the low bits up (b = 3: 2 + 1; 5: 4 + 1; 6: 4 + 2; 7: 4 + 2 + 1), each part a run of its own in
    which the codes sharing a byte are u / (8 / part) apart (byte i = Σ_k p[i + k u part / 8] << part k)."""
    n, count, u = units.shape
    runs, shift = [], 0
    for part in (4, 2, 1):
        if not b & part:
            continue
        p = (units >> shift) & ((1 << part) - 1)
        per_byte = 8 // part
        slices = p.view(n, count, per_byte, u // per_byte)
        byte = slices[:, :, 0].clone()
        for k in range(1, per_byte):
            byte |= slices[:, :, k] << (part * k)
        runs.append(byte)
        shift += part
    return torch.cat(runs, dim=2)


def _plane_words(codes: torch.Tensor, b: int) -> torch.Tensor:
    """(segments, blocks * 64) codes as (segments, blocks * b * 8) bytes: per block, b little-endian words
    of 64 bits, word q holding bit q of the block's codes; 8-bit codes stay one byte each, in order."""
    if b == 8:
        return codes.contiguous()
    n, length = codes.shape
    blocks = codes.view(n, length // BLOCK, 1, BLOCK // 8, 8)
    planes = torch.empty(n, length // BLOCK, b, BLOCK // 8, dtype=torch.uint8)
    for q in range(b):
        bits = (blocks >> q) & 1
        byte = bits[..., 0].clone()
        for i in range(1, 8):
            byte |= bits[..., i] << i
        planes[:, :, q] = byte[:, :, 0]
    return planes.view(n, -1)


def _segment_tables(books: torch.Tensor, high_only: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """fp16 codebooks (segments, 2^b) as uint8 tables (segments, 2 · 2^b), a high part then a low part, and
    their float32 scales, with book ~ scale (high − 128 + (low − low_table_offset()) / 256): with `high_only`
    the high part alone, 128 + an int8 part of the largest magnitude / 127 (the low parts zero); else on the
    AVX2 path one integer w (|w| ≤ WIDE_TABLE_MAX) per entry, its high and low bytes, so that products sum in
    int32 (`int8_lut.c`), elsewhere two int8 parts, 128 + hi and 128 + lo."""
    values = books.float()
    if code_path() == "avx2" and not high_only:
        step = values.abs().amax(dim=1) / WIDE_TABLE_MAX
        step = torch.where(step > 0, step, torch.ones_like(step))
        wide = torch.round(values / step[:, None]).clamp(-WIDE_TABLE_MAX, WIDE_TABLE_MAX).to(torch.int32)
        high, low = (wide >> 8) + 128, wide & 255
        return torch.cat([high, low], dim=1).to(torch.uint8), step * 256
    scale = values.abs().amax(dim=1) / 127
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    scaled = values / scale[:, None]
    high = torch.round(scaled).clamp(-127, 127)
    low = torch.zeros_like(high) if high_only else torch.round((scaled - high) * 256).clamp(-127, 127)
    return torch.cat([high + 128, low + low_table_offset()], dim=1).to(torch.uint8), scale


def low_table_offset() -> int:
    """What a low table's byte carries besides its part: 128 (a signed part, stored shifted), or 0 on the AVX2
    path, whose low byte is the entry's own."""
    return 0 if code_path() == "avx2" else 128


def _group_order(qt: QuantizedTensor) -> torch.Tensor | None:
    """The column groups ordered by width where every row has the same mixed widths (SliM-LLM's bit maps): a
    row then multiplies in a few runs of one width instead of switching width at every segment (1.2-1.4x the
    stored order's speed at one token on AVX2, layout_ab.py); None where the stored order is kept."""
    bitmap = qt.bitmap
    if len(qt.widths) == 1 or not torch.equal(bitmap, bitmap[:1].expand_as(bitmap)):
        return None
    order = torch.sort(bitmap[0], stable=True).indices.to(torch.int64)
    return None if torch.equal(order, torch.arange(order.numel())) else order


def _kernel_perm(qt: QuantizedTensor, group_order: torch.Tensor | None) -> torch.Tensor | None:
    """The input column each of the kernel's coded columns reads: the stored `perm`, its groups in
    `group_order`."""
    perm = None if qt.perm is None else qt.perm.to(torch.int64)
    if group_order is not None:
        columns = (group_order[:, None] * qt.group_size + torch.arange(qt.group_size)).reshape(-1)
        perm = columns if perm is None else perm[columns]
    return None if perm is None else perm.contiguous()


def check_tables(tables: str) -> None:
    """A ValueError unless `tables` is one of TABLES."""
    if tables not in TABLES:
        raise ValueError(f"tables must be one of {', '.join(TABLES)}, got {tables!r}")


def prepare(qt: CodedTensor, tables: str = "int8"):
    """The fast kernel's view of a tensor it serves (see `unavailable`): its codes re-laid, or the stored
    ones where they are in the kernel's layout already (`FastPrepared`; `cpu_vector.VectorPrepared` for
    vector codebooks, `cpu_columns.ColumnPrepared` for per-column ones). `tables` (one of TABLES): codebook
    entries rounded to one int8 part per row's table, which one token multiplies with two integer products per
    weight instead of three (AVX-512 and the portable path) or with one table lookup instead of two (AVX2), or
    to two parts (12-bit integers on AVX2); per-column tables keep 12 bits either way (`cpu_columns`)."""
    check_tables(tables)
    if layout := _other_layout(qt):
        return layout.prepare(qt)
    reason = unavailable(qt)
    if reason:
        raise ValueError(reason)
    high_only = tables == "int8" and qt.kind != "uniform"
    rows, groups = qt.bitmap.shape
    widths = qt.bitmap.reshape(-1).to(torch.int64)
    order = torch.sort(qt.bitmap[:, 0], stable=True).indices.to(torch.int64)  # rows of one width together
    group_order = _group_order(qt)
    kernel_groups = torch.arange(groups) if group_order is None else group_order
    segment_bytes = widths * (qt.group_size // 8)
    row_bytes = segment_bytes.view(rows, groups).sum(dim=1)
    row_offset = torch.empty(rows, dtype=torch.int64)
    row_offset[order] = torch.cumsum(row_bytes[order], 0) - row_bytes[order]  # laid out in the kernel's order
    laid_bytes = segment_bytes.view(rows, groups)[:, kernel_groups]  # a row's segments in the kernel's order
    segment_start = torch.empty(rows, groups, dtype=torch.int64)
    segment_start[:, kernel_groups] = row_offset[:, None] + torch.cumsum(laid_bytes, 1) - laid_bytes
    segment_start = segment_start.view(-1)
    # one width on the AVX-512 path: the stored stream is the kernel's layout already (rows in order)
    shared = len(qt.widths) == 1 and code_path() == "avx512"
    codes = qt.codes[qt.widths[0]] if shared else torch.empty(int(segment_bytes.sum()), dtype=torch.uint8)
    uniform = qt.kind == "uniform"
    offset = torch.full((widths.numel(),), 128, dtype=torch.int16)
    scale = qt.scales.reshape(-1).float().contiguous() if uniform else torch.empty(widths.numel())
    table_size = 2 << widths  # a high and a low table
    table_offset = None if uniform else torch.cumsum(table_size, 0) - table_size
    tables = None if uniform else torch.zeros(int(table_size.sum()) + TABLE_PAD, dtype=torch.uint8)
    for b in qt.widths:  # a width's segments are stored in row-major order
        seg = (widths == b).nonzero()[:, 0]
        stored_bytes = qt.group_size // 8 * b  # one segment's packed codes
        if not shared:
            chunk = max(1, RELAY_BYTES // stored_bytes)  # segments at a time
            for start in range(0, seg.numel(), chunk):
                part = seg[start : start + chunk]
                packed = qt.codes[b][start * stored_bytes : (start + part.numel()) * stored_bytes]
                where = segment_start[part][:, None] + torch.arange(stored_bytes)
                codes[where] = _kernel_layout(packed, b, qt.group_size)
        if uniform:
            offset[seg] = unpack_codes(qt.zeros[b], b, seg.numel(), torch.int16)
        else:
            entries, scale[seg] = _segment_tables(qt.codebooks[b], high_only)
            tables[(table_offset[seg][:, None] + torch.arange(2 << b)).reshape(-1)] = entries.reshape(-1)
    bits = widths.to(torch.uint8)
    if group_order is not None:  # the per-segment fields in the kernel's order
        kernel_segments = (torch.arange(rows)[:, None] * groups + group_order).reshape(-1)
        bits, offset, scale = bits[kernel_segments], offset[kernel_segments], scale[kernel_segments].contiguous()
        table_offset = None if table_offset is None else table_offset[kernel_segments]
    perm = _kernel_perm(qt, group_order)
    col_scale = None if qt.col_scale is None else qt.col_scale.float().contiguous()
    return FastPrepared(
        qt, codes, row_offset, order, bits, tables, table_offset, offset, scale, perm, col_scale,
        outliers_in_order(qt, order),
        owns_codes=not shared, high_only=high_only, group_order=group_order,
    )  # fmt: skip


def outliers_in_order(qt: QuantizedTensor, order: torch.Tensor) -> tuple[torch.Tensor, ...] | None:
    """`outlier_corrections` sorted by their rows' positions in `order`: where each position's entries start
    (rows + 1), then int32 rows, int32 columns and the deltas."""
    corrections = outlier_corrections(qt)
    if corrections is None:
        return None
    rows, cols, deltas = corrections
    position = torch.argsort(order)[rows.to(torch.int64)]
    by_position = torch.sort(position, stable=True).indices
    start = torch.zeros(qt.shape[0] + 1, dtype=torch.int64)
    start[1:] = torch.cumsum(torch.bincount(position, minlength=qt.shape[0]), 0)
    return start, *(t[by_position].to(torch.int32).contiguous() for t in (rows, cols)), deltas[by_position].float()


def product(prepared, x: torch.Tensor) -> torch.Tensor:
    """y = x Ŵᵀ for x of shape (tokens, in_features), any number of tokens; float32 (tokens, out_features)."""
    if not isinstance(prepared, FastPrepared):
        return _other_layout(prepared.qt).product(prepared, x)
    check_cpu_input(x, prepared.qt.shape[1])
    return matmul(prepared.matrix(), x)


TOKEN_PATHS = ("rows", "few", "registers", "tiles")


def token_path(prepared: FastPrepared, tokens: int) -> str:
    """How `tokens` tokens multiply with this matrix: one of TOKEN_PATHS ("few": blocks of rows for 4-15
    tokens on AVX-512; "registers", "tiles": see `prompt_path`)."""
    return TOKEN_PATHS[KERNEL.library().anybit_fast_token_path(ctypes.byref(prepared.matrix()), tokens)]


def matmul(matrix: Matrix, x: torch.Tensor) -> torch.Tensor:
    """y = x Wᵀ for the prepared matrix `matrix` and a CPU input x (tokens, cols); float32 (tokens, rows)."""
    x = x.float().contiguous()
    y = torch.empty(x.shape[0], matrix.rows, dtype=torch.float32)
    status = KERNEL.library().anybit_fast_matmul(
        ctypes.byref(matrix), x.data_ptr(), x.shape[0], y.data_ptr(), torch.get_num_threads()
    )
    if status:
        raise MemoryError("the fast CPU kernel could not allocate its scratch for the rounded activations")
    return y


def rows(prepared: FastPrepared, ids: torch.Tensor) -> torch.Tensor:
    """Rows `ids` (1-D) of a matrix of 8-bit segments, decoded as the kernel multiplies them (an embedding
    lookup from the 8-bit head's re-laid copy); float32 (len(ids), in_features)."""
    if prepared.qt.widths != [8]:
        raise ValueError(f"rows() decodes 8-bit matrices, not widths {prepared.qt.widths}")
    ids = ids.reshape(-1).to(torch.int64).contiguous()
    if ids.numel():
        low, high = (int(v) for v in ids.aminmax())  # one reduction: every decode step looks a token up
        if not 0 <= low <= high < prepared.qt.shape[0]:
            raise IndexError(f"row ids must lie in [0, {prepared.qt.shape[0]})")
    out = torch.empty(ids.numel(), prepared.qt.shape[1], dtype=torch.float32)
    matrix = prepared.matrix()
    KERNEL.library().anybit_fast_rows(ctypes.byref(matrix), ids.data_ptr(), ids.numel(), out.data_ptr())
    return out


def low_product_included() -> bool:
    """Whether the kernel's sums include the product of the activations' and the tables' low parts: the AVX2
    path multiplies both as whole int16 values; the others leave it out."""
    return code_path() == "avx2"


def emulate(prepared: FastPrepared, x: torch.Tensor) -> torch.Tensor:
    """What `product` computes, in torch (float64): the rounded activations times the rounded weights, less
    the product of their low parts where the path leaves it out (`low_product_included`). Tests compare the
    kernel with it, and with the exact product within the roundings' bound."""
    qt = prepared.qt
    high_x, low_x = input_parts(coded_input(x, qt.perm, qt.col_scale).float())
    high_w, low_w = weight_parts(prepared)
    high_x, low_x, high_w, low_w = (t.double() for t in (high_x, low_x, high_w, low_w))
    y = high_x @ high_w.t() + low_x @ high_w.t() + high_x @ low_w.t()
    if low_product_included():
        y += low_x @ low_w.t()
    if prepared.outliers is not None:
        _, out_rows, out_cols, deltas = prepared.outliers
        y.index_add_(1, out_rows.long(), deltas.double()[None, :] * x.double()[:, out_cols.long()])
    return y


def input_parts(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Activations (tokens, cols) as the kernel rounds them, s hi and s lo / 256: per token, s = max|x| / 127,
    int8 hi = round(x / s) and int8 lo = round(256 (x / s - hi)); float32."""
    amax = x.float().abs().amax(dim=1, keepdim=True)
    inverse = torch.where(amax > 0, 127 / amax, torch.zeros_like(amax))
    scaled = x.float() * inverse
    hi = torch.round(scaled).clamp(-127, 127)
    lo = torch.round((scaled - hi) * 256).clamp(-127, 127)
    step = amax / 127
    return hi * step, lo * (step / 256)


def weight_parts(prepared: FastPrepared) -> tuple[torch.Tensor, torch.Tensor]:
    """The coded matrix (coded column order, before outliers) as the kernel multiplies it: for codebooks the
    high and low parts of its tables times their scales, for uniform grids the matrix and zeros; float32."""
    qt = prepared.qt
    if qt.kind != "codebook":
        plain = dataclasses.replace(qt, perm=None, col_scale=None, outliers=None)
        high = plain.dequantize(torch.float32)
        return high, torch.zeros_like(high)
    widths = qt.bitmap.reshape(-1).to(torch.int64)
    table_offset, scale = prepared.stored_order(prepared.table_offset), prepared.stored_order(prepared.scale)
    parts = []
    for part in (0, 1):
        books = {}
        for b in qt.widths:
            seg = (widths == b).nonzero()[:, 0]
            where = table_offset[seg][:, None] + part * (1 << b) + torch.arange(1 << b)
            entries = prepared.tables[where].float() - (low_table_offset() if part else 128)
            books[b] = entries * scale[seg][:, None] / (256 if part else 1)
        plain = dataclasses.replace(qt, perm=None, col_scale=None, outliers=None, codebooks=books)
        parts.append(plain.dequantize(torch.float32))
    return parts[0], parts[1]


def rounded_weight(prepared: FastPrepared) -> torch.Tensor:
    """The coded matrix as the kernel sees it (the sum of `weight_parts`); float32 (rows, cols)."""
    high, low = weight_parts(prepared)
    return high + low
