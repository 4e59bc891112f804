"""GPU latency of the quantized products against fp16 torch.matmul (needs CUDA and triton).

Usage: python benchmarks/kernel_speed.py [--shapes 4096x4096,4096x11008,11008x4096] [--bits 2,3,4] [--batch 1]
--batch up to 8 times the fused decode kernel (`lut_matvec`); more rows time the prefill path
(`lut_matmul`: the matrix decoded by a kernel into a transient fp16 matrix, then one GEMM).
For each (out x in) shape and width b, a random matrix is coded with per-row codebooks of mixed widths
(a third of the rows each at b - 1, b and b + 1, so codes average b bits); the kernel and fp16 matmul
are timed with CUDA events (median of 200 runs after warm-up) twice: called from Python as a layer
calls them (`*_ms`, launch costs included), and replayed from a CUDA graph (`*_graph_ms`, the GPU time
alone, as a graph-captured decode step sees it). The achieved bandwidth (stored bytes read / graph
time) is reported as a share of the device's peak given by --peak-gbs. One JSON line per case goes to
benchmarks/results/kernel_speed.jsonl.
"""

from __future__ import annotations

import argparse

import torch

from _common import device_peak_gbs, log_result
from anybit.format.qtensor import QuantizedTensor
from anybit.kernels.lut_gemv import MAX_BATCH, lut_matmul, lut_matvec, prepare


def mixed_width_tensor(rows: int, cols: int, bits: int, device: str = "cpu") -> QuantizedTensor:
    """Per-row codebooks: a third of the rows at bits - 1, a third at bits, a third at bits + 1 (1-8)."""
    widths = torch.tensor([max(1, bits - 1), bits, min(8, bits + 1)], dtype=torch.uint8, device=device)
    widths = widths[torch.arange(rows, device=device) % 3]
    codes = torch.randint(0, 256, (rows, cols), device=device) % (1 << widths.long())[:, None]
    books = torch.randn(rows, 1, 256, device=device).sort(dim=-1).values * 0.02
    return QuantizedTensor.from_codebook(codes, books, widths[:, None], (rows, cols), cols)


def time_ms(fn, repeats: int = 200) -> float:
    for _ in range(10):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def graph_ms(fn, repeats: int = 200) -> float:
    """Median time of `fn` replayed from a CUDA graph (captured after a warm-up that also autotunes)."""
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return time_ms(graph.replay, repeats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="4096x4096,4096x11008,11008x4096")
    parser.add_argument("--bits", default="2,3,4")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--peak-gbs", type=float, default=None, help="device memory bandwidth (default: by name)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("kernel_speed.py needs a CUDA device")
    peak_gbs = args.peak_gbs or device_peak_gbs()
    product = lut_matvec if args.batch <= MAX_BATCH else lut_matmul
    for shape in args.shapes.split(","):
        rows, cols = (int(v) for v in shape.split("x"))
        dense = torch.randn(rows, cols, dtype=torch.float16, device="cuda") * 0.02
        x = torch.randn(args.batch, cols, dtype=torch.float16, device="cuda")
        fp16_ms = time_ms(lambda dense=dense, x=x: x @ dense.t())
        fp16_graph_ms = graph_ms(lambda dense=dense, x=x: x @ dense.t())
        for bits in (int(b) for b in args.bits.split(",")):
            qt = mixed_width_tensor(rows, cols, bits)
            qt = QuantizedTensor.from_tensors(qt.meta(), {k: v.cuda() for k, v in qt.to_tensors().items()})
            prepared = prepare(qt)
            expected = x.float() @ qt.dequantize().t()
            if product is lut_matvec:  # fp32 accumulation
                torch.testing.assert_close(lut_matvec(prepared, x.float()), expected, rtol=2e-3, atol=2e-3)
            else:  # an fp16 GEMM on an fp16 matrix
                torch.testing.assert_close(lut_matmul(prepared, x).float(), expected, rtol=2e-2, atol=2e-2)
            ms = time_ms(lambda prepared=prepared, x=x: product(prepared, x))
            g_ms = graph_ms(lambda prepared=prepared, x=x: product(prepared, x))
            stored = qt.storage_bits() / 8
            log_result(
                "kernel_speed",
                {
                    "shape": shape,
                    "batch": args.batch,
                    "bits_per_weight": qt.bits_per_weight(),
                    "kernel_ms": ms,
                    "fp16_ms": fp16_ms,
                    "speedup": fp16_ms / ms,
                    "kernel_graph_ms": g_ms,
                    "fp16_graph_ms": fp16_graph_ms,
                    "graph_speedup": fp16_graph_ms / g_ms,
                    "achieved_gbs": stored / g_ms / 1e6,
                    "peak_gbs": peak_gbs,
                    "share_of_peak": stored / g_ms / 1e6 / peak_gbs,
                    "fp16_share_of_peak": rows * cols * 2 / fp16_graph_ms / 1e6 / peak_gbs,
                },
            )


if __name__ == "__main__":
    main()
