"""CPU decode products: the C kernel against the reference path (decode, then multiply), on a real model.

Usage: python benchmarks/cpu_kernel_speed.py DIR [--batch 1] [--rounds 3] [--threads N]
For the quantized model in DIR: one pass over every decoder linear with a (batch, in) input, timed for
the reference path and for the C kernel in alternating rounds within one process (so that a busy
machine slows both alike), with a dense float32 matmul pass as the floor. Checks the kernel's products
against the reference first. One JSON line to benchmarks/results/cpu_kernel_speed.jsonl.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from _common import log_result
from anybit.kernels import cpu
from anybit.model.loading import load_model
from anybit.runtime.qlinear import quant_linears


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dir")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch (and kernel) threads; default: torch's")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    layers = dict(quant_linears(load_model(args.dir).model))
    served = {name: layer for name, layer in layers.items() if not cpu.unavailable(layer.qtensor)}
    inputs = {name: torch.randn(args.batch, layer.in_features) for name, layer in served.items()}
    dense = {name: layer.dequantize() for name, layer in served.items()}
    prepared = {name: cpu.prepare(layer.qtensor) for name, layer in served.items()}
    for name in served:
        expected = inputs[name] @ dense[name].t()
        torch.testing.assert_close(cpu.matvec(prepared[name], inputs[name]), expected, rtol=1e-4, atol=1e-4)

    passes = {
        "reference": lambda: [inputs[n] @ layer.dequantize().t() for n, layer in served.items()],
        "kernel": lambda: [cpu.matvec(prepared[n], inputs[n]) for n in served],
        "dense": lambda: [inputs[n] @ dense[n].t() for n in served],
    }
    seconds: dict[str, list[float]] = {key: [] for key in passes}
    for _ in range(args.rounds + 1):  # round 0 warms up
        for key, run in passes.items():
            start = time.perf_counter()
            run()
            seconds[key].append(time.perf_counter() - start)
    ms = {key: 1000 * statistics.median(values[1:]) for key, values in seconds.items()}
    log_result(
        "cpu_kernel_speed",
        {
            "dir": args.dir,
            "batch": args.batch,
            "threads": torch.get_num_threads(),
            "linears": len(layers),
            "linears_served": len(served),
            "weights_served": sum(layer.in_features * layer.out_features for layer in served.values()),
            "reference_ms": ms["reference"],
            "kernel_ms": ms["kernel"],
            "dense_fp32_ms": ms["dense"],
            "speedup": ms["reference"] / ms["kernel"],
            "kernel_over_dense": ms["kernel"] / ms["dense"],
        },
    )


if __name__ == "__main__":
    main()
