"""CLAQ's outlier-guided allocation across input columns (Wang et al., 2024).

Outlier order: s_j = #{i : |W_ij| ≥ τ · mean|W|} for each column j, on the original weights.
Adaptive precision: the top columns by s get the high width so that the column widths average
exactly the target (2 ≤ B < 3: 2 and 4 bits, as in the paper; B ≥ 3: ⌊B⌋ and ⌊B⌋ + 1). The split
search (not in the paper) tries every high width from ⌊B⌋ + 1 to ⌊B⌋ + 3 instead.
Outlier reservation: the top 10% of columns keep a 1.4% tail on each side in fp16, the rest 0.4%.
"""

from __future__ import annotations

import math

import torch

PAPER_TAU = 13.0
TOP_SHARE, TOP_RESERVE, REST_RESERVE = 0.10, 0.014, 0.004


def outlier_order_scores(W: torch.Tensor, tau: float = PAPER_TAU) -> torch.Tensor:
    """Outlier count of every input column of W (out, in)."""
    threshold = tau * W.abs().mean()
    return (W.abs() >= threshold).sum(dim=0)


def column_ranking(scores: torch.Tensor) -> torch.Tensor:
    """Columns from most to least outlier-heavy; ties keep column order (deterministic)."""
    return torch.sort(scores, descending=True, stable=True).indices


def split_widths(target: float, high: int | None = None) -> tuple[int, int, float]:
    """(low width, high width, share of columns at the high width) averaging exactly `target`;
    `high` None: the paper's choice."""
    if target < 2:
        raise ValueError(f"CLAQ needs at least 2 bits per weight, got {target}")
    low = math.floor(target)
    if high is None:
        high = 4 if target < 3 else low + 1
    if not low < high <= 8:
        raise ValueError(f"high width {high} must be above {low} and at most 8")
    return low, high, (target - low) / (high - low)


def candidate_highs(target: float) -> list[int]:
    """The high widths the split search tries (the paper's first); one when the target is whole."""
    paper = split_widths(target)[1]
    if target == math.floor(target):
        return [paper]
    low = math.floor(target)
    return [paper] + [h for h in range(low + 1, min(low + 3, 8) + 1) if h != paper]


def adaptive_precision(scores: torch.Tensor, target: float, high: int | None = None) -> torch.Tensor:
    """Width of each column: the most outlier-heavy columns get the high width."""
    low, high, share = split_widths(target, high)
    bits = torch.full_like(scores, low, dtype=torch.uint8)
    n_high = round(share * scores.numel())
    bits[column_ranking(scores)[:n_high]] = high
    return bits


def outlier_reservation(scores: torch.Tensor, mean_reserve: float = 0.005) -> torch.Tensor:
    """Per-column reserve ratio (share of each tail kept in fp16), paper ratios scaled to `mean_reserve`."""
    scale = mean_reserve / (TOP_SHARE * TOP_RESERVE + (1 - TOP_SHARE) * REST_RESERVE)
    reserve = torch.full(scores.shape, REST_RESERVE * scale, dtype=torch.float32, device=scores.device)
    n_top = round(TOP_SHARE * scores.numel())
    reserve[column_ranking(scores)[:n_top]] = TOP_RESERVE * scale
    return reserve
