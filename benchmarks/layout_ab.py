"""What one part of a layout, or of its preparation, costs the fast CPU kernel: two preparations of one layout of
`cpu_kernel_bandwidth.py` side by side, in one process.

Usage: python benchmarks/layout_ab.py [--threads 2] [--tokens 1,8] [--rounds 12]

- "outliers": SqueezeLLM's layout (3-bit row codebooks, 0.45 % sparse outliers, scaling vector, permutation)
  with and without its outliers: the time the outliers add.
- "runs": SliM-LLM's group bit map (2-4 bits, one width per column group for all rows) prepared with its column
  groups in runs of one width (`cpu_fast._group_order`, the default) and in the stored order.

For each, eight copies of the 4096×4096 matrix, the best of `--rounds` alternating rounds of each preparation
(alternating keeps this machine's drifts in speed out of the ratio). One JSON line per comparison and token
count to benchmarks/results/layout_ab.jsonl: `ratio` is the first preparation's speed over the second's.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from unittest import mock

import torch

from _common import log_result
from anybit.kernels import cpu_fast
from cpu_kernel_bandwidth import LAYOUTS, SIDE, _copies

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tokens", default="1,8")
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--comparisons", default=",".join(COMPARISONS))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    for key in args.comparisons.split(","):
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


if __name__ == "__main__":
    main()
