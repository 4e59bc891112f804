"""Memory and time of anybit's model-wide allocation against depth, on error tables shaped like Llama-2-7B's.

Usage: python benchmarks/allocation_scale.py [--layers 1 8 32] [--bits 3.25]

For each depth, in a fresh process: one error table per linear of every layer (rows and columns of a 7B
layer's seven linears; candidate widths 1-6, the 3.25-bit budget's; random convex errors and random fp16
codebooks, since only their sizes matter here), each spilled as the quantizer spills it
(`RowTable.spilled`), then `allocate_model` with the spill file. Reported: resident memory after the tables
(above the process before them), the allocation's peak above that, its time, and the plan's resident size.
Records go to benchmarks/results/allocation_scale.jsonl.
"""

from __future__ import annotations

import argparse
import sys

from _common import log_result, run_json

_CHILD = """
import json, sys, time, torch
from anybit.alloc.skim import RowTable, allocate_model, row_cost_bits
from anybit.memory import SpillFile, return_freed_memory
from anybit.methods.skim import candidate_widths

layers, bits = int(sys.argv[1]), float(sys.argv[2])
SHAPES = {"q": (4096, 4096), "k": (4096, 4096), "v": (4096, 4096), "o": (4096, 4096),
          "gate": (11008, 4096), "up": (11008, 4096), "down": (4096, 11008)}
widths = candidate_widths(bits)

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) / 1024

torch.manual_seed(0)
return_freed_memory()
start_rss = status("VmRSS")
with SpillFile() as spill:
    tables = {}
    for layer in range(layers):
        for name, (rows, cols) in SHAPES.items():
            base = torch.rand(rows, 1, dtype=torch.float64) + 0.1
            errors = base * (torch.rand(rows, 1, dtype=torch.float64) * 0.4 + 0.2) ** torch.arange(len(widths))
            books = [torch.randn(rows, 1 << b).half() for b in widths]
            costs = torch.tensor([[row_cost_bits(cols, b) for b in widths]], dtype=torch.float64).expand(rows, -1)
            table = RowTable(errors, costs, widths, 0, rows * cols, books)
            tables[f"{layer}.{name}"] = table.spilled(spill)
            del books, table
    return_freed_memory()
    tables_rss = status("VmRSS")
    open("/proc/self/clear_refs", "w").write("5")  # the high-water mark starts again from here
    start = time.perf_counter()
    plan = allocate_model(tables, bits, spill)
    seconds = time.perf_counter() - start
    peak = status("VmHWM")
    del tables
    return_freed_memory()
    plan_mib = sum(p.widths.numel() * p.widths.element_size() for p in plan.values()) / 2**20
    rows = sum(p.widths.numel() for p in plan.values())
print(json.dumps({"rows": rows, "tables_mib": tables_rss - start_rss, "allocation_peak_mib": peak - tables_rss,
                  "allocation_seconds": seconds, "plan_widths_mib": plan_mib}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--bits", type=float, default=3.25)
    args = parser.parse_args()
    for layers in args.layers:
        measured = run_json([sys.executable, "-c", _CHILD, str(layers), str(args.bits)])
        log_result("allocation_scale", {"layers": layers, "bits": args.bits, **measured})


if __name__ == "__main__":
    main()
