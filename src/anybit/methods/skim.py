"""SKIM (matrix scope): per-row K-means codebooks with greedily allocated widths for any budget."""

from __future__ import annotations

import torch

from anybit.alloc.skim import (
    BITMAP_BITS,
    ErrorTable,
    RowTable,
    allocation_budget,
    error_table,
    greedy_allocation,
    row_cost_bits,
)
from anybit.config import QuantConfig
from anybit.errors import AnybitError
from anybit.format.packing import packed_nbytes
from anybit.format.qtensor import QuantizedTensor
from anybit.methods.base import LayerStats, Method
from anybit.methods.nonuniform import sensitivity_weights
from anybit.quant.kmeans import fit_codebook
from anybit.quant.scaling import layer_loss, train_scaling

WIDTHS = list(range(1, 9))
SCALE_BITS = 16  # one fp16 factor per input column


class SKIM(Method):
    """SKIM's error table, greedy per-row allocation within each matrix, and the scaling vector.

    `--bits B` is the *counted* budget: codes, fp16 codebooks and the per-row width map of every
    matrix average at most B bits per weight (and within a row's step of it). Rows are clustered with
    the `--weights` importance (activation by default); the allocation uses the full layer-wise error.
    `--scaling` (default on) trains one factor per input column after allocation (one alternation, as
    in the paper). Its fp16 vector (16 bits per input column) is paid for out of the same budget, and
    the scaled matrix is kept only when its layer-wise error is lower than the unscaled matrix's at
    the full budget.
    """

    name = "skim"
    integer_bits = False
    bit_range = (1.5, 8)
    supports_model_scope = True

    def row_table(self, W: torch.Tensor, stats: LayerStats | None, config: QuantConfig) -> RowTable:
        """Each row's layer-wise error at each width, times its output importance (see `row_importance`)."""
        rows, cols = W.shape
        H = stats.hessian.hessian()
        table = error_table(W, H, sensitivity_weights(W, stats, self.weighting(config)), WIDTHS)
        costs = torch.tensor([[row_cost_bits(cols, b) for b in WIDTHS]] * rows, dtype=torch.float64)
        fixed = packed_nbytes(rows, BITMAP_BITS) * 8
        if config.scaling is not False:
            fixed += SCALE_BITS * cols
        errors = table.errors.double() * row_importance(stats, H, rows)[:, None]
        return RowTable(errors, costs, list(WIDTHS), fixed, rows * cols)

    def quantize(self, W: torch.Tensor, stats: LayerStats | None, config: QuantConfig) -> QuantizedTensor:
        H = stats.hessian.hessian()
        weights = sensitivity_weights(W, stats, self.weighting(config))
        if stats.widths is not None:
            return self._quantize_planned(W, H, weights, stats.widths, config)
        rows, cols = W.shape
        table = error_table(W, H, weights, WIDTHS)
        budget = allocation_budget(rows, cols, config.bits)
        widths, codes, books = self._allocate(table, rows, cols, budget, config.bits)
        if config.scaling is not False:
            # the fp16 scaling vector is paid for out of the same budget: fewer bits for the codes
            reduced = self._allocate(table, rows, cols, budget - SCALE_BITS * cols, config.bits)
            scaled_codes, scaled_books, alpha = scale_columns(W, H, weights, *reduced)
            plain_loss = layer_loss(W, torch.gather(books, 1, codes), H)
            scaled_loss = layer_loss(W, torch.gather(scaled_books, 1, scaled_codes) / alpha, H)
            if scaled_loss < plain_loss:
                return self._pack(reduced[0], scaled_codes, scaled_books, alpha)
        return self._pack(widths, codes, books, None)

    def _quantize_planned(
        self, W: torch.Tensor, H: torch.Tensor, weights: torch.Tensor, widths: torch.Tensor, config: QuantConfig
    ) -> QuantizedTensor:
        """Rows at widths chosen by the model-wide allocation (its budget already paid for scaling)."""
        widths = widths.to(torch.long)
        result = fit_codebook(W, weights, k=1 << widths)
        books = torch.nan_to_num(result.centroids, posinf=0.0).to(torch.float16).float()
        codes = result.codes.long()
        if config.scaling is not False:
            scaled_codes, scaled_books, alpha = scale_columns(W, H, weights, widths, codes, books)
            plain_loss = layer_loss(W, torch.gather(books, 1, codes), H)
            scaled_loss = layer_loss(W, torch.gather(scaled_books, 1, scaled_codes) / alpha, H)
            if scaled_loss < plain_loss:
                return self._pack(widths, scaled_codes, scaled_books, alpha)
        return self._pack(widths, codes, books, None)

    @staticmethod
    def _allocate(
        table: ErrorTable, rows: int, cols: int, budget: float, target: float
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-row widths within `budget`, with the matching codes and (rows, 2**max width) codebooks."""
        costs = torch.tensor([[row_cost_bits(cols, b) for b in WIDTHS]] * rows, dtype=torch.float64)
        try:
            choice = greedy_allocation(table.errors, costs, budget)
        except ValueError:
            minimum = float(costs[:, 0].sum()) / (rows * cols)
            raise AnybitError(
                f"{target:g} bits per weight is below what a {rows}x{cols} matrix can store with per-row "
                f"codebooks (at least {minimum:.3f} plus its bit map)"
            ) from None
        widths = torch.tensor(WIDTHS)[choice]
        codes = torch.zeros(rows, cols, dtype=torch.long)
        books = torch.zeros(rows, 1 << int(widths.max()))
        for i, b in enumerate(WIDTHS):
            picked = choice == i
            if bool(picked.any()):
                codes[picked] = table.codes[i][picked].long()
                books[picked, : 1 << b] = table.centroids[i][picked]
        return widths, codes, books

    @staticmethod
    def _pack(
        widths: torch.Tensor, codes: torch.Tensor, books: torch.Tensor, col_scale: torch.Tensor | None
    ) -> QuantizedTensor:
        rows, cols = codes.shape
        bitmap = widths.to(torch.uint8)[:, None]
        return QuantizedTensor.from_codebook(codes, books[:, None, :], bitmap, (rows, cols), cols, col_scale=col_scale)


def scale_columns(
    W: torch.Tensor, H: torch.Tensor, weights: torch.Tensor, widths: torch.Tensor, codes: torch.Tensor,
    books: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """One SKIM alternation: train α (stored in fp16) on the current labels, then re-cluster W·α.

    Returns the new codes, the new (fp16-valued) codebooks of W·α, and α.
    """
    alpha = train_scaling(W, H, codes, weights, books.shape[1]).to(torch.float16).float()
    result = fit_codebook(W * alpha, weights / alpha.square(), k=1 << widths)
    new_books = torch.nan_to_num(result.centroids, posinf=0.0).to(torch.float16).float()
    return result.codes, new_books, alpha


def row_importance(stats: LayerStats, H: torch.Tensor, rows: int) -> torch.Tensor:
    """How much a unit of layer-wise output error in each row costs the model's loss, up to one
    model-wide constant: 1 for every row without Fisher information, else the row's mean squared
    output gradient, estimated as Σⱼ F_ij / Σⱼ E[x_j²] (F: Fisher diagonal of the weights, which is
    ≈ E[g_i²] E[x_j²] when gradients and inputs are independent; an approximation).
    """
    if stats.fisher is None:
        return torch.ones(rows, dtype=torch.float64)
    input_energy = torch.diagonal(H).double().sum().clamp(min=1e-30)
    return stats.fisher.double().sum(dim=1).cpu() / input_energy.cpu()
