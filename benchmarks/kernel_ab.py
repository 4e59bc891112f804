"""Two versions of the fast CPU kernel side by side, in one process, on the same prepared matrices.

Usage: python benchmarks/kernel_ab.py --old REV [--isa avx2] [--threads 1] [--tokens 1,8,64]
       [--layouts "row codebooks 3.25,uniform g64"] [--rounds 12] [--model DIR [--prompt-tokens 64] [--new-tokens 64]]
       [--attention 512,2048 [--attention-tokens 1]]

The old kernel is `src/anybit/kernels/int8_lut.c` at git revision REV, the new one the working tree's; both are
built as anybit builds its kernels (`kernels.build.CompiledKernel`, for `ANYBIT_CPU_ISA`, into the anybit cache)
and called through the same `anybit_matrix`, so the two versions must share the matrix structure and the re-laid
code layout (the working tree's `cpu_fast.prepare` lays them out). For each layout of `cpu_kernel_bandwidth.py` (`--copies`
of its 4096×4096 matrix, 8 by default: past the L3; 1 stays in it) and token count, the best of `--rounds` alternating rounds of each version: alternating
in one process keeps this machine's drifts in speed (up to 30 % between runs minutes apart) out of the ratio.
One JSON line per layout and token count to benchmarks/results/kernel_ab.jsonl. With --model DIR (a quantized
directory the native decoder serves), also that model end to end, on `--threads` threads: a `--prompt-tokens`
prompt, then `--new-tokens` greedy tokens, the best of `--rounds` alternating rounds for each (two more JSON lines,
"tokens" the prompt's length and 1): short rows such as SmolLM2's 576 columns weigh what a kernel does per row more
than the 4096-column layouts do, and long prompts weigh the attention. An old source whose KV cache is float32
(before the float16 cache) decodes on a float32 cache (`_float32_cache`). With --attention POSITIONS, also the
decode step's attention alone (`anybit_attention`, both versions on float16 caches) for `--attention-tokens` tokens
(1: a decode step; `--attention 0 --attention-tokens 2048`: a 2048-token prompt's) from each of those positions, in
SmolLM2's shape (30 layers of 9 query heads over 3 KV heads of 64 floats, a cache per layer).
"""

from __future__ import annotations

import argparse
import ctypes
import re
import subprocess
import tempfile
import time
from pathlib import Path

import torch

from _common import log_result
from anybit.kernels import build, cpu_fast
from cpu_kernel_bandwidth import LAYOUTS, SIDE, _copies

SOURCE = "src/anybit/kernels/int8_lut.c"


def matrix_struct(source: str) -> str:
    """`anybit_matrix`'s definition in a kernel source, without its comments and spacing: its fields."""
    end = source.index("} anybit_matrix;")
    text = re.sub(r"/\*.*?\*/", " ", source[source.rindex("typedef struct {", 0, end) : end], flags=re.S)
    return " ".join(text.split())


def load(kernel: build.CompiledKernel) -> ctypes.CDLL:
    lib = kernel.library()
    if isinstance(lib, str):
        raise SystemExit(lib)
    return lib


def best_seconds(libs: dict, matrices: list, tokens: int, threads: int, rounds: int) -> dict[str, float]:
    """The best time of one product per matrix, for each kernel, over `rounds` alternating rounds."""
    x = torch.randn(tokens, SIDE)
    y = torch.empty(tokens, SIDE)
    best = dict.fromkeys(libs, float("inf"))
    for _ in range(rounds):
        for name, lib in libs.items():
            start = time.perf_counter()
            for m in matrices:
                if lib.anybit_fast_matmul(ctypes.byref(m), x.data_ptr(), tokens, y.data_ptr(), threads):
                    raise MemoryError("the kernel could not allocate its scratch")
            best[name] = min(best[name], (time.perf_counter() - start) / len(matrices))
    return best


def _float32_cache(decoder) -> None:
    """Give a decoder float32 KV caches, for a kernel source from before the float16 cache."""
    decoder.k_cache = torch.zeros(decoder.k_cache.shape)
    decoder.v_cache = torch.zeros(decoder.v_cache.shape)
    decoder._model.k_cache, decoder._model.v_cache = decoder.k_cache.data_ptr(), decoder.v_cache.data_ptr()


def decode_seconds(
    libs: dict, model_dir: str, threads: int, rounds: int, prompt: int, new: int, float32_caches: set
) -> tuple[dict, dict]:
    """The best time of the native decoder on `model_dir` per prompt token (a `prompt`-token prefill) and per
    decode step, for each kernel (those named in `float32_caches` on float32 KV caches)."""
    from anybit.runtime.native import NativeDecoder, greedy_token
    from anybit.runtime.native_model import load_for_native

    loaded = load_for_native(model_dir, torch.float32, "int8", "auto")
    if loaded is None:
        raise SystemExit(f"{model_dir}: not a quantized directory the native decoder serves")
    decoders = {name: NativeDecoder(loaded.model, prompt + new + 1, lib) for name, lib in libs.items()}
    for name in float32_caches:
        _float32_cache(decoders[name])
    ids = torch.randint(0, loaded.model.config.vocab_size, (prompt,), generator=torch.Generator().manual_seed(0))
    prefill, decode = dict.fromkeys(libs, float("inf")), dict.fromkeys(libs, float("inf"))
    for _ in range(rounds):
        for name, decoder in decoders.items():
            decoder.reset()
            start = time.perf_counter()
            logits = decoder.forward(ids)
            prefill[name] = min(prefill[name], (time.perf_counter() - start) / prompt)
            start = time.perf_counter()
            for _ in range(new):
                logits = decoder.forward(torch.tensor([greedy_token(logits)]))
            decode[name] = min(decode[name], (time.perf_counter() - start) / new)
    return prefill, decode


