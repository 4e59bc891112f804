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
