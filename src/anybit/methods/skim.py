"""SKIM: per-row K-means codebooks with greedily allocated widths for any budget (per matrix or over
the whole model), the trainable scaling vector, and anybit's recipe built on the same core."""

from __future__ import annotations

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
from anybit.config import QuantConfig
from anybit.errors import AnybitError
from anybit.format.packing import packed_nbytes
from anybit.format.qtensor import QuantizedTensor, SparseOutliers
from anybit.methods.base import LayerStats, Method, row_importance
from anybit.methods.nonuniform import sensitivity_weights, split_outliers
from anybit.quant.gptq import gptq_quantize
from anybit.quant.kmeans import assign, fit_codebook, midpoints, reconstruct
from anybit.quant.scaling import layer_loss, train_scaling

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
    integer_bits = False
    bit_range = (1.5, 8)
    supports_model_scope = True
    default_bits = 3.25
    default_scaling = True
    default_outliers = 0.0
    error_feedback = False  # anybit: GPTQ-style rounding onto the fitted codebooks

    def scaling(self, config: QuantConfig) -> bool:
        return self.default_scaling if config.scaling is None else config.scaling

    def _prepare(self, W: torch.Tensor, stats: LayerStats, config: QuantConfig):
        """H, the K-means weights with outliers removed, and the outliers (mask, sparse form)."""
        H = stats.hessian.hessian()
        weights = sensitivity_weights(W, stats, self.weighting(config))
        fraction = self.default_outliers if config.outliers is None else config.outliers
        mask, outliers, weights = split_outliers(W, weights, fraction)
        return H, weights, mask, outliers

    def _fixed_bits(self, rows: int, cols: int, outliers: SparseOutliers | None, config: QuantConfig) -> int:
        """Stored bits that do not depend on the row widths."""
        fixed = packed_nbytes(rows, BITMAP_BITS) * 8
        if self.scaling(config):
            fixed += SCALE_BITS * cols
        if outliers is not None:
            fixed += outliers.storage_bits()
        return fixed

    def row_table(self, W: torch.Tensor, stats: LayerStats | None, config: QuantConfig) -> RowTable:
        """Each row's layer-wise error at each width, times its output importance (see `row_importance`)."""
        rows, cols = W.shape
        H, weights, mask, outliers = self._prepare(W, stats, config)
        table = error_table(W, H, weights, candidate_widths(config.bits), kept=mask)
        errors = table.errors.double().cpu() * row_importance(stats, H, rows)[:, None]  # all tables meet on CPU
        fixed = self._fixed_bits(rows, cols, outliers, config)
        books = [c.to("cpu", torch.float16) for c in table.centroids]  # reused by the second pass: no refit
        return RowTable(errors, _costs(rows, cols, table.widths), table.widths, fixed, rows * cols, books)

    def quantize(self, W: torch.Tensor, stats: LayerStats | None, config: QuantConfig) -> QuantizedTensor:
        rows, cols = W.shape
        H, weights, mask, outliers = self._prepare(W, stats, config)
        if stats.plan is not None:  # planned by the model-wide allocation, which paid for the extras
            widths = stats.plan.widths.to(W.device, torch.long)
            books = stats.plan.books.to(W.device)  # the codebooks the allocation's errors were measured with
            codes = assign(W, sorted_codebooks(books, widths)).long()
            candidates = self._candidates(W, H, weights, mask, widths, codes, books, config)
        else:
            table = error_table(W, H, weights, candidate_widths(config.bits), kept=mask)
            budget = allocation_budget(rows, cols, config.bits)
            budget -= 0 if outliers is None else outliers.storage_bits()
            plain = self._allocate(table, rows, cols, budget, config.bits)
            candidates = self._candidates(W, H, weights, mask, *plain, config, scaling=False)
            if self.scaling(config):
                # the fp16 scaling vector is paid for out of the same budget: fewer bits for the codes
                reduced = self._allocate(table, rows, cols, budget - SCALE_BITS * cols, config.bits)
                candidates.append(self._scaled(W, H, weights, mask, *reduced))
        _, widths, codes, books, alpha = min(candidates, key=lambda c: c[0])
        return self._pack(widths, codes, books, alpha, outliers)

    def _candidates(
        self, W, H, weights, mask, widths, codes, books, config: QuantConfig, scaling: bool = True
    ) -> list[tuple]:
        """(loss, widths, codes, books, α) of the plain codes, the scaled re-clustering (if on) and,
        for anybit, GPTQ error feedback onto the same codebooks."""
        out = [(self._loss(W, H, mask, codes, books, None), widths, codes, books, None)]
        if scaling and self.scaling(config):
            out.append(self._scaled(W, H, weights, mask, widths, codes, books))
        if self.error_feedback:
            fb_codes, fb_books = feedback_codes(W, H, widths, books, mask, config.damp)
            out.append((self._loss(W, H, mask, fb_codes, fb_books, None), widths, fb_codes, fb_books, None))
        return out

    @staticmethod
    def _loss(W, H, mask, codes, books, alpha) -> float:
        W_hat = torch.gather(books, 1, codes)
        if alpha is not None:
            W_hat = W_hat / alpha
        if mask is not None:
            W_hat = torch.where(mask, W.half().float(), W_hat)
        return float(layer_loss(W, W_hat, H))

    def _scaled(self, W, H, weights, mask, widths, codes, books) -> tuple:
        """(loss, widths, codes, books, α) after one SKIM alternation."""
        new_codes, new_books, alpha = scale_columns(W, H, weights, widths, codes, books)
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


