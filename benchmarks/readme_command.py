"""The README's first command, run exactly as a new user would, timed, and its table recorded.

Usage: python benchmarks/readme_command.py [--max-windows N]
Reads the command from README.md (the line after "# 1."), runs its `anybit compare ...` part with this
environment's anybit (the set-up half is what produced that environment), and logs the wall time, the
peak resident memory of the run and both rows of the printed table to benchmarks/results/readme_command.jsonl.
--max-windows N appends the option, for a quick check; the recorded figure is the run without it.
"""

from __future__ import annotations

import argparse
import re
import resource
import shlex
import subprocess
import sys
import time
from pathlib import Path

from _common import log_result

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_command() -> list[str]:
    lines = README.read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("# 1."))
    command = next(line for line in lines[start:] if "anybit compare" in line)
    words = shlex.split(command.split("&&", 1)[1])
    return [str(Path(sys.executable).with_name("anybit")), *words[1:]]  # `.venv/bin/anybit` of this venv


def parse_rows(output: str) -> list[dict]:
    rows = []
    for line in output.splitlines():
        match = re.match(r"(.+?)\s{2,}(\d+\.\d+)\s+(\S+ MB)\s+(\d+\.\d+)\s+(\S+)$", line)
        if match:
            method, bits, size, ppl, model = match.groups()
            rows.append({"method": method.strip(), "bits_per_weight": float(bits), "size": size, "ppl": float(ppl),
                         "model": model})  # fmt: skip
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-windows", type=int, default=None)
    args = parser.parse_args()
    command = readme_command() + ([] if args.max_windows is None else ["--max-windows", str(args.max_windows)])
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode:
        raise SystemExit(f"the README command failed: {done.stderr.strip().splitlines()[-1:]}")
    peak_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    log_result("readme_command", {"readme_command": shlex.join(command[1:]), "seconds": seconds,
                                  "peak_rss_mb": peak_kb / 1024, "rows": parse_rows(done.stdout),
                                  "output": done.stdout})  # fmt: skip


if __name__ == "__main__":
    main()
