"""`QuantizedTensor`: one quantized weight matrix as it is stored, with its exact storage cost.

A weight W of shape (out_features, in_features) is coded as *lines* cut into *segments*:

- axis 0: a line is a row of W (an output channel), cut into segments of `group_size` input columns;
- axis 1: a line is a column of W (an input channel), cut into segments of `group_size` rows.

Every segment has its own bit width (the bit map, shape (lines, groups); stored as one byte when
constant, as one 3-bit width per group when all lines agree, else as 3 bits per segment) and is either

- uniform: w = (q - zero) * scale, with an fp16 scale and a `b`-bit integer zero per segment, or
- codebook: w = codebook[q], with a codebook of 2**b fp16 values per segment.

Codes of all segments of one width are packed together (`packing.py`), in row-major segment order.
Optional extras: `perm`, the order in which input columns were coded (act-order: the coded matrix is
W[:, perm]); `col_scale`, one fp16 factor per input column (SKIM's scaling vector: the coded matrix
is W·diag(col_scale), decoding divides it back out); sparse fp16 outliers that replace the
dequantized value where they sit; and `rotation`, an orthogonal transform R of the input dimension
(`format.rotation`): everything above describes W' = W Rᵀ, and the weight is W' R (products multiply W' by
the rotated input R x).

Storage is counted, not claimed: `storage_bits()` is the byte size of exactly the tensors that
`to_tensors()` hands to the file, times eight.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from anybit.format.packing import pack_codes, packed_nbytes, unpack_codes
from anybit.format.rotation import InputRotation, fits
from anybit.memory import release_file_pages
from anybit.quant.grid import dequantize_from_grid

KINDS = ("uniform", "codebook")
BITMAP_WIDTH = 3  # widths 1-8 stored as (b - 1) in 3 bits when the map is not constant


def smallest_uint(max_value: int) -> torch.dtype:
    """The narrowest integer dtype that holds 0..max_value (uint8, int16 or int32)."""
    if max_value < 2**8:
        return torch.uint8
    return torch.int16 if max_value < 2**15 else torch.int32


def index_dtype(n_columns: int) -> torch.dtype:
    """The stored dtype of column indices below `n_columns` (permutations, outlier columns)."""
    return torch.int16 if n_columns < 2**15 else torch.int32


@dataclass(frozen=True)
class SparseOutliers:
    """Weights kept in fp16 over the dense (out, in) matrix, row-compressed; they replace the coded value.

    Stored: the number of outliers of each row (narrowest integer type), their column indices (int16
    below 32768 columns) and their fp16 values, row by row.
    """

    row_counts: torch.Tensor  # (out_features,)
    col_idx: torch.Tensor
    values: torch.Tensor  # float16

    @staticmethod
    def from_mask(W: torch.Tensor, mask: torch.Tensor) -> SparseOutliers:
        """Keep W where mask is True."""
        rows, cols = mask.nonzero(as_tuple=True)
        counts = torch.bincount(rows, minlength=W.shape[0])
        count_dtype = smallest_uint(int(counts.max()) if counts.numel() else 0)
        return SparseOutliers(counts.to(count_dtype), cols.to(index_dtype(W.shape[1])), W[rows, cols].to(torch.float16))

    @property
    def nnz(self) -> int:
        return int(self.values.numel())

    def storage_bits(self) -> int:
        return 8 * sum(t.numel() * t.element_size() for t in (self.row_counts, self.col_idx, self.values))

    def coordinates(self) -> tuple[torch.Tensor, torch.Tensor]:
        counts = self.row_counts.to(torch.int64)
        rows = torch.repeat_interleave(torch.arange(counts.numel(), device=counts.device), counts)
        return rows, self.col_idx.to(torch.int64)

    def apply_(self, W: torch.Tensor) -> torch.Tensor:
        """Write the outliers into W in place and return it."""
        rows, cols = self.coordinates()
        W[rows, cols] = self.values.to(W.dtype)
        return W


class CodedMatrix:
    """What every stored matrix layout shares, from its `shape`, `rotation` and `to_tensors()`: its counted
    storage and the input its coded part multiplies."""

    def storage_bits(self) -> int:
        """Exact stored size in bits: every tensor `to_tensors()` hands to the file."""
        return sum(t.numel() * t.element_size() * 8 for t in self.to_tensors().values())

    @property
    def numel(self) -> int:
        return self.shape[0] * self.shape[1]

    def bits_per_weight(self) -> float:
        return self.storage_bits() / self.numel

    def rotated_input(self, x: torch.Tensor) -> torch.Tensor:
        """What the coded part multiplies: R x for each row x of `x` where the tensor has a rotation, else x."""
        return x if self.rotation is None else self.rotation.apply(x)


@dataclass(frozen=True)
class QuantizedTensor(CodedMatrix):
    """A packed quantized matrix (layout in the module docstring)."""

    shape: tuple[int, int]
    group_size: int
    axis: int
    kind: str
    bitmap: torch.Tensor  # uint8 (lines, groups)
    codes: dict[int, torch.Tensor]  # width -> packed uint8 stream
    scales: torch.Tensor | None = None  # fp16 (lines, groups), uniform only
    zeros: dict[int, torch.Tensor] = field(default_factory=dict)  # width -> packed zero points, uniform only
    codebooks: dict[int, torch.Tensor] = field(default_factory=dict)  # width -> fp16 (segments, 2**b)
    perm: torch.Tensor | None = None  # int32 (in_features,)
    col_scale: torch.Tensor | None = None  # fp16 (in_features,): the coded matrix is W·diag(col_scale)
    outliers: SparseOutliers | None = None
    rotation: InputRotation | None = None  # the coded matrix is W Rᵀ; decoding multiplies by R

    # ---- construction -------------------------------------------------------------------------
    @staticmethod
    def _check_layout(shape: tuple[int, int], group_size: int, axis: int, bitmap: torch.Tensor) -> tuple[int, int]:
        if axis not in (0, 1):
            raise ValueError(f"axis must be 0 or 1, got {axis}")
        lines, line_len = (shape[0], shape[1]) if axis == 0 else (shape[1], shape[0])
        if group_size <= 0 or line_len % group_size:
            raise ValueError(f"group size {group_size} does not divide the line length {line_len} of a {shape} matrix")
        if tuple(bitmap.shape) != (lines, line_len // group_size):
            raise ValueError(f"bit map shape {tuple(bitmap.shape)} != {(lines, line_len // group_size)}")
        if int(bitmap.min()) < 1 or int(bitmap.max()) > 8:
            raise ValueError("bit widths must be in 1-8")
        return lines, line_len

    @classmethod
    def _pack_segments(
        cls, codes: torch.Tensor, bitmap: torch.Tensor, shape: tuple[int, int], group_size: int, axis: int
    ) -> tuple[torch.Tensor, dict[int, torch.Tensor], dict[int, torch.Tensor]]:
        """The uint8 bit map, the segment mask of each width, and the packed codes of each width."""
        bitmap = bitmap.to(torch.uint8)
        lines, _ = cls._check_layout(shape, group_size, axis, bitmap)
        segs = codes.reshape(lines, -1, group_size)
        masks = {b: bitmap == b for b in torch.unique(bitmap).tolist()}
        if len(masks) == 1:  # one width: the codes in order, without a masked copy
            (b,) = masks
            return bitmap, masks, {b: pack_codes(segs, b)}
        return bitmap, masks, {b: pack_codes(segs[mask], b) for b, mask in masks.items()}

    @staticmethod
    def _extras(perm: torch.Tensor | None, col_scale: torch.Tensor | None) -> dict:
        return {
            "perm": None if perm is None else perm.to(torch.int32),
            "col_scale": None if col_scale is None else col_scale.to(torch.float16),
        }

    @classmethod
    def from_uniform(
        cls,
        codes: torch.Tensor,
        scales: torch.Tensor,
        zeros: torch.Tensor,
        bitmap: torch.Tensor,
        shape: tuple[int, int],
        group_size: int,
        axis: int = 0,
        perm: torch.Tensor | None = None,
        outliers: SparseOutliers | None = None,
        col_scale: torch.Tensor | None = None,
    ) -> QuantizedTensor:
        """Pack integer codes (lines, line_len) with per-segment scales and integer zeros (lines, groups)."""
        bitmap, masks, packed = cls._pack_segments(codes, bitmap, shape, group_size, axis)
        packed_zeros = {b: pack_codes(zeros[mask], b) for b, mask in masks.items()}
        return cls(
            shape=tuple(shape), group_size=group_size, axis=axis, kind="uniform", bitmap=bitmap, codes=packed,
            scales=scales.to(torch.float16), zeros=packed_zeros, outliers=outliers, **cls._extras(perm, col_scale),
        )  # fmt: skip

    @classmethod
    def from_codebook(
        cls,
        codes: torch.Tensor,
        codebooks: torch.Tensor,
        bitmap: torch.Tensor,
        shape: tuple[int, int],
        group_size: int,
        axis: int = 0,
        perm: torch.Tensor | None = None,
        outliers: SparseOutliers | None = None,
        col_scale: torch.Tensor | None = None,
    ) -> QuantizedTensor:
        """Pack codes (lines, line_len) with codebooks (lines, groups, >= 2**max_bits); entries past 2**b are dropped."""
        bitmap, masks, packed = cls._pack_segments(codes, bitmap, shape, group_size, axis)
        books = {b: codebooks[mask][:, : 1 << b].to(torch.float16).contiguous() for b, mask in masks.items()}
        return cls(
            shape=tuple(shape), group_size=group_size, axis=axis, kind="codebook", bitmap=bitmap, codes=packed,
            codebooks=books, outliers=outliers, **cls._extras(perm, col_scale),
        )  # fmt: skip

    # ---- decoding -----------------------------------------------------------------------------
    @property
    def widths(self) -> list[int]:
        return sorted(self.codes)

    def code_streams(self) -> list[torch.Tensor]:
        """The packed code streams (what a kernel that re-lays them no longer reads)."""
        return list(self.codes.values())

    def unpacked_codes(self) -> dict[int, torch.Tensor]:
        """Each width's codes unpacked, (segments, group_size): int64 for codebooks (ready to index them),
        uint8 for uniform grids; `dequantize` takes them to skip unpacking."""
        out = {}
        for b in self.widths:
            n_seg = int((self.bitmap == b).sum())
            dtype = torch.uint8 if self.kind == "uniform" else torch.int64
            out[b] = unpack_codes(self.codes[b], b, n_seg * self.group_size, dtype).view(n_seg, self.group_size)
        return out

    def dequantize(
        self, dtype: torch.dtype = torch.float32, unpacked: dict[int, torch.Tensor] | None = None
    ) -> torch.Tensor:
        """The dense (out_features, in_features) weight this tensor stands for (`unpacked`: its codes as
        `unpacked_codes` gives them, when the caller keeps them)."""
        lines, groups = self.bitmap.shape
        device = self.bitmap.device
        values = torch.empty(lines, groups, self.group_size, dtype=dtype, device=device)
        codes = unpacked if unpacked is not None else self.unpacked_codes()
        for b in self.widths:
            mask = self.bitmap == b
            if self.kind == "uniform":
                zero = unpack_codes(self.zeros[b], b, codes[b].shape[0], dtype)
                scale = self.scales[mask].to(dtype)
                values[mask] = dequantize_from_grid(codes[b].to(dtype), scale[:, None], zero[:, None])
            else:
                values[mask] = torch.gather(self.codebooks[b].to(dtype), 1, codes[b])
        W = values.view(lines, groups * self.group_size)
        if self.axis == 1:
            W = W.t()
        if self.perm is not None:
            W = W[:, torch.argsort(self.perm.to(torch.int64))]
        if self.col_scale is not None:
            W = W / self.col_scale.to(dtype)[None, :]
        W = W.contiguous()
        if self.outliers is not None:
            self.outliers.apply_(W)
        if self.rotation is not None:
            W = self.rotation.unapply(W)  # W' R, row by row
        return W

    def dequantize_rows(self, rows: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Rows of the dense weight (an embedding lookup), decoding only their codes. For axis-0 tensors of
        one width, without permutation, scaling vector or outliers (what `runtime.head` stores)."""
        widths = self.widths
        if self.axis != 0 or len(widths) != 1 or self.perm is not None or self.col_scale is not None or self.rotation:
            raise ValueError(
                "dequantize_rows takes axis-0 tensors of one width, without permutation, scaling or rotation"
            )
        if self.outliers is not None:
            raise ValueError("dequantize_rows does not apply outliers")
        b, groups, cols = widths[0], self.bitmap.shape[1], self.shape[1]
        flat = rows.reshape(-1).to(torch.int64)
        row_bytes = cols // 8 * b  # every row's segments are stored together, rows in order
        index = flat[:, None] * row_bytes + torch.arange(row_bytes, device=flat.device)
        q = unpack_codes(self.codes[b][index.reshape(-1)], b, flat.numel() * cols, dtype).view(
            -1, groups, self.group_size
        )
        segments = flat[:, None] * groups + torch.arange(groups, device=flat.device)
        if self.kind == "uniform":
            # only the packed blocks (8 zero points, b bytes) that hold these segments' zero points
            block_bytes = (segments // 8)[..., None] * b + torch.arange(b, device=flat.device)
            packed = self.zeros[b][block_bytes.reshape(-1)]
            zeros = unpack_codes(packed, b, packed.numel() // b * 8, dtype).view(*segments.shape, 8)
            zeros = zeros.gather(-1, (segments % 8)[..., None])[..., 0]
            scales = self.scales.reshape(-1)[segments].to(dtype)
            values = dequantize_from_grid(q, scales[..., None], zeros[..., None])
        else:
            books = self.codebooks[b].to(dtype)[segments]  # (n, groups, 2**b)
            values = torch.gather(books, 2, q.to(torch.int64))
        return values.reshape(*rows.shape, cols)

    # ---- storage ------------------------------------------------------------------------------
    def to_tensors(self) -> dict[str, torch.Tensor]:
        """Exactly the tensors that are stored (names relative to this matrix)."""
        out: dict[str, torch.Tensor] = {}
        widths = torch.unique(self.bitmap)
        if widths.numel() == 1:
            out["bitmap"] = widths.to(torch.uint8)
        elif bool((self.bitmap == self.bitmap[:1]).all()):  # one width per group, shared by all lines
            out["bitmap_groups"] = pack_codes(self.bitmap[0].to(torch.int32) - 1, BITMAP_WIDTH)
        else:
            out["bitmap"] = pack_codes(self.bitmap.to(torch.int32) - 1, BITMAP_WIDTH)
        for b in self.widths:
            out[f"codes_{b}"] = self.codes[b]
            if self.kind == "uniform":
                out[f"zeros_{b}"] = self.zeros[b]
            else:
                out[f"codebook_{b}"] = self.codebooks[b]
        if self.scales is not None:
            out["scales"] = self.scales
        if self.perm is not None:
            out["perm"] = self.perm.to(index_dtype(self.shape[1]))
        if self.col_scale is not None:
            out["col_scale"] = self.col_scale.to(torch.float16)
        if self.outliers is not None:
            out["outliers_row_counts"] = self.outliers.row_counts
            out["outliers_col_idx"] = self.outliers.col_idx
            out["outliers_values"] = self.outliers.values
        if self.rotation is not None:
            out["rot_signs"] = self.rotation.signs
            out["rot_mix"] = self.rotation.mix
        return {k: v.contiguous() for k, v in out.items()}

    def meta(self) -> dict:
        """JSON-serializable layout description; with `to_tensors()` it rebuilds this object."""
        return {"shape": list(self.shape), "group_size": self.group_size, "axis": self.axis, "kind": self.kind}

    @classmethod
    def from_tensors(cls, meta: dict, tensors: dict[str, torch.Tensor], check: bool = True) -> QuantizedTensor:
        """Inverse of `meta()` + `to_tensors()`.

        With `check` (always, for anything read from disk), every stored tensor is validated against the
        layout the metadata describes: its presence, dtype, shape and value range; a ValueError names the
        first stored tensor that does not fit. Kernels may then trust the result.
        """
        shape, group_size, axis, kind = _parse_meta(meta)
        lines, line_len = (shape[0], shape[1]) if axis == 0 else (shape[1], shape[0])
        groups = line_len // group_size
        stored = StoredTensors(tensors, check)
        bitmap = _read_bitmap(stored, lines, groups)
        codes, zeros, books = {}, {}, {}
        for b in torch.unique(bitmap).tolist():
            n_seg = int((bitmap == b).sum())
            codes[b] = stored.take(f"codes_{b}", _BYTE, (packed_nbytes(n_seg * group_size, b),))
            if kind == "uniform":
                zeros[b] = stored.take(f"zeros_{b}", _BYTE, (packed_nbytes(n_seg, b),))
            else:
                books[b] = stored.take(f"codebook_{b}", _HALF, (n_seg, 1 << b), finite=True)
        scales = stored.take("scales", _HALF, (lines, groups), finite=True) if kind == "uniform" else None
        perm = read_perm(stored, shape[1])
        col_scale = stored.take("col_scale", _HALF, (shape[1],), optional=True, finite=True)
        if check and col_scale is not None and bool((col_scale == 0).any()):
            raise ValueError("col_scale: holds zeros (decoding divides by it)")
        outliers = _read_outliers(stored, shape)
        rotation = read_rotation(stored, shape[1])
        stored.finish()
        return cls(
            shape=shape, group_size=group_size, axis=axis, kind=kind, bitmap=bitmap, codes=codes, scales=scales,
            zeros=zeros, codebooks=books, perm=perm, col_scale=col_scale,
            outliers=outliers, rotation=rotation,
        )  # fmt: skip

    def nominal_bits(self) -> float:
        """Average code width, without any overhead."""
        return float(self.bitmap.float().mean())

    def line_bits(self) -> torch.Tensor:
        """Average code width of each line (row, or column for axis 1), float32 (lines,)."""
        return self.bitmap.float().mean(dim=1)


# ---- reading stored tensors back -------------------------------------------------------------------
_BYTE = (torch.uint8,)
_HALF = (torch.float16,)
_COUNT = (torch.uint8, torch.int16, torch.int32)


def _parse_meta(meta: dict) -> tuple[tuple[int, int], int, int, str]:
    """(shape, group_size, axis, kind) of a layout's JSON metadata, checked."""
    try:
        shape = tuple(int(s) for s in meta["shape"])
        group_size, axis, kind = int(meta["group_size"]), int(meta["axis"]), meta["kind"]
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"bad quantized tensor metadata {meta!r}") from exc
    if kind not in KINDS or axis not in (0, 1) or len(shape) != 2 or min(shape) <= 0:
        raise ValueError(f"bad quantized tensor metadata {meta!r}")
    line_len = shape[1] if axis == 0 else shape[0]
    if group_size <= 0 or line_len % group_size:
        raise ValueError(f"bad group size {group_size} for shape {shape}")
    return shape, group_size, axis, kind


FINITE_CHUNK = 1 << 22  # values checked at once: the check's temporaries stay a few MB for any tensor


def all_finite(tensor: torch.Tensor) -> bool:
    """Whether no value of `tensor` is NaN or infinite, checked a chunk at a time. Where a tensor of several
    chunks maps a file, each chunk's pages are handed back once checked (`memory.release_file_pages`): a
    check leaves nothing resident."""
    flat = tensor.reshape(-1)
    chunked = flat.numel() > FINITE_CHUNK
    for start in range(0, flat.numel(), FINITE_CHUNK):
        chunk = flat[start : start + FINITE_CHUNK]
        if not bool(torch.isfinite(chunk).all()):
            return False
        if chunked:
            release_file_pages([chunk])
    return True


class StoredTensors:
    """The stored tensors of one matrix, taken one by one with their expected dtype and shape; what is left
    at the end was not expected."""

    def __init__(self, tensors: dict[str, torch.Tensor], check: bool) -> None:
        self.left = dict(tensors)
        self.check = check

    def take(
        self,
        name: str,
        dtypes: tuple[torch.dtype, ...],
        shape: tuple[int, ...],
        optional: bool = False,
        finite: bool = False,
    ) -> torch.Tensor | None:
        if name not in self.left:
            if optional:
                return None
            raise ValueError(f"{name}: missing")
        tensor = self.left.pop(name)
        if not self.check:
            return tensor
        if tensor.dtype not in dtypes:
            expected = " or ".join(str(d).removeprefix("torch.") for d in dtypes)
            raise ValueError(f"{name}: stored as {str(tensor.dtype).removeprefix('torch.')}, expected {expected}")
        if tuple(tensor.shape) != tuple(shape):
            raise ValueError(f"{name}: shape {tuple(tensor.shape)}, expected {tuple(shape)}")
        if finite and not all_finite(tensor):
            raise ValueError(f"{name}: holds NaN or infinite values")
        return tensor

    def finish(self) -> None:
        if self.check and self.left:
            raise ValueError(f"unexpected stored tensors {', '.join(sorted(self.left))}")


def read_perm(stored: StoredTensors, in_features: int) -> torch.Tensor | None:
    """The optional act-order permutation as int32, checked to be one of the `in_features` input columns."""
    perm = stored.take("perm", (index_dtype(in_features),), (in_features,), optional=True)
    if perm is None:
        return None
    if stored.check and not torch.equal(torch.sort(perm.to(torch.int64)).values, torch.arange(in_features)):
        raise ValueError(f"perm: not a permutation of the {in_features} input columns")
    return perm.to(torch.int32)


def _read_bitmap(stored: StoredTensors, lines: int, groups: int) -> torch.Tensor:
    """The (lines, groups) uint8 bit map from whichever of its three stored forms is present."""
    present = [name for name in ("bitmap", "bitmap_groups") if name in stored.left]
    if len(present) != 1:
        raise ValueError(
            "bitmap: missing (nor bitmap_groups)" if not present else "bitmap: stored beside bitmap_groups"
        )
    if present[0] == "bitmap_groups":
        packed = stored.take("bitmap_groups", _BYTE, (packed_nbytes(groups, BITMAP_WIDTH),))
        per_group = (unpack_codes(packed, BITMAP_WIDTH, groups) + 1).to(torch.uint8)
        return per_group[None, :].expand(lines, groups).contiguous()
    raw = stored.left["bitmap"]
    if raw.numel() == 1:
        constant = stored.take("bitmap", _BYTE, (1,))
        if stored.check and not 1 <= int(constant) <= 8:
            raise ValueError(f"bitmap: width {int(constant)} outside 1-8")
        return torch.full((lines, groups), int(constant), dtype=torch.uint8, device=constant.device)
    packed = stored.take("bitmap", _BYTE, (packed_nbytes(lines * groups, BITMAP_WIDTH),))
    return (unpack_codes(packed, BITMAP_WIDTH, lines * groups) + 1).to(torch.uint8).view(lines, groups)


def _read_outliers(stored: StoredTensors, shape: tuple[int, int]) -> SparseOutliers | None:
    """The sparse outliers, all three of their tensors or none, their counts and columns in range."""
    names = ("outliers_row_counts", "outliers_col_idx", "outliers_values")
    present = [name for name in names if name in stored.left]
    if not present:
        return None
    if len(present) != len(names):
        raise ValueError(f"{next(n for n in names if n not in present)}: missing")
    counts = stored.take("outliers_row_counts", _COUNT, (shape[0],))
    total = int(counts.to(torch.int64).sum())
    n_cols, n_values = stored.left["outliers_col_idx"].numel(), stored.left["outliers_values"].numel()
    nnz = n_values if n_cols == n_values else total  # the two that agree name the third as damaged
    if stored.check:
        if counts.numel() and counts.dtype != smallest_uint(int(counts.max())):
            raise ValueError(
                f"outliers_row_counts: stored as {counts.dtype}, expected {smallest_uint(int(counts.max()))}"
            )
        if int(counts.to(torch.int64).min()) < 0 or total != nnz:
            raise ValueError(f"outliers_row_counts: add up to {total}, but {nnz} outliers are stored")
    cols = stored.take("outliers_col_idx", (index_dtype(shape[1]),), (nnz,))
    values = stored.take("outliers_values", _HALF, (nnz,), finite=True)
    if stored.check and nnz and (int(cols.min()) < 0 or int(cols.max()) >= shape[1]):
        raise ValueError(f"outliers_col_idx: column outside 0-{shape[1] - 1}")
    return SparseOutliers(counts, cols, values)


ORTHOGONALITY_TOLERANCE = 1e-3  # |QQᵀ − I| a stored mixing matrix may show (float32 QR gives about 1e-6)


def read_rotation(stored: StoredTensors, in_features: int) -> InputRotation | None:
    """The input rotation: its signs and mixing matrix, both or neither, the matrix orthogonal and fitting."""
    names = ("rot_signs", "rot_mix")
    present = [name for name in names if name in stored.left]
    if not present:
        return None
    if len(present) != len(names):
        raise ValueError(f"{next(n for n in names if n not in present)}: missing")
    signs = stored.take("rot_signs", _BYTE, (packed_nbytes(in_features, 1),))
    mix = stored.left["rot_mix"]
    m = mix.shape[0] if mix.dim() == 2 else 0
    if stored.check and not fits(m, in_features):
        raise ValueError(f"rot_mix: shape {tuple(mix.shape)} does not fit {in_features} input columns")
    mix = stored.take("rot_mix", (torch.float32,), (m, m), finite=True)
    if stored.check and float((mix @ mix.t() - torch.eye(m, device=mix.device)).abs().max()) > ORTHOGONALITY_TOLERANCE:
        raise ValueError("rot_mix: not orthogonal")
    return InputRotation(signs, mix)
