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


# Logits are made and scored this many at a time (float32: 128 MiB): a 262k-token vocabulary's logits for one
# 2048-token window would otherwise take 2 GiB, twice over with their log-probabilities.
LOGIT_CHUNK_ELEMENTS = 1 << 25


def _hidden_states(model: nn.Module, window: torch.Tensor, device: torch.device) -> torch.Tensor:
    """The final hidden states (seqlen - 1, hidden) that predict tokens 2..seqlen of `window`."""
    out = model.get_decoder()(window.unsqueeze(0).to(device), use_cache=False)
    return out.last_hidden_state[0, :-1]


def _log_probs(model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """Next-token log-probabilities from final hidden states, as the model's own head computes its logits."""
    logits = model.get_output_embeddings()(hidden).float()
    softcap = getattr(model.config, "final_logit_softcapping", None)
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    return F.log_softmax(logits, dim=-1)


def _chunks(rows: int, vocab: int) -> list[slice]:
    step = max(1, LOGIT_CHUNK_ELEMENTS // vocab)
    return [slice(start, start + step) for start in range(0, rows, step)]


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
            targets = window[1:].to(dev)
            hidden = _hidden_states(model, window, dev)
            ref_hidden = None if reference is None else _hidden_states(reference, window, dev)
            for rows in _chunks(targets.numel(), model.config.vocab_size):
                logp = _log_probs(model, hidden[rows])
                nll += F.nll_loss(logp, targets[rows], reduction="sum").item()
                if ref_hidden is not None:
                    ref_logp = _log_probs(reference, ref_hidden[rows])
                    kl += F.kl_div(logp, ref_logp, log_target=True, reduction="sum").item()
                    agree += int((logp.argmax(-1) == ref_logp.argmax(-1)).sum())
            tokens += targets.numel()
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
