"""Perplexity by the standard (GPTQ-lineage) protocol, optionally with KL to a reference model.

Protocol: the whole text is tokenized once; it is cut into non-overlapping windows of `seqlen`
tokens from the start, and the incomplete tail is dropped; each window is scored on its own (no
state carried over), predicting tokens 2..seqlen of the window; perplexity = exp(total negative
log-likelihood / number of predicted tokens).

With a reference model, each window also gives the mean KL(p_ref ‖ p_model) per predicted token and
the share of positions where both models' most likely next token agree.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from anybit.runtime.qlinear import dense_weights


@dataclass
class EvalResult:
    ppl: float
    windows: int
    tokens: int  # predicted tokens
    seqlen: int
    seconds: float
    kl: float | None = None
    top1_agreement: float | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def _logits(model: nn.Module, window: torch.Tensor, device: torch.device) -> torch.Tensor:
    return model(window.unsqueeze(0).to(device), use_cache=False).logits[0, :-1].float()


@torch.inference_mode()
def evaluate(
    model: nn.Module,
    windows: torch.Tensor,
    device: str = "cpu",
    reference: nn.Module | None = None,
    progress: bool = True,
    desc: str = "eval",
) -> EvalResult:
    """Perplexity of `model` on token windows (n, seqlen); KL and top-1 agreement against `reference`."""
    start = time.perf_counter()
    dev = torch.device(device)
    nll, kl, agree, tokens = 0.0, 0.0, 0, 0
    with dense_weights(model, skip_kernel_layers=True):
        for window in tqdm(windows, desc=desc, unit="window", disable=not progress):
            logp = F.log_softmax(_logits(model, window, dev), dim=-1)
            targets = window[1:].to(dev)
            nll += F.nll_loss(logp, targets, reduction="sum").item()
            tokens += targets.numel()
            if reference is not None:
                ref_logp = F.log_softmax(_logits(reference, window, dev), dim=-1)
                kl += F.kl_div(logp, ref_logp, log_target=True, reduction="sum").item()
                agree += int((logp.argmax(-1) == ref_logp.argmax(-1)).sum())
    result = EvalResult(
        ppl=math.exp(nll / tokens),
        windows=len(windows),
        tokens=tokens,
        seqlen=windows.shape[1],
        seconds=time.perf_counter() - start,
    )
    if reference is not None:
        result.kl, result.top1_agreement = kl / tokens, agree / tokens
    return result