def attention_seconds(libs: dict, position: int, tokens: int, threads: int, rounds: int) -> dict[str, float]:
    """The best time, for each kernel, of the attention of `tokens` tokens from `position` in every layer of
    SmolLM2's shape."""
    layers, kv_heads, heads, head_dim = 30, 3, 9, 64
    span = position + tokens
    caches = [torch.randn(2, kv_heads, span, head_dim).half() for _ in range(layers)]
    q, out = torch.randn(tokens, heads, head_dim), torch.empty(tokens, heads, head_dim)
    from anybit.runtime.native import declare_attention

    for lib in libs.values():
        declare_attention(lib)
    best = dict.fromkeys(libs, float("inf"))
    for _ in range(rounds):
        for name, lib in libs.items():
            start = time.perf_counter()
            for cache in caches:
                keys, values = cache[0], cache[1]
                lib.anybit_attention(
                    q.data_ptr(), keys.data_ptr(), values.data_ptr(), tokens, position, heads, kv_heads, head_dim,
                    span, 0, head_dim**-0.5, out.data_ptr(), threads,
                )  # fmt: skip
            best[name] = min(best[name], time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--old", required=True, help="git revision of the old kernel source")
    parser.add_argument("--isa", choices=tuple(build.ISA_FLAGS), default="native")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--tokens", default="1,8,64")
    parser.add_argument("--layouts", default="row codebooks 3.25,uniform g64, 4-bit")
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--copies", type=int, default=8, help="copies of each layout's matrix (1: held in the L3)")
    parser.add_argument("--model", help="a quantized directory whose native decode steps to time as well")
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--attention", help="positions at which to time the attention alone (e.g. 512,2048)")
    parser.add_argument("--attention-tokens", type=int, default=1, help="tokens whose attention --attention times")
    args = parser.parse_args()
    if args.isa != build.requested_isa():
        raise SystemExit(f"set ANYBIT_CPU_ISA={args.isa}: the matrices must be laid out for the kernels compared")
    root = Path(__file__).resolve().parent.parent
    old_text = subprocess.run(["git", "show", f"{args.old}:{SOURCE}"], cwd=root, capture_output=True, text=True)
    if old_text.returncode:
        raise SystemExit(f"git show {args.old}:{SOURCE} failed: {old_text.stderr.strip()}")
    if args.attention and "int anybit_attention(const float *q, const uint16_t" not in old_text.stdout:
        raise SystemExit(f"--attention: {args.old} has no anybit_attention on a float16 cache")
    if args.model and matrix_struct(old_text.stdout) != matrix_struct((root / SOURCE).read_text()):
        # products take a pointer and read what they know of the structure; the decoder's layers hold it by value
        raise SystemExit(f"--model: anybit_matrix differs between {args.old} and the working tree")
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as scratch:
        old_source = Path(scratch, Path(SOURCE).name)
        old_source.write_text(old_text.stdout)
        libs = {"old": load(build.CompiledKernel(old_source, cpu_fast._declare)), "new": load(cpu_fast.KERNEL)}
        for prefix in filter(None, (p.strip() for p in args.layouts.split(","))):  # --layouts "": none
            for name, make in LAYOUTS.items():
                if not name.startswith(prefix):
                    continue
                torch.manual_seed(0)
                prepared = _copies(cpu_fast.prepare(make()), args.copies)
                matrices = [p.matrix() for p in prepared]  # `prepared` keeps their memory alive
                for tokens in (int(t) for t in args.tokens.split(",")):
                    best = best_seconds(libs, matrices, tokens, args.threads, args.rounds)
                    rate = {k: SIDE * SIDE * tokens / v / 1e9 for k, v in best.items()}
                    log_result(
                        "kernel_ab",
                        {
                            "old": args.old, "isa": args.isa, "code_path": cpu_fast.code_path(), "layout": name,
                            "tokens": tokens, "threads": args.threads, "copies": args.copies, "old_gmacs": rate["old"],
                            "new_gmacs": rate["new"], "speedup": rate["new"] / rate["old"],
                        },
                    )  # fmt: skip
        if args.model:
            float32_caches = set() if "uint16_t *k_cache" in old_text.stdout else {"old"}
            prefill, decode = decode_seconds(
                libs, args.model, args.threads, args.rounds, args.prompt_tokens, args.new_tokens, float32_caches
            )
            for tokens, best in ((args.prompt_tokens, prefill), (1, decode)):  # the prompt, then single tokens
                log_result(
                    "kernel_ab",
                    {
                        "old": args.old, "isa": args.isa, "code_path": cpu_fast.code_path(), "model": args.model,
                        "tokens": tokens, "threads": args.threads, "old_tokens_per_s": 1 / best["old"],
                        "new_tokens_per_s": 1 / best["new"], "speedup": best["old"] / best["new"],
                    },
                )  # fmt: skip
        for position in (int(p) for p in (args.attention or "").split(",") if p):
            best = attention_seconds(libs, position, args.attention_tokens, args.threads, args.rounds)
            log_result(
                "kernel_ab",
                {
                    "old": args.old, "isa": args.isa, "code_path": cpu_fast.code_path(), "attention_position": position,
                    "attention_tokens": args.attention_tokens, "threads": args.threads, "old_ms": 1e3 * best["old"],
                    "new_ms": 1e3 * best["new"], "speedup": best["old"] / best["new"],
                },
            )  # fmt: skip


if __name__ == "__main__":
    main()
