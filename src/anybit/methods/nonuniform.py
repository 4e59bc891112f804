"""Non-uniform (codebook) recipes built on the batched weighted K-means engine."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from anybit.errors import AnybitError
from anybit.format.qtensor import QuantizedTensor, SparseOutliers
from anybit.methods.base import OUTLIERS, WEIGHTING, LayerStats, Method
from anybit.quant.kmeans import fit_codebook
from anybit.quant.outliers import outlier_mask

if TYPE_CHECKING:
    from anybit.config import QuantConfig


def sensitivity_weights(W: torch.Tensor, stats: LayerStats | None, weighting: str) -> torch.Tensor:
    """Per-weight importance for the K-means objective, normalised to mean 1 per matrix.

    activation: diag(XᵀX) of the input column (the same for every row); fisher: mean grad² of the LM
    loss (SqueezeLLM); none: all ones.
    """
    if weighting == "none":
        return torch.ones_like(W)
    if weighting == "activation":
        importance = stats.hessian.diagonal().clamp(min=0).expand_as(W)
    elif weighting == "fisher":
        if stats is None or stats.fisher is None:
            raise AnybitError("Fisher weighting needs Fisher statistics (the driver computes them)")
        importance = stats.fisher.to(W.device)
    else:
        raise AnybitError(f"unknown weighting {weighting!r}")
    return importance / importance.mean().clamp(min=1e-30)


def split_outliers(
    W: torch.Tensor, weights: torch.Tensor, fraction: float, sensitive_share: float = 0.0
) -> tuple[torch.Tensor | None, SparseOutliers | None, torch.Tensor]:
    """The share `fraction` of W kept in fp16 (part `sensitive_share` of it by importance, the rest by
    magnitude): its mask, its sparse form, and the K-means weights with those entries zeroed."""
    if fraction <= 0:
        return None, None, weights
    sensitive = fraction * sensitive_share
    mask = outlier_mask(W, fraction - sensitive, sensitive, weights)
    return mask, SparseOutliers.from_mask(W, mask), weights.masked_fill(mask, 0.0)


class KMeansRows(Method):
    """One weighted K-means codebook of 2**bits fp16 entries per output row, optional fp16 outliers.

    Outliers (`--outliers F`) are the share F of weights with the largest deviation from their row mean.
    """

    name = "kmeans"
    options = (WEIGHTING, OUTLIERS)
    needs_full_hessian = False
    sensitive_share: float = 0.0  # part of the outlier budget chosen by importance instead of magnitude

    def quantize(self, W: torch.Tensor, stats: LayerStats | None, config: QuantConfig) -> QuantizedTensor:
        bits = int(config.bits)
        weights = sensitivity_weights(W, stats, self.weighting(config))
        fraction = config.outliers
        _, outliers, weights = split_outliers(W, weights, fraction, self.sensitive_share)
        result = fit_codebook(W, weights, k=2**bits)
        rows, cols = W.shape
        bitmap = torch.full((rows, 1), bits, dtype=torch.uint8, device=W.device)
        codebooks = result.centroids[:, None, :].to(torch.float16)
        return QuantizedTensor.from_codebook(result.codes, codebooks, bitmap, (rows, cols), cols, outliers=outliers)


class SqueezeLLM(KMeansRows):
    """SqueezeLLM (Kim et al., 2024): Fisher-weighted per-row K-means plus 0.45% fp16 outliers
    (0.40% by magnitude, 0.05% by sensitivity)."""

    name = "squeezellm"
    default_weighting = "fisher"
    default_outliers = 0.0045
    sensitive_share = 0.05 / 0.45
