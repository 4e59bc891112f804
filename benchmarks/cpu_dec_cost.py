"""What dynamic error compensation costs on the CPU's native decoder: `anybit bench DIR` with and without
`--dec K`, alternated so that both see the same machine (a shared host's speed drifts by tens of percent).

Usage: python benchmarks/cpu_dec_cost.py DIR [DIR ...] [--dec 8] [--rounds 5]

DIR needs its residuals (`anybit residual DIR`). Each round runs both benches in fresh processes (batch 1,
a 64-token prompt, 128 new tokens, float32, bench's defaults otherwise); the medians over rounds and the
relative cost of --dec go to benchmarks/results/cpu_dec_cost.jsonl, one line per directory.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

from _common import log_result, run_json

ANYBIT = Path(sys.executable).with_name("anybit")


def decode_speed(directory: str, options: list[str]) -> dict:
    command = [str(ANYBIT), "bench", directory, "--json", "--dtype", "float32", "--prompt-tokens", "64",
               "--new-tokens", "128", *options]  # fmt: skip
    return run_json(command)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dirs", nargs="+")
    parser.add_argument("--dec", default="8")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    for directory in args.dirs:
        runs: dict[str, list[dict]] = {"plain": [], "dec": []}
        for _ in range(args.rounds):
            runs["plain"].append(decode_speed(directory, []))
            runs["dec"].append(decode_speed(directory, ["--dec", args.dec]))
        decoders = {run["decoder"] for rows in runs.values() for run in rows}
        median = {
            name: {key: statistics.median(r[key] for r in rows) for key in ("decode_tokens_per_s", "prefill_tokens_per_s")}
            for name, rows in runs.items()
        }  # fmt: skip
        plain, dec = median["plain"]["decode_tokens_per_s"], median["dec"]["decode_tokens_per_s"]
        log_result(
            "cpu_dec_cost",
            {
                "dir": directory, "dec": args.dec, "rounds": args.rounds, "decoders": sorted(decoders),
                "decode_tokens_per_s": plain, "decode_tokens_per_s_dec": dec,
                "prefill_tokens_per_s": median["plain"]["prefill_tokens_per_s"],
                "prefill_tokens_per_s_dec": median["dec"]["prefill_tokens_per_s"],
                "decode_time_cost": plain / dec - 1,
                "every_round": {name: [r["decode_tokens_per_s"] for r in rows] for name, rows in runs.items()},
            },
        )  # fmt: skip


if __name__ == "__main__":
    main()
