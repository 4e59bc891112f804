"""Dense-and-sparse split: a small share of weights is kept in fp16 outside the quantizer.

Two kinds are selected per matrix, as in SqueezeLLM: the largest-magnitude weights, and the most
sensitive ones (largest importance, e.g. Fisher). Their union is the sparse part; the dense part is
fitted without them (their K-means weight is zero) and they overwrite the decoded value at runtime.
"""

from __future__ import annotations

import torch


def _top_mask(score: torch.Tensor, count: int) -> torch.Tensor:
    mask = torch.zeros(score.numel(), dtype=torch.bool, device=score.device)
    if count > 0:
        mask[torch.topk(score.flatten(), count).indices] = True
    return mask.view_as(score)


def outlier_mask(
    W: torch.Tensor, magnitude_frac: float, sensitivity_frac: float = 0.0, importance: torch.Tensor | None = None
) -> torch.Tensor:
    """Boolean mask of the weights to keep in fp16: the top `magnitude_frac` by |w| (deviation from the
    row mean, so an offset row is not all outliers) and the top `sensitivity_frac` by importance."""
    n = W.numel()
    deviation = (W - W.mean(dim=1, keepdim=True)).abs()
    mask = _top_mask(deviation, round(magnitude_frac * n))
    if sensitivity_frac > 0:
        if importance is None:
            raise ValueError("sensitivity outliers need an importance tensor")
        mask |= _top_mask(importance.expand_as(W), round(sensitivity_frac * n))
    return mask
