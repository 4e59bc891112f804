"""GPU cost of dynamic error compensation per linear layer (needs CUDA and triton).

Usage: python benchmarks/dec_speed.py [--shapes 4096x4096,4096x11008,11008x4096] [--ks 0,4,8,16,32,64] [--bits 3]
For each (out x in) shape: a random per-row-codebook matrix of `bits` and its 4-bit residual (codes in
pinned host memory), then the median latency of one decode step (batch 1) of the base kernel alone
and of base + per-chunk top-k selection + compensation kernel for each K, called from Python and replayed
from a CUDA graph (`*_graph_ms`: GPU time alone), with the compensation on the same stream after the base
product and (`overlap_*`) on a second stream, concurrent with it; `select_graph_ms` is the exact per-chunk
top-k alone. The slowdowns against the base product and the host bytes read per step are logged to
benchmarks/results/dec_speed.jsonl.
"""

from __future__ import annotations

import argparse

import torch

from _common import log_result
from anybit.kernels.lut_gemv import lut_matvec, prepare
from anybit.runtime.dec import (
    Compensator,
    chunk_budgets,
    join_compensation,
    launch_compensation,
    quantize_residual,
    select_channels,
)
from kernel_speed import graph_ms, mixed_width_tensor, time_ms


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="4096x4096,4096x11008,11008x4096")
    parser.add_argument("--ks", default="0,4,8,16,32,64")
    parser.add_argument("--bits", type=int, default=3)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("dec_speed.py needs a CUDA device")
    for shape in args.shapes.split(","):
        rows, cols = (int(v) for v in shape.split("x"))
        qt = mixed_width_tensor(rows, cols, args.bits)
        dense = qt.dequantize()
        residual = quantize_residual(torch.randn(rows, cols) * dense.abs().mean() * 0.3)
        qt = qt.__class__.from_tensors(qt.meta(), {k: v.cuda() for k, v in qt.to_tensors().items()})
        prepared = prepare(qt)
        x = torch.randn(1, cols, device="cuda")
        base_ms = time_ms(lambda prepared=prepared, x=x: lut_matvec(prepared, x))
        base_graph_ms = graph_ms(lambda prepared=prepared, x=x: lut_matvec(prepared, x))
        for k in (int(v) for v in args.ks.split(",")):
            comp = Compensator(residual, k)

            def step(prepared=prepared, x=x, comp=comp, k=k):
                y = lut_matvec(prepared, x)
                return y + comp(x) if k else y

            def overlapped(prepared=prepared, x=x, comp=comp):
                pending = launch_compensation(comp, x)  # second stream, concurrent with the base product
                y = lut_matvec(prepared, x)
                return y + join_compensation(pending)

            ms = time_ms(step)
            g_ms = graph_ms(step)
            overlap_ms = time_ms(overlapped) if k else ms
            overlap_g_ms = graph_ms(overlapped) if k else g_ms
            select_g_ms = graph_ms(lambda x=x, k=k: select_channels(x, k)) if k else 0.0
            selected = sum(kept for _, _, kept in chunk_budgets(cols, k))
            log_result(
                "dec_speed",
                {
                    "shape": shape,
                    "bits": args.bits,
                    "k_chunk": k,
                    "channels_per_step": selected,
                    "host_bytes_per_step": selected * residual.codes.shape[1],
                    "base_ms": base_ms,
                    "with_dec_ms": ms,
                    "slowdown": ms / base_ms - 1,
                    "base_graph_ms": base_graph_ms,
                    "with_dec_graph_ms": g_ms,
                    "graph_slowdown": g_ms / base_graph_ms - 1,
                    "host_gbs": selected * residual.codes.shape[1] / max(g_ms - base_graph_ms, 1e-6) / 1e6,
                    "overlap_ms": overlap_ms,
                    "overlap_graph_ms": overlap_g_ms,
                    "overlap_graph_slowdown": overlap_g_ms / base_graph_ms - 1,
                    "select_graph_ms": select_g_ms,
                },
            )


if __name__ == "__main__":
    main()
