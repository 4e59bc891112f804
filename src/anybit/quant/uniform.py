"""Uniform grid quantizer over column groups with a per-segment bit map (GPTQ's column quantizer)."""

from __future__ import annotations

import torch

from anybit.format.qtensor import QuantizedTensor
from anybit.memory import release_file_pages
from anybit.quant.grid import dequantize_from_grid, minmax_params, quantize_to_grid


class UniformColumnQuantizer:
    """Asymmetric min-max grid per (row, column group); widths from a (rows, groups) bit map."""

    def __init__(self, rows: int, columns: int, group_size: int, bitmap: torch.Tensor, symmetric: bool = False) -> None:
        self.group_size = group_size
        self.symmetric = symmetric
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
        self.scales[:, group], self.zeros[:, group] = minmax_params(W_group, self._bits, self.symmetric)

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


class ClippedColumnQuantizer(UniformColumnQuantizer):
    """Uniform grid whose min-max range is scaled per row by the factor (from `factors`) that minimises
    the weighted squared error of the group: SliM-LLM's salience-weighted quantizer calibration.

    `importance(W_group, group)` returns the per-weight error weights of a group (same shape).
    """

    def __init__(self, rows, columns, group_size, bitmap, factors: torch.Tensor, importance) -> None:
        super().__init__(rows, columns, group_size, bitmap)
        self.factors = factors
        self.importance = importance

    def fit(self, W_group: torch.Tensor, group: int) -> None:
        self._group = group
        self._bits = self.bitmap[:, group].to(W_group.dtype)
        factors = self.factors.to(W_group)
        # candidate grids for every row × factor, all at once: (rows, F, group_size)
        scaled = W_group[:, None, :] * factors[None, :, None]
        bits = self._bits[:, None].expand(-1, factors.numel())
        scale, zero = minmax_params(scaled, bits)
        q = quantize_to_grid(W_group[:, None, :], scale[..., None], zero[..., None], bits[..., None])
        err = dequantize_from_grid(q, scale[..., None], zero[..., None]) - W_group[:, None, :]
        weights = self.importance(W_group, group)[:, None, :]
        best = (weights * err.square()).sum(dim=2).argmin(dim=1)
        rows = torch.arange(W_group.shape[0], device=W_group.device)
        self.scales[:, group], self.zeros[:, group] = scale[rows, best], zero[rows, best]


RTN_CHUNK_ROWS = 1024  # rows rounded at once: bounds the float temporaries of a large matrix (a vocabulary)


def rtn_quantize(W: torch.Tensor, group_size: int, bitmap: torch.Tensor, symmetric: bool = False) -> QuantizedTensor:
    """Round-to-nearest of W (rows, columns) on min-max grids, all groups of a chunk of rows at once. W is
    read once: where it maps a checkpoint file, each chunk's pages are handed back once rounded."""
    rows, columns = W.shape
    groups = columns // group_size
    codes = torch.empty(rows, columns, dtype=torch.uint8, device=W.device)
    scales = torch.empty(rows, groups, device=W.device)
    zeros = torch.empty(rows, groups, dtype=torch.int32, device=W.device)
    for start in range(0, rows, RTN_CHUNK_ROWS):
        part = slice(start, start + RTN_CHUNK_ROWS)
        segs = W[part].detach().float().reshape(-1, groups, group_size)
        bits = bitmap[part].to(segs.dtype)
        scale, zero = minmax_params(segs, bits, symmetric)
        q = quantize_to_grid(segs, scale[..., None], zero[..., None], bits[..., None])
        codes[part], scales[part], zeros[part] = q.reshape(-1, columns), scale, zero
        release_file_pages([W[part]])
    return QuantizedTensor.from_uniform(codes, scales, zeros, bitmap, (rows, columns), group_size)
