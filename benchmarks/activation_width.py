"""What narrower activations and codebook tables would cost in perplexity: the numeric change behind a byte
product (maddubs) on AVX2.

Usage: python benchmarks/activation_width.py DIR [--configs exact,a8:t8,a8:t7,a8b64:t7] [--max-windows 20]

The AVX2 fast path multiplies each weight's 8-bit table entry (int8 tables) with a 16-bit activation (two int8
parts per token, `cpu_fast.input_parts`) by madd_epi16. A byte product (maddubs: unsigned byte times signed
byte, pairs summed in saturating int16) would need 8-bit activations and entries of at most 7 bits (127 · 127 ·
2 < 2^15). Each configuration ACT:TABLE simulates that rounding on the exact products: ACT `a8` rounds each
token's input to every decoder linear to int8 with one step per token (max|x| / 127), `a8b64` one step per
block of 64 columns, `a16` the two int8 parts the kernel uses now; TABLE `t8` rounds every codebook to the
int8 tables the fast path uses (largest magnitude / 127), `t7` to 7-bit ones (/ 63); `exact` changes nothing.
Uniform grids keep their grid (their codes are the entries). The embedding and head stay dense. Scored by
anybit's protocol (WikiText-2 test, windows of 2048, float32), first `--max-windows` windows. One JSON line per
configuration to benchmarks/results/activation_width.jsonl, with its change against the first.
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import torch

from _common import log_result
from anybit.data import eval_windows
from anybit.eval.perplexity import evaluate
from anybit.kernels.cpu_fast import input_parts
from anybit.model.loading import load_model
from anybit.pipeline import corpus_ids
from anybit.runtime.qlinear import QuantLinear


def round_rows(values: torch.Tensor, levels: int) -> torch.Tensor:
    """Each row of `values` rounded to a symmetric grid of `levels` steps each side of zero (step max|v| / levels)."""
    step = values.abs().amax(dim=-1, keepdim=True) / levels
    step = torch.where(step > 0, step, torch.ones_like(step))
    return torch.round(values / step).clamp(-levels, levels) * step


def rounded_input(x: torch.Tensor, kind: str) -> torch.Tensor:
    """The activations as a byte (a8: one step per token, a8b64: per 64 columns) or two-part (a16) kernel sees them."""
    if kind == "a16":
        flat = x.reshape(-1, x.shape[-1])
        high, low = input_parts(flat)
        return (high + low).reshape(x.shape).to(x.dtype)
    if kind == "a8":
        return round_rows(x.float(), 127).to(x.dtype)
    if kind == "a8b64":
        blocks = x.float().reshape(*x.shape[:-1], -1, 64)
        return round_rows(blocks, 127).reshape(x.shape).to(x.dtype)
    raise ValueError(f"unknown activation rounding {kind!r}")


def weight_with_tables(layer: QuantLinear, table: str) -> torch.Tensor:
    """The layer's dense weight with its codebooks rounded to int8 (t8) or 7-bit (t7) tables."""
    qt = layer.qtensor
    if getattr(qt, "kind", None) != "codebook" or table not in ("t8", "t7"):
        return layer.dequantize()
    levels = 127 if table == "t8" else 63
    books = {b: round_rows(book.float(), levels) for b, book in qt.codebooks.items()}
    return dataclasses.replace(qt, codebooks=books).dequantize(torch.float32)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dir")
    parser.add_argument("--configs", default="exact,a16:t8,a8:t8,a8:t7,a8b64:t7")
    parser.add_argument("--max-windows", type=int, default=20)
    args = parser.parse_args()
    loaded = load_model(args.dir, torch.float32, "dense")
    layers = [m for m in loaded.model.modules() if isinstance(m, QuantLinear)]
    # Each layer multiplies by its simulated weight through its dense cache, which evaluate() leaves alone only
    # where a CPU kernel serves the layer (`qlinear.dense_weights`): elsewhere the simulation would not apply.
    if not all(layer.cpu_kernel_serves() for layer in layers):
        raise SystemExit(f"{args.dir}: some layers have no CPU kernel; the simulation needs every one served")
    windows = eval_windows(corpus_ids(loaded, "wikitext2"), 2048, args.max_windows)
    first = None
    for config in args.configs.split(","):
        start = time.perf_counter()
        act, _, table = config.partition(":")
        hooks = []
        for layer in layers:
            layer._dense = weight_with_tables(layer, table)
            if act != "exact":
                hooks.append(
                    layer.register_forward_pre_hook(lambda _m, args, kind=act: (rounded_input(args[0], kind),))
                )
        ppl = evaluate(loaded.model, windows, progress=False).ppl
        for hook in hooks:
            hook.remove()
        first = ppl if first is None else first
        log_result(
            "activation_width",
            {
                "dir": args.dir, "config": config, "windows": len(windows), "ppl": ppl,
                "change_vs_first": ppl / first - 1, "seconds": time.perf_counter() - start,
            },
        )  # fmt: skip


if __name__ == "__main__":
    main()
