"""`VectorTensor`: a weight matrix coded in pieces of d consecutive weights of a row, each piece a per-row
scale times one entry of a fixed table of d-dimensional entries (`format.vector_tables`).

W' = W Rᵀ (R the optional input rotation, `format.rotation`), its columns taken in the coded order `perm`
(act-order; natural order without it), is cut into pieces of d columns along each row, and

    W'[r, perm[p·d : (p+1)·d]] = scale[r] · table[codes[r, p]]

with a k-bit index codes[r, p] into the table of 2**k entries (`index_bits` k). Stored per matrix: the codes,
row by row, packed at k bits (`packing.py`); the fp16 scale of each row; the permutation (int16 below 32768
columns) and the rotation where present. The tables are part of the format, not of the model (see
`format.vector_tables`). As for `QuantizedTensor`, `storage_bits()` is the byte size of exactly the tensors
`to_tensors()` hands to the file, times eight.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from anybit.format.packing import pack_codes, packed_nbytes, unpack_codes
from anybit.format.qtensor import (
    CodedMatrix,
    QuantizedTensor,
    StoredTensors,
    index_dtype,
    read_perm,
    read_rotation,
)
from anybit.format.rotation import InputRotation
from anybit.format.vector_tables import has_table, vector_table

KIND = "vector"


@dataclass(frozen=True)
class VectorTensor(CodedMatrix):
    """A vector-coded matrix (layout in the module docstring)."""

    shape: tuple[int, int]
    dim: int
    index_bits: int
    codes: torch.Tensor  # uint8: rows · columns / dim indices of `index_bits` bits, packed row by row
    scales: torch.Tensor  # fp16 (rows,)
    perm: torch.Tensor | None = None  # int32 (in_features,): the coded matrix is W'[:, perm]
    rotation: InputRotation | None = None  # the coded matrix is W Rᵀ; decoding multiplies by R

    kind: ClassVar[str] = KIND
    axis: ClassVar[int] = 0  # lines are rows
    outliers: ClassVar[None] = None
    col_scale: ClassVar[None] = None

    @property
    def group_size(self) -> int:
        """The piece length d (what a group is to the scalar layouts)."""
        return self.dim

    @property
    def pieces(self) -> int:
        return self.shape[0] * self.shape[1] // self.dim

    @staticmethod
    def check_shape(shape: tuple[int, int], dim: int, index_bits: int) -> None:
        """A ValueError unless a (rows, columns) matrix cuts into pieces of `dim` with a table of that width."""
        if len(shape) != 2 or min(shape) <= 0:
            raise ValueError(f"bad shape {shape}")
        if not has_table(dim, index_bits):
            raise ValueError(f"no vector table of dimension {dim} with {index_bits}-bit indices")
        if shape[1] % dim:
            raise ValueError(f"{shape[1]} columns do not cut into pieces of {dim}")

    @classmethod
    def from_codes(
        cls,
        codes: torch.Tensor,
        scales: torch.Tensor,
        shape: tuple[int, int],
        dim: int,
        index_bits: int,
        perm: torch.Tensor | None = None,
    ) -> VectorTensor:
        """Pack table indices (rows, columns / dim) with the rows' scales."""
        shape = (int(shape[0]), int(shape[1]))
        cls.check_shape(shape, dim, index_bits)
        if tuple(codes.shape) != (shape[0], shape[1] // dim):
            raise ValueError(f"codes of shape {tuple(codes.shape)} do not fit {shape} in pieces of {dim}")
        return cls(
            shape=shape, dim=dim, index_bits=index_bits, codes=pack_codes(codes, index_bits),
            scales=scales.to(torch.float16).reshape(shape[0]).contiguous(),
            perm=None if perm is None else perm.to(torch.int32),
        )  # fmt: skip

    # ---- decoding -----------------------------------------------------------------------------
    def table(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The (2**index_bits, dim) table the codes index, on the codes' device."""
        return vector_table(self.dim, self.index_bits).to(device=self.codes.device, dtype=dtype)

    def code_streams(self) -> list[torch.Tensor]:
        """The packed code stream (what a kernel that re-lays it no longer reads)."""
        return [self.codes]

    def unpacked_codes(self) -> torch.Tensor:
        """The table indices, int64 (rows, columns / dim)."""
        return unpack_codes(self.codes, self.index_bits, self.pieces).view(self.shape[0], -1)

    def dequantize(self, dtype: torch.dtype = torch.float32, unpacked: torch.Tensor | None = None) -> torch.Tensor:
        """The dense (out_features, in_features) weight this tensor stands for (`unpacked`: its codes as
        `unpacked_codes` gives them, when the caller keeps them)."""
        rows, columns = self.shape
        codes = self.unpacked_codes() if unpacked is None else unpacked
        W = (self.table(dtype)[codes] * self.scales.to(dtype)[:, None, None]).view(rows, columns)
        if self.perm is not None:
            W = W[:, torch.argsort(self.perm.to(torch.int64))]
        W = W.contiguous()
        return W if self.rotation is None else self.rotation.unapply(W)

    # ---- storage ------------------------------------------------------------------------------
    def to_tensors(self) -> dict[str, torch.Tensor]:
        """Exactly the tensors that are stored (names relative to this matrix)."""
        out = {"codes": self.codes, "scales": self.scales}
        if self.perm is not None:
            out["perm"] = self.perm.to(index_dtype(self.shape[1]))
        if self.rotation is not None:
            out["rot_signs"] = self.rotation.signs
            out["rot_mix"] = self.rotation.mix
        return {k: v.contiguous() for k, v in out.items()}

    def meta(self) -> dict:
        """JSON-serializable layout description; with `to_tensors()` it rebuilds this object."""
        return {
            "shape": list(self.shape), "group_size": self.dim, "axis": 0, "kind": KIND, "index_bits": self.index_bits,
        }  # fmt: skip

    @classmethod
    def from_tensors(cls, meta: dict, tensors: dict[str, torch.Tensor], check: bool = True) -> VectorTensor:
        """Inverse of `meta()` + `to_tensors()`; with `check` (always, for anything read from disk) every stored
        tensor is validated against the layout the metadata describes, and a ValueError names the first that
        does not fit."""
        shape, dim, index_bits = _parse_meta(meta)
        stored = StoredTensors(tensors, check)
        rows, columns = shape
        codes = stored.take("codes", (torch.uint8,), (packed_nbytes(rows * columns // dim, index_bits),))
        scales = stored.take("scales", (torch.float16,), (rows,), finite=True)
        perm = read_perm(stored, columns)
        rotation = read_rotation(stored, columns)
        stored.finish()
        return cls(shape, dim, index_bits, codes, scales, perm, rotation)

    def nominal_bits(self) -> float:
        """Index bits per weight, without any overhead."""
        return self.index_bits / self.dim

    def line_bits(self) -> torch.Tensor:
        """Index bits per weight of each row, float32 (rows,)."""
        return torch.full((self.shape[0],), self.nominal_bits())


CodedTensor = QuantizedTensor | VectorTensor


def _parse_meta(meta: dict) -> tuple[tuple[int, int], int, int]:
    """(shape, dim, index_bits) of a vector layout's JSON metadata, checked."""
    try:
        shape = tuple(int(s) for s in meta["shape"])
        dim, index_bits, axis = int(meta["group_size"]), int(meta["index_bits"]), int(meta["axis"])
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"bad vector tensor metadata {meta!r}") from exc
    if axis != 0:
        raise ValueError(f"bad vector tensor metadata {meta!r}")
    VectorTensor.check_shape(shape, dim, index_bits)
    return shape, dim, index_bits


def coded_tensor_from_stored(meta: dict, tensors: dict[str, torch.Tensor], check: bool = True) -> CodedTensor:
    """The coded matrix `meta` describes, built from its stored tensors (checked with `check`): a
    `VectorTensor` for the vector kind, else a `QuantizedTensor`."""
    if isinstance(meta, dict) and meta.get("kind") == KIND:
        return VectorTensor.from_tensors(meta, tensors, check)
    return QuantizedTensor.from_tensors(meta, tensors, check)
