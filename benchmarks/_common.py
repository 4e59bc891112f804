"""Helpers shared by the benchmark scripts: machine description and result logging."""

from __future__ import annotations

import functools
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"
# Peak memory bandwidth (GB/s) of the GPUs these benchmarks have met, from the vendors' data sheets.
PEAK_GBS = {"H200": 4800.0, "H100 80GB HBM3": 3350.0, "H100 PCIe": 2000.0}


_ISA_LIMITS = ("ATEN_CPU_CAPABILITY", "MKL_ENABLE_INSTRUCTIONS", "ONEDNN_MAX_CPU_ISA")  # emulate a smaller CPU


def machine() -> str:
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}"
    cpu, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    # machines of one name differ in vector units, and bfloat16 speed with them: say which this one has
    isa = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else ""
    isa += " with native bfloat16" if flags & {"avx512_bf16", "amx_bf16"} else ""
    isa += " and AMX tiles" if "amx_int8" in flags else ""
    isa = f", {isa}" if isa else ""
    limits = [f"{k}={os.environ[k]}" for k in _ISA_LIMITS if k in os.environ]
    isa += f" (restricted: {' '.join(limits)})" if limits else ""
    return f"{cpu}{isa}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads, torch {torch.__version__}"


@functools.cache
def commit() -> str:
    """The commit the measured code is at; "+changes" when src/ or the benchmark scripts differ from it
    ($ANYBIT_COMMIT where the caller sets it).
    Taken when the script starts (see the end of this module): the code a long run measures is the code it
    imported, whatever is committed while it runs."""
    root = Path(__file__).resolve().parents[1]

    def git(*args: str) -> str:
        done = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True)
        return done.stdout.strip() if done.returncode == 0 else ""

    if "ANYBIT_COMMIT" in os.environ:  # a copied tree (a lent GPU machine), whose git state may not be the code's
        return os.environ["ANYBIT_COMMIT"]
    head = git("rev-parse", "--short=12", "HEAD") or "unknown"
    changed = git("status", "--porcelain", "--", "src", "benchmarks", ":(exclude)benchmarks/results", ":(exclude)*.md")
    return head + ("+changes" if changed else "")


def device_peak_gbs() -> float:
    """The CUDA device's peak memory bandwidth in GB/s; fails for a device not in PEAK_GBS."""
    name = torch.cuda.get_device_name(0)
    for key, gbs in PEAK_GBS.items():
        if key in name:
            return gbs
    raise SystemExit(f"peak bandwidth of {name!r} unknown: pass --peak-gbs")


ISA_ENV = {  # anybit held to AVX2: its kernel's build, torch's kernels, oneDNN and MKL
    "avx2": {"ANYBIT_CPU_ISA": "avx2", "ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2",
             "MKL_ENABLE_INSTRUCTIONS": "AVX2"},
}  # fmt: skip


def isa_env(isa: str, **extra: str) -> dict:
    """The environment for a child process held to `isa` ("native": as it is; "avx2": `ISA_ENV`)."""
    return {**os.environ, **extra, **ISA_ENV.get(isa, {})}


def run_json(command: list[str], env: dict | None = None) -> dict:
    """The last stdout line of a command that prints one JSON object (an `anybit ... --json`); exits with
    the command's last error line when it fails."""
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode:
        raise SystemExit(f"{' '.join(command)} failed: {done.stderr.strip().splitlines()[-1:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def log_result(name: str, record: dict) -> None:
    """Append one JSON line to benchmarks/results/NAME.jsonl (and echo it)."""
    RESULTS_DIR.mkdir(exist_ok=True)
    record = {
        "time": time.strftime("%Y-%m-%d %H:%M:%S"),
        "machine": machine(),
        "command": " ".join(shlex.quote(a) for a in sys.argv),
        "commit": commit(),
        **record,
    }
    with open(RESULTS_DIR / f"{name}.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")
    print(json.dumps(record), flush=True)


def evaluate_corpora(loaded, model_name: str, datasets: str, max_windows: int | None, kl: bool) -> Iterator[dict]:
    """Evaluate an in-process model (`loaded`: its `LoadedModel`) on each comma-separated corpus, in windows of
    2048 tokens; with `kl`, against the unquantized `model_name` too. Yields each corpus's record fields."""
    from anybit.data import eval_windows
    from anybit.eval.perplexity import evaluate
    from anybit.model.loading import load_model
    from anybit.pipeline import corpus_ids

    reference = load_model(model_name, dtype=torch.float32).model if kl else None
    for dataset in datasets.split(","):
        eval_ids = eval_windows(corpus_ids(loaded, dataset), 2048, max_windows)
        result = evaluate(loaded.model, eval_ids, reference=reference, desc=dataset)
        yield {
            "dataset": dataset,
            "ppl": result.ppl,
            "kl": result.kl,
            "top1_agreement": result.top1_agreement,
            "windows": result.windows,
            "seconds": result.seconds,
        }


commit()  # now, before any measuring
