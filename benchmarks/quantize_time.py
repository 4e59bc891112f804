"""Wall time and peak resident memory of one `anybit quantize` run, in a fresh process, and optionally the
perplexity of what it wrote.

Usage: python benchmarks/quantize_time.py [--eval] MODEL [anybit quantize options...]
Example (issue 21's target, anybit 3.25 with 32 float32 calibration windows):
    python benchmarks/quantize_time.py --eval smollm2-135m --method anybit --bits 3.25 --nsamples 32 \
        --fisher-nsamples 8 --calib-dtype float32
The output goes to a fresh directory under the cache and is removed afterwards; the record in
benchmarks/results/quantize_time.jsonl holds the options, the seconds, the peak RSS, the counted bits, the
time anybit.json reports for the quantization itself and, with --eval, `anybit eval`'s full-test WikiText-2
perplexity of the output in float32 (measured after the timing, in another process). Pass --calib-dtype
explicitly: its default (auto) is bfloat16 on CPUs with native bfloat16 and float32 on the others.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import log_result

_CHILD = """
import json, resource, sys
from anybit.cli import run
try:
    run()
except SystemExit as exit:
    if exit.code:
        raise
print(json.dumps({"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def main() -> None:
    args = sys.argv[1:]
    evaluate = bool(args) and args[0] == "--eval"
    args = args[1:] if evaluate else args
    if not args:
        raise SystemExit(__doc__)
    model, options = args[0], args[1:]
    work = Path(tempfile.mkdtemp(prefix="quantize-time-", dir=Path.home() / ".cache" / "anybit"))
    out = work / "q"
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-c", _CHILD, "quantize", model, *options, "--out", str(out)], capture_output=True, text=True
    )
    seconds = time.perf_counter() - start
    if done.returncode:
        shutil.rmtree(work, ignore_errors=True)
        raise SystemExit(f"anybit quantize failed: {done.stderr.strip().splitlines()[-1:]}")
    info = json.loads((out / "anybit.json").read_text())
    peak = json.loads(done.stdout.strip().splitlines()[-1])["peak_rss_mb"]
    record = {"model": model, "options": options, "seconds": seconds, "quantize_seconds": info["quantize_seconds"],
              "peak_rss_mb": peak, "bits_per_weight": info["bits_per_weight"]}  # fmt: skip
    if evaluate:
        record["wikitext2_ppl"] = _perplexity(out)
    shutil.rmtree(work)
    log_result("quantize_time", record)


def _perplexity(directory: Path) -> float:
    """Full-test WikiText-2 perplexity of a quantized directory, by `anybit eval`."""
    done = subprocess.run(
        [sys.executable, "-m", "anybit.cli", "eval", str(directory), "--dtype", "float32", "--json"],
        capture_output=True,
        text=True,
    )
    if done.returncode:
        raise SystemExit(f"anybit eval failed: {done.stderr.strip().splitlines()[-1:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])["ppl"]


if __name__ == "__main__":
    main()
