"""Working memory of one error table of anybit's recipe on 7B-shaped matrices, with glibc's default heap and
with large blocks mapped (`anybit.memory.map_large_blocks`, what `quantize_model` sets).

Usage: python benchmarks/table_memory.py [--shapes 4096x11008 4096x4096] [--repeats 3]

Each run is a fresh process: it builds a random matrix W, its H from 512 random inputs and activation
weights, resets the process's high-water mark, measures `error_table` at the candidate widths of a
3.25-bit budget (1-6), and reports the peak resident memory above what was resident before (the working
set of the K-means and the δᵀHδ products, plus whatever the heap keeps of freed temporaries) and the time.
Records go to benchmarks/results/table_memory.jsonl.
"""

from __future__ import annotations

import argparse
import sys

from _common import log_result, run_json

_CHILD = """
import json, sys, time, torch
from anybit.alloc.skim import error_table
from anybit.memory import map_large_blocks, return_freed_memory
from anybit.methods.skim import candidate_widths

rows, cols = (int(v) for v in sys.argv[1].split("x"))
if sys.argv[2] == "mapped":
    map_large_blocks()
torch.manual_seed(0)
W = torch.randn(rows, cols) * 0.02
X = torch.randn(512, cols)
H = X.T @ X / 512
weights = X.square().mean(0)[None, :].expand(rows, cols)
del X
return_freed_memory()

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) / 1024

open("/proc/self/clear_refs", "w").write("5")  # the high-water mark starts again from here
before = status("VmRSS")
start = time.perf_counter()
error_table(W, H, weights, candidate_widths(3.25), with_codes=False)
seconds = time.perf_counter() - start
print(json.dumps({"seconds": seconds, "inputs_mib": before, "working_mib": status("VmHWM") - before}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=["4096x11008", "4096x4096"])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    for shape in args.shapes:
        for repeat in range(args.repeats):
            for heap in ("glibc default", "mapped"):
                measured = run_json([sys.executable, "-c", _CHILD, shape, "mapped" if heap == "mapped" else "default"])
                log_result("table_memory", {"shape": shape, "heap": heap, "repeat": repeat, **measured})


if __name__ == "__main__":
    main()
