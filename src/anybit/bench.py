"""Prefill and decode speed of a (quantized) model: what `anybit bench` measures."""

from __future__ import annotations

import inspect
import statistics
import time
from dataclasses import asdict, dataclass

import torch

from anybit.errors import AnybitError


@dataclass
class SpeedResult:
    device: str
    dtype: str
    prompt_tokens: int
    new_tokens: int
    repeats: int
    prefill_tokens_per_s: float  # median over repeats
    decode_tokens_per_s: float  # median over repeats, one token per forward (batch 1, KV cache)
    decode_ms_per_token: float
    tensor_bytes: int  # parameters and buffers the model holds, shared ones once
    peak_gpu_bytes: int | None  # CUDA only: peak allocated during the runs

    def to_dict(self) -> dict:
        return asdict(self)


def tensor_bytes(model: torch.nn.Module) -> int:
    """Bytes of every parameter and buffer of `model`, tied tensors counted once."""
    seen, total = set(), 0
    for t in [*model.parameters(), *model.buffers()]:
        key = (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), t.numel())
        if key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()
    return total


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def decode_speed(
    model: torch.nn.Module,
    prompt_tokens: int = 128,
    new_tokens: int = 32,
    repeats: int = 3,
    device: str = "cpu",
    seed: int = 0,
) -> SpeedResult:
    """Time one prefill of `prompt_tokens` random tokens, then `new_tokens` greedy decode steps.

    A first untimed run warms up kernels and caches; the figures are medians over `repeats` runs.
    """
    if prompt_tokens < 1 or new_tokens < 1 or repeats < 1:
        raise AnybitError("--prompt-tokens, --new-tokens and --repeats must be positive")
    model = model.to(device)
    dev = torch.device(device)
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (1, prompt_tokens), generator=torch.Generator().manual_seed(seed)).to(dev)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    # the KV cache argument and output field: "cache" in newer transformers, "past_key_values" before
    cache_name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    prefill, decode = [], []
    for run in range(repeats + 1):
        _sync(dev)
        start = time.perf_counter()
        out = model(ids, use_cache=True)
        _sync(dev)
        mid = time.perf_counter()
        past, token = getattr(out, cache_name), out.logits[:, -1:].argmax(dim=-1)
        for _ in range(new_tokens):
            out = model(token, use_cache=True, **{cache_name: past})
            past, token = getattr(out, cache_name), out.logits[:, -1:].argmax(dim=-1)
        _sync(dev)
        end = time.perf_counter()
        if run:  # run 0 is the warm-up
            prefill.append(mid - start)
            decode.append(end - mid)
    decode_s = statistics.median(decode)
    return SpeedResult(
        device=str(dev),
        dtype=str(next(model.parameters()).dtype).removeprefix("torch."),
        prompt_tokens=prompt_tokens,
        new_tokens=new_tokens,
        repeats=repeats,
        prefill_tokens_per_s=prompt_tokens / statistics.median(prefill),
        decode_tokens_per_s=new_tokens / decode_s,
        decode_ms_per_token=1000 * decode_s / new_tokens,
        tensor_bytes=tensor_bytes(model),
        peak_gpu_bytes=torch.cuda.max_memory_allocated(dev) if dev.type == "cuda" else None,
    )
