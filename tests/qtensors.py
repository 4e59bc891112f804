"""Random packed tensors for the kernel tests."""

import torch

from anybit.format.qtensor import QuantizedTensor


def codebook_tensor(rows: int, cols: int, group_size: int, widths: tuple[int, ...], **extras) -> QuantizedTensor:
    """Random codes and sorted codebooks, each segment's width drawn from `widths`."""
    groups = cols // group_size
    bitmap = torch.tensor(widths, dtype=torch.uint8)[torch.randint(0, len(widths), (rows, groups))]
    codes = torch.randint(0, 256, (rows, cols)) % (1 << bitmap.long()).repeat_interleave(group_size, dim=1)
    books = torch.randn(rows, groups, 1 << max(widths)).sort(dim=-1).values
    return QuantizedTensor.from_codebook(codes, books, bitmap, (rows, cols), group_size, **extras)


def vector_tensor(rows: int, cols: int, index_bits: int, row_scale: torch.Tensor | None = None, **extras):
    """A `VectorTensor` of random table indices in a random column order, each row's scale `row_scale` (uniform
    in [0.5, 1.5) without it); `extras`: `rotation`."""
    from anybit.format.vector import VectorTensor

    codes = torch.randint(0, 1 << index_bits, (rows, cols // 4))
    scales = torch.rand(rows) + 0.5 if row_scale is None else row_scale
    qt = VectorTensor.from_codes(codes, scales, (rows, cols), 4, index_bits, torch.randperm(cols))
    return VectorTensor(**{**qt.__dict__, **extras}) if extras else qt
