"""SKIM: per-row K-means codebooks with greedily allocated widths for any budget (per matrix or over
the whole model) and the trainable scaling vector; anybit's recipe (`methods.anybit`) builds on it."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from anybit.alloc.skim import (
    BITMAP_BITS,
    ErrorTable,
    RowTable,
    allocation_budget,
    chosen_codebooks,
    error_table,
    greedy_allocation,
    row_cost_bits,
)
from anybit.errors import AnybitError
from anybit.format.packing import packed_nbytes
from anybit.format.qtensor import QuantizedTensor, SparseOutliers
from anybit.format.rotation import rotation_bits
from anybit.methods.base import DAMP, OUTLIERS, SCOPE, WEIGHTING, LayerStats, Method, row_importance
from anybit.methods.nonuniform import sensitivity_weights, split_outliers
from anybit.options import Option
from anybit.quant.kmeans import assign, fit_codebook
from anybit.quant.row_codebooks import feedback_codes, refit_codebooks, sorted_codebooks, stored_books
from anybit.quant.scaling import layer_loss, train_scaling

if TYPE_CHECKING:
    from anybit.config import QuantConfig

MAX_REFINE = 8
SCALING = Option(
    "scaling", bool, None, "Train the per-column scaling vector.", method_default="default_scaling", negatable=True
)
REFINE = Option(
    "refine",
    int,
    None,
    "Rounds of least-squares codebook refits with the codes fixed (anybit: each but the last followed by a new "
    "error-feedback rounding).",
    low=0,
    high=MAX_REFINE,
    method_default="default_refine",
)
MAX_WIDTH = 8
WIDTH_HEADROOM = 3  # candidate widths reach floor(budget) + 3: a row wider than that costs 2-4× the
# budget per weight (codes plus a doubled codebook) and was never chosen in our runs (RESULTS.md)
SCALE_BITS = 16  # one fp16 factor per input column


class SKIM(Method):
    """SKIM's error table, greedy per-row allocation, and the scaling vector.

    `--bits B` is the *counted* budget: codes, fp16 codebooks, the per-row width map (and the
    scaling vector and outliers, when used) average at most B bits per weight. Rows are clustered
    with the `--weights` importance (activation by default); the allocation uses the full layer-wise
    error. `--scope matrix` spends B within each matrix; `--scope model` spends one budget over every
    row of the model (the driver's two-pass flow). `--scaling` (default on) trains one factor per
    input column after allocation (one alternation, as in the paper), paid for out of the same
    budget, and kept only when it lowers the layer-wise error.
    """

    name = "skim"
    options = (WEIGHTING, OUTLIERS, SCOPE, SCALING, REFINE, DAMP)
    integer_bits = False
    bit_range = (1.5, 8)
    default_bits = 3.25
    default_scaling = True
    error_feedback = False  # anybit: GPTQ-style rounding onto the fitted codebooks

    def _prepare(self, W: torch.Tensor, stats: LayerStats, config: QuantConfig):
        """H, the K-means weights with outliers removed, and the outliers (mask, sparse form)."""
        H = stats.hessian.hessian()
        weights = sensitivity_weights(W, stats, self.weighting(config))
        fraction = config.outliers
        mask, outliers, weights = split_outliers(W, weights, fraction)
        return H, weights, mask, outliers

    def _fixed_bits(self, rows: int, cols: int, outliers: SparseOutliers | None, config: QuantConfig) -> int:
        """Stored bits that do not depend on the row widths."""
        fixed = packed_nbytes(rows, BITMAP_BITS) * 8
        if config.scaling:
            fixed += SCALE_BITS * cols
        if config.rotate:
            fixed += rotation_bits(cols)
        if outliers is not None:
            fixed += outliers.storage_bits()
        return fixed

    def row_table(self, W: torch.Tensor, stats: LayerStats | None, config: QuantConfig) -> RowTable:
        """Each row's layer-wise error at each width, times its output importance (see `row_importance`)."""
        rows, cols = W.shape
        H, weights, mask, outliers = self._prepare(W, stats, config)
        table = error_table(W, H, weights, candidate_widths(config.bits), kept=mask, with_codes=False)
        errors = table.errors.double().cpu() * row_importance(stats, H, rows)[:, None]  # all tables meet on CPU
        fixed = self._fixed_bits(rows, cols, outliers, config)
        books = [c.to("cpu", torch.float16) for c in table.centroids]  # reused by the second pass: no refit
        return RowTable(errors, _costs(rows, cols, table.widths), table.widths, fixed, rows * cols, books)

    def quantize(self, W: torch.Tensor, stats: LayerStats | None, config: QuantConfig) -> QuantizedTensor:
        rows, cols = W.shape
        H, weights, mask, outliers = self._prepare(W, stats, config)
        if stats.plan is not None:  # planned by the model-wide allocation, which paid for the extras
            widths = stats.plan.widths.to(W.device, torch.long)
            books = stats.plan.codebooks().to(W.device)  # the codebooks the allocation's errors were measured with
            codes = assign(W, sorted_codebooks(books, widths)).to(torch.uint8)  # widths <= 8
            candidates = self._candidates(W, H, weights, mask, widths, codes, books, config)
        else:
            table = error_table(W, H, weights, candidate_widths(config.bits), kept=mask)
            budget = allocation_budget(rows, cols, config.bits)
            budget -= 0 if outliers is None else outliers.storage_bits()
            budget -= rotation_bits(cols) if config.rotate else 0
            plain = self._allocate(table, rows, cols, budget, config.bits)
            candidates = self._candidates(W, H, weights, mask, *plain, config, scaling=False)
            if config.scaling:
                # the fp16 scaling vector is paid for out of the same budget: fewer bits for the codes
                reduced = self._allocate(table, rows, cols, budget - SCALE_BITS * cols, config.bits)
                candidates.append(self._scaled(W, H, weights, mask, *reduced))
        _, widths, codes, books, alpha = min(candidates, key=lambda c: c[0])
        return self._pack(widths, codes, books, alpha, outliers)

    def _candidates(
        self, W, H, weights, mask, widths, codes, books, config: QuantConfig, scaling: bool = True
    ) -> list[tuple]:
        """(loss, widths, codes, books, α) of the plain codes, the scaled re-clustering (if on), for anybit
        GPTQ error feedback onto the same codebooks, and (with `--refine`) their least-squares refits."""
        out = [(self._loss(W, H, mask, codes, books, None), widths, codes, books, None)]
        if scaling and config.scaling:
            out.append(self._scaled(W, H, weights, mask, widths, codes, books))
        rounds = config.refine
        if self.error_feedback:
            out += self._feedback_rounds(W, H, mask, widths, books, rounds, config)
        elif rounds:
            refit = refit_codebooks(W, H, codes, books, widths, mask, config.damp)
            out.append((self._loss(W, H, mask, codes, refit, None), widths, codes, refit, None))
        return out

    def _feedback_rounds(self, W, H, mask, widths, books, rounds: int, config: QuantConfig) -> list[tuple]:
        """Candidates of GPTVQ's alternation: error-feedback rounding onto the codebooks (in act-order with
        `--act-order`), then `rounds` times a least-squares refit of the codebooks to those codes, each but the
        last followed by a new rounding."""

        def rounded(books: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return feedback_codes(W, H, widths, books, mask, config.damp, config.act_order)

        codes, books = rounded(books)
        out = [(self._loss(W, H, mask, codes, books, None), widths, codes, books, None)]
        for done in range(1, rounds + 1):
            books = refit_codebooks(W, H, codes, books, widths, mask, config.damp)
            out.append((self._loss(W, H, mask, codes, books, None), widths, codes, books, None))
            if done < rounds:
                codes, books = rounded(books)
                out.append((self._loss(W, H, mask, codes, books, None), widths, codes, books, None))
        return out

    @staticmethod
    def _loss(W, H, mask, codes, books, alpha) -> float:
        W_hat = torch.gather(books, 1, codes.long())
        if alpha is not None:
            W_hat = W_hat / alpha
        if mask is not None:
            W_hat = torch.where(mask, W.half().float(), W_hat)
        return float(layer_loss(W, W_hat, H))

    def _scaled(self, W, H, weights, mask, widths, codes, books) -> tuple:
        """(loss, widths, codes, books, α) after one SKIM alternation."""
        new_codes, new_books, alpha = scale_columns(W, H, weights, widths, codes.long(), books)
        return self._loss(W, H, mask, new_codes, new_books, alpha), widths, new_codes, new_books, alpha

    @staticmethod
    def _allocate(
        table: ErrorTable, rows: int, cols: int, budget: float, target: float
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-row widths within `budget`, with the matching codes and (rows, 2**max width) codebooks."""
        costs = _costs(rows, cols, table.widths)
        try:
            choice = greedy_allocation(table.errors, costs, budget)
        except ValueError:
            minimum = float(costs[:, 0].sum()) / (rows * cols)
            raise AnybitError(
                f"{target:g} bits per weight is below what a {rows}x{cols} matrix can store with per-row "
                f"codebooks (at least {minimum:.3f} plus its bit map)"
            ) from None
        device = table.codes[0].device
        choice = choice.to(device)
        widths = torch.tensor(table.widths, device=device)[choice]
        codes = torch.zeros(rows, cols, dtype=torch.long, device=device)
        for i in range(len(table.widths)):
            picked = choice == i
            if bool(picked.any()):
                codes[picked] = table.codes[i][picked].long()
        return widths, codes, chosen_codebooks(choice, table.widths, table.centroids)

    @staticmethod
    def _pack(
        widths: torch.Tensor,
        codes: torch.Tensor,
        books: torch.Tensor,
        col_scale: torch.Tensor | None,
        outliers: SparseOutliers | None = None,
    ) -> QuantizedTensor:
        rows, cols = codes.shape
        bitmap = widths.to(torch.uint8)[:, None]
        return QuantizedTensor.from_codebook(
            codes, books[:, None, :], bitmap, (rows, cols), cols, col_scale=col_scale, outliers=outliers
        )


def candidate_widths(bits: float) -> list[int]:
    """Widths a row may get under a budget of `bits` per weight: 1 to floor(bits) + WIDTH_HEADROOM."""
    return list(range(1, min(MAX_WIDTH, int(bits) + WIDTH_HEADROOM) + 1))


def _costs(rows: int, cols: int, widths: list[int]) -> torch.Tensor:
    """(rows, widths) stored bits, as a broadcast view: every row of a matrix costs the same at a width."""
    return torch.tensor([[row_cost_bits(cols, b) for b in widths]], dtype=torch.float64).expand(rows, -1)


def scale_columns(
    W: torch.Tensor, H: torch.Tensor, weights: torch.Tensor, widths: torch.Tensor, codes: torch.Tensor,
    books: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """One SKIM alternation: train α (stored in fp16) on the current labels, then re-cluster W·α.

    Returns the new codes, the new (fp16-valued) codebooks of W·α, and α.
    """
    alpha = train_scaling(W, H, codes, weights, books.shape[1]).to(torch.float16).float()
    result = fit_codebook(W * alpha, weights / alpha.square(), k=1 << widths)
    return result.codes, stored_books(result.centroids), alpha
