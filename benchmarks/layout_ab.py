"""What one part of a layout, or of its preparation, costs the fast CPU kernel: two preparations of one layout of
`cpu_kernel_bandwidth.py` side by side, in one process.

Usage: python benchmarks/layout_ab.py [--threads 2] [--tokens 1,8] [--rounds 12] [--model DIR]

- "outliers": SqueezeLLM's layout (3-bit row codebooks, 0.45 % sparse outliers, scaling vector, permutation)
  with and without its outliers: the time the outliers add.
- "runs": SliM-LLM's group bit map (2-4 bits, one width per column group for all rows) prepared with its column
  groups in runs of one width (`cpu_fast._group_order`, the default) and in the stored order.

For each, eight copies of the 4096×4096 matrix, the best of `--rounds` alternating rounds of each preparation
(alternating keeps this machine's drifts in speed out of the ratio). With --model DIR (a quantized directory
with outliers that the native decoder serves), also its decode steps with and without their outliers (32 steps
after a 64-token prompt, the best of `--rounds` alternating rounds): what the outliers cost short rows such as
SmolLM2's. One JSON line per comparison and token count to benchmarks/results/layout_ab.jsonl: `ratio` is the
first preparation's speed over the second's.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from unittest import mock

import torch

from _common import log_result
from anybit.kernels import cpu_fast
from anybit.runtime.native import NativeDecoder
from anybit.runtime.native_model import load_for_native
from anybit.runtime.qlinear import quant_linears
from cpu_kernel_bandwidth import LAYOUTS, SIDE, _copies
from decode_profile import step_seconds

SQUEEZELLM = "row codebooks 3-bit + outliers, scaling, permutation"
SLIM = "group bit map g64, 2-4 bits (slim)"


def _outliers() -> tuple[str, list, list]:
    qt = LAYOUTS[SQUEEZELLM]()
    return SQUEEZELLM, [cpu_fast.prepare(qt)], [cpu_fast.prepare(dataclasses.replace(qt, outliers=None))]


def _runs() -> tuple[str, list, list]:
    qt = LAYOUTS[SLIM]()
    runs = cpu_fast.prepare(qt)
    with mock.patch.object(cpu_fast, "_group_order", lambda qt: None):
        stored = cpu_fast.prepare(qt)
    return SLIM, [runs], [stored]


COMPARISONS = {"outliers": (_outliers, "with outliers", "without"), "runs": (_runs, "runs of one width", "stored")}


def best_seconds(sides: tuple[list, list], tokens: int, rounds: int) -> tuple[float, float]:
    """The best time of one product of every matrix of each side with a (tokens, 4096) input."""
    x = torch.randn(tokens, SIDE)
    best = [float("inf"), float("inf")]
    for _ in range(rounds):
        for i, matrices in enumerate(sides):
            start = time.perf_counter()
            for m in matrices:
                cpu_fast.product(m, x)
            best[i] = min(best[i], time.perf_counter() - start)
    return best[0], best[1]


def model_outliers(directory: str, rounds: int) -> tuple[float, float, int]:
    """Seconds per decode step of a quantized directory with and without its outliers, and how many of its
    matrices have outliers."""
    model = load_for_native(directory, torch.float32, "int8", "auto").model
    with_outliers = NativeDecoder(model, 64 + 33)  # holds its matrices' structures, outliers included
    kept = []  # the outliers' tensors, which the first decoder still reads
    for _, layer in quant_linears(model):
        prepared = layer.prepared("fast")
        if getattr(prepared, "outliers", None) is not None:
            kept.append(prepared.outliers)
            prepared.outliers = None
            prepared.__dict__.pop("_plain_matrix", None)
    best = step_seconds({"with": with_outliers, "without": NativeDecoder(model, 64 + 33)}, 32, rounds)
    return best["with"], best["without"], len(kept)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tokens", default="1,8")
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--comparisons", default=",".join(COMPARISONS))
    parser.add_argument("--model", help="a quantized directory with outliers, decoded with and without them")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    for key in filter(None, args.comparisons.split(",")):
        make, first, second = COMPARISONS[key]
        torch.manual_seed(0)
        layout, a, b = make()
        sides = (_copies(a[0], 8), _copies(b[0], 8))
        for tokens in (int(t) for t in args.tokens.split(",")):
            seconds = best_seconds(sides, tokens, args.rounds)
            rate = [8 * SIDE * SIDE * tokens / s / 1e9 for s in seconds]
            log_result(
                "layout_ab",
                {
                    "comparison": key, "layout": layout, "code_path": cpu_fast.code_path(), "tokens": tokens,
                    "threads": args.threads, "first": first, "second": second, "first_gmacs": rate[0],
                    "second_gmacs": rate[1], "ratio": rate[0] / rate[1],
                },
            )  # fmt: skip
    if args.model:
        with_s, without_s, matrices = model_outliers(args.model, args.rounds)
        log_result(
            "layout_ab",
            {
                "comparison": "model outliers", "model": args.model, "code_path": cpu_fast.code_path(),
                "tokens": 1, "threads": args.threads, "matrices_with_outliers": matrices, "first": "with outliers",
                "second": "without", "first_ms_per_step": with_s * 1e3, "second_ms_per_step": without_s * 1e3,
                "ratio": without_s / with_s,
            },
        )  # fmt: skip


if __name__ == "__main__":
    main()
