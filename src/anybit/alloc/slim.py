"""SliM-LLM's salience-determined bit allocation across column groups (Huang et al., 2024).

Salience of a weight: δ_ij = w_ij² / U_jj², with U the upper Cholesky factor of the damped H⁻¹ (as
in the released code: the sequential OBS quantity). A group is `group_size` consecutive input
columns across all rows; its salience is the sum of δ over it. Groups are sorted by salience; for
p = 0, 1, …, G/2 the p least salient groups get N − 1 bits and the p most salient N + 1 (so the
layer averages exactly N), and the p whose round-to-nearest output distribution is closest to the
full-precision one, KL(softmax(XWᵀ) ‖ softmax(XŴᵀ)) over the output features averaged over
calibration tokens, wins. Unlike the released code, p = 0 (uniform N bits) is a candidate too.

Fractional N (not in the paper, which allocates integer N only): the base is ⌊N⌋ bits, with the most
salient share N − ⌊N⌋ of the groups at ⌊N⌋ + 1 (rounded to whole groups, so a layer with few groups
lands near N, not on it: the counted bits say where); the same ±1 pairs are searched on top.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from anybit.quant.uniform import rtn_quantize


def group_salience(W: torch.Tensor, Hinv_upper: torch.Tensor, group_size: int) -> torch.Tensor:
    """Summed salience w² / U_jj² of every column group of W (out, in)."""
    delta = W.square() / torch.diagonal(Hinv_upper).square()[None, :]
    return delta.sum(dim=0).view(-1, group_size).sum(dim=1)


def base_widths(salience: torch.Tensor, bits: float) -> torch.Tensor:
    """⌊B⌋ bits everywhere, ⌊B⌋ + 1 for the most salient share B − ⌊B⌋ of the groups (rounded to whole groups)."""
    low = math.floor(bits)
    widths = torch.full(salience.shape, low, dtype=torch.uint8, device=salience.device)
    n_high = round((bits - low) * salience.numel())
    if n_high:
        widths[torch.argsort(salience, descending=True, stable=True)[:n_high]] = low + 1
    return widths


def group_bits(salience: torch.Tensor, bits: float, pairs: int) -> torch.Tensor:
    """The base widths, one bit less for the `pairs` least salient groups and one more for the `pairs`
    most salient: the average is kept."""
    order = torch.argsort(salience, stable=True)
    widths = base_widths(salience, bits)
    if pairs:
        widths[order[:pairs]] -= 1
        widths[order[-pairs:]] += 1
    return widths


def output_kl(X: torch.Tensor, W: torch.Tensor, W_hat: torch.Tensor) -> float:
    """Mean over tokens of KL(softmax(XWᵀ) ‖ softmax(XŴᵀ)), softmax over output features."""
    log_p = F.log_softmax(X @ W.t(), dim=-1)
    log_q = F.log_softmax(X @ W_hat.t(), dim=-1)
    return float(F.kl_div(log_q, log_p, log_target=True, reduction="batchmean"))


def salience_allocation(
    W: torch.Tensor, Hinv_upper: torch.Tensor, X: torch.Tensor, bits: float, group_size: int
) -> tuple[torch.Tensor, list[float]]:
    """Per-group widths averaging `bits`, chosen by the double-pointer search; also the KL of each p."""
    salience = group_salience(W, Hinv_upper, group_size)
    rows, groups = W.shape[0], salience.numel()
    max_pairs = groups // 2 if math.floor(bits) > 1 else 0
    best, best_kl, kls = None, float("inf"), []
    for pairs in range(max_pairs + 1):
        widths = group_bits(salience, bits, pairs)
        W_hat = rtn_quantize(W, group_size, widths[None, :].expand(rows, groups)).dequantize()
        kl = output_kl(X, W, W_hat)
        kls.append(kl)
        if kl < best_kl:
            best, best_kl = widths, kl
    return best, kls
