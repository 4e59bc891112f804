"""End-to-end CPU prefill and decode speed of models side by side, each run in a fresh process.

Usage: python benchmarks/cpu_decode.py MODEL [MODEL ...] [--rounds 2] [--prompt-tokens 64] [--new-tokens 32]
Runs `anybit bench MODEL --json` (float32, batch 1, greedy, median of 3 after a warm-up) for every model in
turn, --rounds times, so that drift of the machine shows as spread rather than as a difference between
models. One JSON line per run goes to benchmarks/results/cpu_decode.jsonl. Run it on an idle machine.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from _common import log_result, run_json

ANYBIT = Path(sys.executable).with_name("anybit")


def bench(model: str, prompt_tokens: int, new_tokens: int) -> dict:
    command = [str(ANYBIT), "bench", model, "--json", "--dtype", "float32",
               "--prompt-tokens", str(prompt_tokens), "--new-tokens", str(new_tokens)]  # fmt: skip
    return run_json(command)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="+")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=32)
    args = parser.parse_args()
    for round_ in range(args.rounds):
        for model in args.models:
            log_result("cpu_decode", {"round": round_, **bench(model, args.prompt_tokens, args.new_tokens)})


if __name__ == "__main__":
    main()
