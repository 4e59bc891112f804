"""Uniform grid quantizer over column groups with a per-segment bit map (GPTQ's column quantizer)."""

from __future__ import annotations

import torch

from anybit.format.qtensor import QuantizedTensor
from anybit.quant.grid import dequantize_from_grid, minmax_params, quantize_to_grid


class UniformColumnQuantizer:
    """Asymmetric min-max grid per (row, column group); widths from a (rows, groups) bit map."""

    def __init__(self, rows: int, columns: int, group_size: int, bitmap: torch.Tensor) -> None:
        self.group_size = group_size
        self.bitmap = bitmap
        device = bitmap.device
        groups = columns // group_size
        self.codes = torch.zeros(rows, columns, dtype=torch.uint8, device=device)
        self.scales = torch.zeros(rows, groups, dtype=torch.float32, device=device)
        self.zeros = torch.zeros(rows, groups, dtype=torch.float32, device=device)
        self._group = -1

    def fit(self, W_group: torch.Tensor, group: int) -> None:
        self._group = group
        self._bits = self.bitmap[:, group].to(W_group.dtype)
        self.scales[:, group], self.zeros[:, group] = minmax_params(W_group, self._bits)

    def quantize(self, w: torch.Tensor, column: int) -> torch.Tensor:
        g = column // self.group_size
        scale, zero = self.scales[:, g], self.zeros[:, g]
        q = quantize_to_grid(w, scale, zero, self._bits)
        self.codes[:, column] = q.to(torch.uint8)
        return dequantize_from_grid(q, scale, zero)

    def to_qtensor(self, shape: tuple[int, int], perm: torch.Tensor | None = None) -> QuantizedTensor:
        return QuantizedTensor.from_uniform(
            self.codes, self.scales, self.zeros.to(torch.int32), self.bitmap, shape, self.group_size, perm=perm
        )


def rtn_quantize(W: torch.Tensor, group_size: int, bitmap: torch.Tensor) -> QuantizedTensor:
    """Round-to-nearest of W (rows, columns) on min-max grids, all groups at once."""
    rows, columns = W.shape
    segs = W.float().reshape(rows, columns // group_size, group_size)
    bits = bitmap.to(segs.dtype)
    scale, zero = minmax_params(segs, bits)
    q = quantize_to_grid(segs, scale[..., None], zero[..., None], bits[..., None])
    return QuantizedTensor.from_uniform(
        q.reshape(rows, columns).to(torch.uint8), scale, zero.to(torch.int32), bitmap, (rows, columns), group_size
    )
