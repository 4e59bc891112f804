"""Where one native decode step's time goes: each kind of decoder linear and the head multiplied alone, beside the
whole step, on the same prepared matrices.

Usage: python benchmarks/decode_profile.py DIR [--threads 2] [--rounds 12] [--steps 32] [--tables int16,int8]

For a quantized directory the native decoder serves (loaded as `anybit bench` loads it: fast kernel, 8-bit
head; codebook tables as `--tables` asks, each in its own decoder, the decoders' rounds alternated), times the
best of `--rounds` rounds of: `--steps` decode steps (one token each, after a 64-token
prompt); each linear kind (q, k, v, o, gate, up, down: one token through that matrix of every layer) and the
head alone through `anybit_fast_matmul`. The rest of the step (norms, attention, rounding the activations,
the threads' barriers) is the step less the products (each product alone also pays a parallel region and
its input's rounding, so that figure is rough, and can come out below zero). Each part's bytes (re-laid codes and tables, or the
stored codes a matrix reads in place) over its time give its read rate, beside a streaming read measured in
the same run. One JSON line per kind of tables to benchmarks/results/decode_profile.jsonl.
"""

from __future__ import annotations

import argparse
import ctypes
import time

import torch

from _common import log_result
from anybit.kernels import cpu_fast
from anybit.runtime.native import LINEARS, PATHS, NativeDecoder, greedy_token
from anybit.runtime.native_model import load_for_native
from anybit.runtime.qlinear import set_kernel
from cpu_kernel_bandwidth import read_bandwidth, read_bytes


def product_seconds(lib, parts: dict[str, list], threads: int, rounds: int) -> dict[str, float]:
    """Per part, the best over `rounds` of its share of one token through every matrix in the step's order
    (layer by layer, then the head): the whole set is larger than the caches, as in a decode step."""
    matrices = [[p.matrix() for p in prepared] for prepared in parts.values()]
    cols = max(m.cols for ms in matrices for m in ms)
    x, y = torch.randn(1, cols), torch.empty(1, max(m.rows for ms in matrices for m in ms))
    best = dict.fromkeys(parts, float("inf"))
    for _ in range(rounds):
        spent = dict.fromkeys(parts, 0.0)
        for layer in range(max(len(ms) for ms in matrices)):
            for name, ms in zip(parts, matrices, strict=True):
                if layer < len(ms):
                    start = time.perf_counter()
                    lib.anybit_fast_matmul(ctypes.byref(ms[layer]), x.data_ptr(), 1, y.data_ptr(), threads)
                    spent[name] += time.perf_counter() - start
        best = {name: min(best[name], spent[name]) for name in parts}
    return best


def step_seconds(decoders: dict[str, NativeDecoder], steps: int, rounds: int, prompt: int = 64) -> dict[str, float]:
    """For each decoder, the best time per decode step over `rounds` alternating rounds of `steps` steps."""
    vocab = next(iter(decoders.values())).vocab
    ids = torch.randint(0, vocab, (prompt,), generator=torch.Generator().manual_seed(0))
    best = dict.fromkeys(decoders, float("inf"))
    for _ in range(rounds):
        for name, decoder in decoders.items():
            decoder.reset()
            logits = decoder.forward(ids)
            start = time.perf_counter()
            for _ in range(steps):
                logits = decoder.forward(torch.tensor([greedy_token(logits)]))
            best[name] = min(best[name], (time.perf_counter() - start) / steps)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--tables", default="int8", help="one of int8, int16, or both (int16,int8): alternated")
    args = parser.parse_args()
    tables = args.tables.split(",")
    if not set(tables) <= set(cpu_fast.TABLES):
        raise SystemExit(f"--tables: each one of {', '.join(cpu_fast.TABLES)}")
    torch.set_num_threads(args.threads)
    loaded = load_for_native(args.model, torch.float32, "int8", "auto")
    if loaded is None:
        raise SystemExit(f"{args.model}: not a quantized directory the native decoder serves")
    model = loaded.model
    decoders, parts = {}, {}
    for kind in tables:  # each decoder keeps the matrices it was built on
        set_kernel(model, "auto", kind)
        decoders[kind] = NativeDecoder(model, 64 + args.steps + 1)
        parts[kind] = {name: [layer.get_submodule(PATHS[name]).prepared("fast") for layer in model.model.layers]
                       for name in LINEARS}  # fmt: skip
        head = model.get_output_embeddings()
        if hasattr(head, "prepared"):
            parts[kind]["head"] = [head.prepared("fast")]
    steps = step_seconds(decoders, args.steps, args.rounds)
    gbs = read_bandwidth(5)
    lib = cpu_fast.KERNEL.library()
    for kind in tables:
        record = {"model": args.model, "threads": args.threads, "code_path": cpu_fast.code_path(), "tables": kind,
                  "read_gbs": gbs, "step_ms": steps[kind] * 1e3, "tokens_per_s": 1 / steps[kind]}  # fmt: skip
        products = 0.0
        for name, seconds in product_seconds(lib, parts[kind], args.threads, args.rounds).items():
            nbytes = sum(read_bytes(p) for p in parts[kind][name])
            products += seconds
            record[name] = {"ms": seconds * 1e3, "mb": nbytes / 1e6, "read_share": nbytes / seconds / 1e9 / gbs}
        record["products_ms"] = products * 1e3
        record["rest_ms"] = (steps[kind] - products) * 1e3
        log_result("decode_profile", record)
        print(f"tables {kind}:")
        for name in parts[kind]:
            part = record[name]
            print(f"  {name:5s} {part['ms']:7.3f} ms {part['mb']:7.2f} MB {100 * part['read_share']:5.1f} % of read")
        print(f"  step {record['step_ms']:.3f} ms, products {record['products_ms']:.3f}, rest {record['rest_ms']:.3f};"
              f" read {gbs:.1f} GB/s")  # fmt: skip


if __name__ == "__main__":
    main()
