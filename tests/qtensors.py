"""Random packed tensors for the kernel tests."""

import torch

from anybit.format.qtensor import QuantizedTensor


def codebook_tensor(
    rows: int, cols: int, group_size: int, widths: tuple[int, ...], shared: bool = False, **extras
) -> QuantizedTensor:
    """Random codes and sorted codebooks, each segment's width drawn from `widths` (with `shared`, one draw per
    column group for all rows, as SliM-LLM's bit maps)."""
    groups = cols // group_size
    bitmap = (
        shared_bitmap(rows, groups, widths)
        if shared
        else torch.tensor(widths, dtype=torch.uint8)[torch.randint(0, len(widths), (rows, groups))]
    )
    codes = torch.randint(0, 256, (rows, cols)) % (1 << bitmap.long()).repeat_interleave(group_size, dim=1)
    books = torch.randn(rows, groups, 1 << max(widths)).sort(dim=-1).values
    return QuantizedTensor.from_codebook(codes, books, bitmap, (rows, cols), group_size, **extras)


def column_tensor(
    rows: int, cols: int, widths: tuple[int, ...], kind: str = "codebook", scale: float = 1.0, **extras
) -> QuantizedTensor:
    """A per-column (axis 1, CLAQ's) tensor: each column one segment of all rows, its width drawn from `widths`,
    random codes; sorted codebooks (times `scale`), or uniform grids with random zero points and scales."""
    bits = torch.tensor(widths, dtype=torch.uint8)[torch.randint(0, len(widths), (cols,))]
    codes = torch.randint(0, 256, (cols, rows)) % (1 << bits.long())[:, None]
    if kind == "uniform":
        zeros = torch.randint(0, 256, (cols, 1)) % (1 << bits.long())[:, None]
        scales = (torch.rand(cols, 1) + 0.1) * scale / (1 << bits.long())[:, None]
        return QuantizedTensor.from_uniform(codes, scales, zeros, bits[:, None], (rows, cols), rows, axis=1, **extras)
    books = torch.randn(cols, 1, 1 << max(widths)).sort(dim=-1).values * scale
    return QuantizedTensor.from_codebook(codes, books, bits[:, None], (rows, cols), rows, axis=1, **extras)


def shared_bitmap(rows: int, groups: int, widths: tuple[int, ...]) -> torch.Tensor:
    """A bit map whose column groups each have one width drawn from `widths` for every row."""
    drawn = torch.tensor(widths, dtype=torch.uint8)[torch.randint(0, len(widths), (groups,))]
    return drawn[None, :].expand(rows, groups).contiguous()


def vector_tensor(rows: int, cols: int, index_bits: int, row_scale: torch.Tensor | None = None, **extras):
    """A `VectorTensor` of random table indices in a random column order, each row's scale `row_scale` (uniform
    in [0.5, 1.5) without it); `extras`: `rotation`."""
    from anybit.format.vector import VectorTensor

    codes = torch.randint(0, 1 << index_bits, (rows, cols // 4))
    scales = torch.rand(rows) + 0.5 if row_scale is None else row_scale
    qt = VectorTensor.from_codes(codes, scales, (rows, cols), 4, index_bits, torch.randperm(cols))
    return VectorTensor(**{**qt.__dict__, **extras}) if extras else qt
