"""Which input channels a token's compensation reads: exact top-k of a score per chunk of `CHUNK` channels
(dynamic), or fixed channels from calibration means (the static baseline)."""

from __future__ import annotations

import torch

CHUNK = 1024  # channels per selection chunk (the paper's CHUNK_SIZE)


def chunk_budgets(in_features: int, k_chunk: int) -> list[tuple[int, int, int]]:
    """(start, length, kept channels) of each selection chunk; a partial chunk keeps proportionally fewer."""
    out = []
    for start in range(0, in_features, CHUNK):
        length = min(CHUNK, in_features - start)
        out.append((start, length, min(length, k_chunk * length // CHUNK)))
    return out


def select_channels(x: torch.Tensor, k_chunk: int, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Per row of x (tokens, in): the indices of the channels kept by exact top-k per chunk of the
    score |x|, times `weight` (in,) per channel when given."""
    score = x.abs() if weight is None else x.abs() * weight
    budgets = chunk_budgets(x.shape[-1], k_chunk)
    full = [b for b in budgets if b[1] == CHUNK]
    picks = []
    if full and full[0][2]:  # all full chunks in one top-k (one launch on a GPU, not one per chunk)
        chunks = score[:, : len(full) * CHUNK].reshape(x.shape[0], len(full), CHUNK)
        offsets = torch.arange(len(full), device=x.device)[:, None] * CHUNK
        picks.append((chunks.topk(full[0][2], dim=-1).indices + offsets).flatten(1))
    for start, length, k in budgets[len(full) :]:
        if k:
            picks.append(score[:, start : start + length].topk(k, dim=-1).indices + start)
    if not picks:
        return torch.empty(x.shape[0], 0, dtype=torch.long, device=x.device)
    return torch.cat(picks, dim=-1)


def static_channels(mean_abs: torch.Tensor, k_chunk: int, weight: torch.Tensor | None = None) -> torch.Tensor:
    """The fixed channels of the static baseline: per chunk, the largest mean |x| (times `weight`) on
    calibration data."""
    return select_channels(mean_abs[None, :], k_chunk, weight)[0]