class AnyBit(SKIM):
    """anybit's recipe: SKIM's per-row widths from one model-wide budget, rows compared by their
    Fisher-estimated effect on the loss and clustered with Fisher weights, then GPTQ-style rounding
    of each column onto its row's codebook with error feedback through H⁻¹ (kept when it lowers the
    layer-wise error). Settings chosen by the ablation in RESULTS.md: without Fisher, raw layer-wise
    errors of different layers are not comparable and the model-wide budget goes wrong.
    """

    name = "anybit"
    default_scope = "model"
    default_weighting = "fisher"
    default_scaling = False
    error_feedback = True


def candidate_widths(bits: float) -> list[int]:
    """Widths a row may get under a budget of `bits` per weight: 1 to floor(bits) + WIDTH_HEADROOM."""
    return list(range(1, min(MAX_WIDTH, int(bits) + WIDTH_HEADROOM) + 1))


def _costs(rows: int, cols: int, widths: list[int]) -> torch.Tensor:
    return torch.tensor([[row_cost_bits(cols, b) for b in widths]] * rows, dtype=torch.float64)


class RowCodebookQuantizer:
    """GPTQ column quantizer that rounds every weight to the nearest entry of its row's fixed codebook
    (sorted, +inf padded); weights marked as outliers keep their (error-updated) value in fp16, so
    their feedback is zero."""

    group_size = 1

    def __init__(self, books: torch.Tensor, kept: torch.Tensor | None) -> None:
        self.books = books
        self.mid = midpoints(books)
        self.kept = kept
        self.columns: list[torch.Tensor] = []

    def fit(self, W_group: torch.Tensor, group: int) -> None:
        pass  # the codebooks are fixed before the GPTQ pass

    def quantize(self, w: torch.Tensor, column: int) -> torch.Tensor:
        codes = assign(w[:, None], self.books, self.mid)
        self.columns.append(codes[:, 0])
        q = reconstruct(self.books, codes)[:, 0]
        if self.kept is not None:
            q = torch.where(self.kept[:, column], w.half().float(), q)
        return q


def feedback_codes(
    W: torch.Tensor, H: torch.Tensor, widths: torch.Tensor, books: torch.Tensor, kept: torch.Tensor | None,
    damp: float,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """Codes (rows, cols) from GPTQ's column-by-column rounding onto the rows' codebooks, and the
    codebooks (sorted, as the rounding needs them)."""
    sorted_books = sorted_codebooks(books, widths)
    valid = torch.isfinite(sorted_books)
    quantizer = RowCodebookQuantizer(sorted_books, kept)
    gptq_quantize(W, H, quantizer, damp=damp, act_order=False)
    return torch.stack(quantizer.columns, dim=1), torch.where(valid, sorted_books, torch.zeros_like(books))


def sorted_codebooks(books: torch.Tensor, widths: torch.Tensor) -> torch.Tensor:
    """Each row's 2**width entries sorted ascending, the unused slots +inf (what `assign` needs)."""
    entries = torch.arange(books.shape[1], device=books.device)[None, :]
    valid = entries < (1 << widths.to(torch.long))[:, None]
    return torch.where(valid, books, torch.full_like(books, float("inf"))).sort(dim=1).values


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


def stored_books(centroids: torch.Tensor) -> torch.Tensor:
    """Centroids as they are stored (fp16 values; unused +inf slots as 0), in float32."""
    return torch.nan_to_num(centroids, posinf=0.0).to(torch.float16).float()
