"""SKIM (matrix scope): per-row K-means codebooks with greedily allocated widths for any budget."""

from __future__ import annotations

import torch

from anybit.alloc.skim import allocation_budget, error_table, greedy_allocation, row_cost_bits
from anybit.config import QuantConfig
from anybit.errors import AnybitError
from anybit.format.qtensor import QuantizedTensor
from anybit.methods.base import LayerStats, Method
from anybit.methods.nonuniform import sensitivity_weights

WIDTHS = list(range(1, 9))


class SKIM(Method):
    """SKIM's error table and greedy per-row allocation within each matrix (no scaling vector yet).

    `--bits B` is the *counted* budget: codes, fp16 codebooks and the per-row width map of every
    matrix average at most B bits per weight (and within a row's step of it). Rows are clustered with
    the `--weights` importance (activation by default); the allocation uses the full layer-wise error.
    """

    name = "skim"
    integer_bits = None

    def check_bits(self, bits: float) -> None:
        if not 1.5 <= bits <= 8:
            raise AnybitError(f"method 'skim' needs 1.5 <= bits <= 8, got {bits:g}")

    def quantize(self, W: torch.Tensor, stats: LayerStats | None, config: QuantConfig) -> QuantizedTensor:
        rows, cols = W.shape
        H = stats.hessian.hessian()
        table = error_table(W, H, sensitivity_weights(W, stats, self.weighting(config)), WIDTHS)
        costs = torch.tensor([[row_cost_bits(cols, b) for b in WIDTHS]] * rows, dtype=torch.float64)
        budget = allocation_budget(rows, cols, config.bits)
        try:
            choice = greedy_allocation(table.errors, costs, budget)
        except ValueError:
            minimum = (float(costs[:, 0].sum()) + (rows * cols * config.bits - budget)) / (rows * cols)
            raise AnybitError(
                f"{config.bits:g} bits per weight is below what a {rows}x{cols} matrix can store "
                f"with per-row codebooks ({minimum:.3f})"
            ) from None
        k_max = 1 << WIDTHS[int(choice.max())]
        codes = torch.zeros(rows, cols, dtype=torch.uint8)
        books = torch.zeros(rows, 1, k_max)
        for i, b in enumerate(WIDTHS):
            picked = choice == i
            if bool(picked.any()):
                codes[picked] = table.codes[i][picked]
                books[picked, 0, : 1 << b] = table.centroids[i][picked]
        bitmap = torch.tensor(WIDTHS, dtype=torch.uint8)[choice][:, None]
        return QuantizedTensor.from_codebook(codes, books, bitmap, (rows, cols), cols)
