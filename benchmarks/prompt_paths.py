"""Prompt products on the fast CPU kernel: row by row against blocks of rows (AVX-512 registers, AMX tiles).

Usage: [ANYBIT_CPU_ISA=avx2] python benchmarks/prompt_paths.py DIR [--tokens 64,2048] [--rounds 5] [--threads N]
For the quantized model in DIR: one pass over every decoder linear the fast kernel serves with a (tokens, in)
input, on each prompt path this build and CPU offer (`kernels.cpu_fast.prompt_path`), in alternating rounds
within one process (so that a busy machine slows every path alike), medians after a warm-up round. Checks
first that each block path gives the row path's products (up to float32 summation order). One JSON line per
token count to benchmarks/results/prompt_paths.jsonl.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from _common import log_result
from anybit.kernels import cpu_fast
from anybit.model.loading import load_model
from anybit.runtime.qlinear import quant_linears


def available_paths() -> list[str]:
    """The prompt paths this build, CPU and system offer, the row path first; the default restored."""
    default = cpu_fast.prompt_path()
    paths = [p for p in cpu_fast.PROMPT_PATHS if cpu_fast.prompt_path(p) == p]
    cpu_fast.prompt_path(default)
    return paths


def one_pass(prepared: dict, inputs: dict, path: str) -> dict[str, torch.Tensor]:
    cpu_fast.prompt_path(path)
    return {name: cpu_fast.product(p, inputs[name]) for name, p in prepared.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dir")
    parser.add_argument("--tokens", default="64,2048")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch (and kernel) threads; default: torch's")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    layers = dict(quant_linears(load_model(args.dir).model))
    served = {name: layer for name, layer in layers.items() if not cpu_fast.unavailable(layer.qtensor)}
    prepared = {name: cpu_fast.prepare(layer.qtensor) for name, layer in served.items()}
    paths = available_paths()
    default = cpu_fast.prompt_path()
    try:
        for tokens in (int(t) for t in args.tokens.split(",")):
            inputs = {name: torch.randn(tokens, layer.in_features) for name, layer in served.items()}
            rows = one_pass(prepared, inputs, "rows")
            for path in paths[1:]:
                for name, out in one_pass(prepared, inputs, path).items():
                    torch.testing.assert_close(out, rows[name], rtol=1e-4, atol=1e-3)
            seconds: dict[str, list[float]] = {path: [] for path in paths}
            for _ in range(args.rounds + 1):  # round 0 warms up
                for path in paths:
                    start = time.perf_counter()
                    one_pass(prepared, inputs, path)
                    seconds[path].append(time.perf_counter() - start)
            ms = {path: 1000 * statistics.median(values[1:]) for path, values in seconds.items()}
            log_result(
                "prompt_paths",
                {
                    "dir": args.dir, "tokens": tokens, "threads": torch.get_num_threads(),
                    "linears": len(layers), "linears_served": len(served), "code_path": cpu_fast.code_path(),
                    "default_path": default,
                    **{f"{path}_ms": ms[path] for path in paths},
                    **{f"{path}_tokens_per_s": 1000 * tokens / ms[path] for path in paths},
                    **{f"{path}_speedup": ms["rows"] / ms[path] for path in paths[1:]},
                },
            )  # fmt: skip
    finally:
        cpu_fast.prompt_path(default)


if __name__ == "__main__":
    main()
