"""What the fast CPU path costs in perplexity: the same quantized directories scored on the exact products,
on the fast kernel (int8 activations and codebook tables), and on the fast kernel with the 8-bit embedding
and head that `generate` and `bench` use.

Usage: python benchmarks/fast_path_quality.py DIR [DIR ...] [--max-windows N] [--configs exact:dense,fast:dense,fast:int8]
       [--isa avx2]

Each configuration KERNEL:HEAD[:TABLES] is `anybit eval DIR --json --dtype float32 --kernel KERNEL --head HEAD
--tables TABLES` (TABLES int8 unless given) in a fresh process (the reference protocol: WikiText-2 test,
windows of 2048). One JSON line per directory and configuration to
benchmarks/results/fast_path_quality.jsonl, with the relative change against the first configuration.
`--isa avx2` holds the kernel (and torch) to AVX2, as `cpu_vs_llamacpp.py` does, to score that path on a CPU
that has more.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from _common import ISA_ENV, isa_env, log_result, run_json

ANYBIT = Path(sys.executable).with_name("anybit")


def score(directory: str, kernel: str, head: str, tables: str, max_windows: int | None, isa: str) -> dict:
    command = [str(ANYBIT), "eval", directory, "--json", "--dtype", "float32", "--kernel", kernel, "--head", head]
    command += ["--tables", tables]
    if max_windows:
        command += ["--max-windows", str(max_windows)]
    return run_json(command, isa_env(isa))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dirs", nargs="+")
    parser.add_argument("--max-windows", type=int, default=None, help="default: the full test (147 windows)")
    parser.add_argument("--configs", default="exact:dense,fast:dense,fast:int8")
    parser.add_argument("--isa", choices=("native", *ISA_ENV), default="native")
    args = parser.parse_args()
    for directory in args.dirs:
        first = None
        for config in args.configs.split(","):
            kernel, head, tables = [*config.split(":"), "int8"][:3]
            result = score(directory, kernel, head, tables, args.max_windows, args.isa)
            first = first or result["ppl"]
            log_result(
                "fast_path_quality",
                {
                    "dir": directory, "kernel": kernel, "head": head, "tables": tables, "isa": args.isa,
                    "ppl": result["ppl"],
                    "windows": result["windows"], "seconds": result["seconds"],
                    "bits_per_weight": result.get("bits_per_weight"), "change_vs_first": result["ppl"] / first - 1,
                },
            )  # fmt: skip


if __name__ == "__main__":
    main()
