"""Non-uniform (codebook) recipes built on the batched weighted K-means engine."""

from __future__ import annotations

import torch

from anybit.config import QuantConfig
from anybit.format.qtensor import QuantizedTensor
from anybit.methods.base import LayerStats, Method
from anybit.quant.kmeans import fit_codebook


def sensitivity_weights(W: torch.Tensor, stats: LayerStats | None, weighting: str) -> torch.Tensor | None:
    """Per-weight importance for the K-means objective: diag(XᵀX) per input column, or none."""
    if weighting == "none":
        return None
    if weighting == "activation":
        diag = torch.diagonal(stats.hessian.XtX).clamp(min=0)
        return (diag / diag.mean().clamp(min=1e-30)).expand_as(W)
    raise ValueError(f"unknown weighting {weighting!r}")


class KMeansRows(Method):
    """One weighted K-means codebook of 2**bits fp16 entries per output row (SqueezeLLM's dense part)."""

    name = "kmeans"

    def quantize(self, W: torch.Tensor, stats: LayerStats | None, config: QuantConfig) -> QuantizedTensor:
        bits = int(config.bits)
        result = fit_codebook(W, sensitivity_weights(W, stats, config.weighting), k=2**bits)
        rows, cols = W.shape
        bitmap = torch.full((rows, 1), bits, dtype=torch.uint8, device=W.device)
        codebooks = result.centroids[:, None, :].to(torch.float16)
        return QuantizedTensor.from_codebook(result.codes, codebooks, bitmap, (rows, cols), cols)
