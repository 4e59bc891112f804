"""CLAQ: per-column K-means inside GPTQ, outlier-guided adaptive precision, outlier reservation."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from anybit.alloc.claq import adaptive_precision, candidate_highs, outlier_order_scores, outlier_reservation
from anybit.format.qtensor import QuantizedTensor
from anybit.methods.base import DAMP, OUTLIERS, LayerStats, Method
from anybit.options import Option
from anybit.quant.column_kmeans import ColumnKMeansQuantizer
from anybit.quant.gptq import act_order_perm, gptq_quantize

if TYPE_CHECKING:
    from anybit.config import QuantConfig

TAU = Option("tau", float, 13.0, "Outlier threshold in mean|W|.", low=0, low_open=True)
SEARCH_SPLIT = Option(
    "search_split", bool, False, "Per matrix, try high widths ⌊B⌋+1 to ⌊B⌋+3 and keep the least output error."
)


class CLAQ(Method):
    """CLAQ (Wang et al., 2024) with act-order, as in all the paper's runs.

    `--bits B` is the average code width (fractional: adaptive precision); `--outliers P` the mean
    per-tail reserve ratio (default 0.005 as in the paper; 0 turns reservation off); `--tau` the
    outlier threshold in units of mean|W|; `--search-split` quantizes each matrix with every candidate
    high width and keeps the one with the least layer-wise error tr(ΔWHΔWᵀ). Counted bits add the fp16
    column codebooks, the column bit map, the permutation and the reserved weights to the nominal width.
    """

    name = "claq"
    options = (DAMP, OUTLIERS, TAU, SEARCH_SPLIT)
    default_outliers = 0.005  # the mean reserved share
    integer_bits = False
    bit_range = (2, 8)

    def quantize(self, W: torch.Tensor, stats: LayerStats | None, config: QuantConfig) -> QuantizedTensor:
        H = stats.hessian.hessian()
        if not config.search_split:
            return self._quantize_split(W, H, config, None)
        best, best_error = None, float("inf")
        for high in candidate_highs(config.bits):
            qt = self._quantize_split(W, H, config, high)
            delta = W - qt.dequantize().to(W.dtype)
            error = float(((delta @ H) * delta).sum())
            if error < best_error:
                best, best_error = qt, error
        return best

    @staticmethod
    def _quantize_split(W: torch.Tensor, H: torch.Tensor, config: QuantConfig, high: int | None) -> QuantizedTensor:
        perm = act_order_perm(H)
        scores = outlier_order_scores(W, config.tau)
        bits = adaptive_precision(scores, config.bits, high)
        mean_reserve = config.outliers
        reserve = outlier_reservation(scores, mean_reserve)[perm] if mean_reserve > 0 else None
        quantizer = ColumnKMeansQuantizer(W.shape[0], bits[perm], reserve)
        result = gptq_quantize(W, H, quantizer, damp=config.damp, act_order=True)
        return quantizer.to_qtensor(tuple(W.shape), perm=result.perm)
