"""anybit beside llama.cpp on the same CPU: prefill and decode speed, peak memory and perplexity in one table.

Usage: python benchmarks/cpu_vs_llamacpp.py [ANYBIT_DIR ...] [--threads 2] [--ppl-windows 0] [--types F16,Q8_0,...]
       [--isa avx2]

Once, into the anybit cache: builds llama.cpp's `llama-quantize`, `llama-imatrix`, `llama-bench` and
`llama-perplexity` from the sources vendored in the `llama-cpp-python` sdist (pip download, cmake; a
benchmark tool, never part of anybit's install or tests), and makes GGUFs of the reference weights: F16
(requantized losslessly from the shipped Q4_1 file), Q8_0, Q4_0, and Q4_K_M and IQ4_XS with an
importance matrix computed on the calibration text (WikiText-2 validation).

Then, in one run, with the same thread count, batch 1, a 64-token prompt and 128 new tokens: llama-bench on
each GGUF, and `anybit bench --dtype float32` (its defaults: fast kernel, native decoder, 8-bit embedding
and head for quantized directories) on the dense reference model and on each ANYBIT_DIR; each in
a fresh process under /usr/bin/time for its peak resident memory; for anybit also the peak of `anybit
generate` (its defaults, 128 new tokens of a short prompt). With --ppl-windows N, each model's
perplexity by anybit's protocol on the first N WikiText-2 test windows (`anybit eval` reads the GGUFs too;
for anybit's directories, with the kernel and head the speed run used). With --dec K, each anybit directory
with residuals (`anybit residual DIR`) is run again with dynamic error compensation. With --isa avx2, both
runtimes are held to AVX2 on a CPU that has more, standing in for an AVX2-only CPU: llama.cpp built without
its AVX-512 and VNNI paths (a second build), anybit's kernel built for AVX2 (`ANYBIT_CPU_ISA`), and torch,
oneDNN and MKL told to stop at AVX2.
One JSON line per model goes to benchmarks/results/cpu_vs_llamacpp.jsonl. Run it on an idle machine:
llama.cpp's threads spin and collapse when the cores are shared.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tarfile
from pathlib import Path

from _common import isa_env, log_result
from anybit.cache import cache_dir
from anybit.format.directory import RESIDUAL_FILE
from anybit.model.loading import fetch_alias

SDIST = "llama-cpp-python==0.3.36"
TOOLS = ("llama-quantize", "llama-imatrix", "llama-bench", "llama-perplexity")
TYPES = ("F16", "Q8_0", "Q4_0", "Q4_K_M", "IQ4_XS")
NEEDS_IMATRIX = {"Q4_K_M", "IQ4_XS"}
ANYBIT = Path(sys.executable).with_name("anybit")
CALIBRATION = Path(__file__).resolve().parents[1] / "data" / "wiki.valid.tokens"


def run(command: list[str], **kwargs) -> subprocess.CompletedProcess:
    done = subprocess.run(command, capture_output=True, text=True, **kwargs)
    if done.returncode:
        tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        raise SystemExit(f"{' '.join(command)} failed: {' | '.join(tail)}")
    return done


def build_llamacpp(isa: str) -> Path:
    """The directory holding llama.cpp's tools for `isa` ("native" or "avx2"), built once into the cache."""
    root = cache_dir() / "llama.cpp" / SDIST.split("==")[1]
    bin_dir = root / ("build-noamx" if isa == "native" else f"build-{isa}") / "bin"
    if all((bin_dir / tool).is_file() for tool in TOOLS):
        return bin_dir
    root.mkdir(parents=True, exist_ok=True)
    archives = list(root.glob("*.tar.gz"))
    if not archives:
        run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", SDIST, "-d", str(root)])
        archives = list(root.glob("*.tar.gz"))
    source = root / "src"
    if not source.is_dir():
        with tarfile.open(archives[0]) as archive:
            archive.extractall(source, filter="data")
    llama = next(source.glob("*/vendor/llama.cpp"))
    print(f"building {', '.join(TOOLS)} from {llama} (once)", file=sys.stderr, flush=True)
    flags = ["-DCMAKE_BUILD_TYPE=Release", "-DLLAMA_CURL=OFF", "-DBUILD_SHARED_LIBS=OFF",
             "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_SERVER=OFF", "-DGGML_OPENMP=ON", *isa_flags(isa)]  # fmt: skip
    build = bin_dir.parent
    run(["cmake", "-S", str(llama), "-B", str(build), *flags])
    run(["cmake", "--build", str(build), "--config", "Release", "-j", "2", "--target", *TOOLS])
    return bin_dir


AVX2_LEVEL = {"avx", "avx2", "fma", "f16c", "bmi2"}  # what an AVX2-only x86 CPU (AMD Zen 2/3, Intel Haswell+) has


def isa_flags(isa: str) -> list[str]:
    """ggml's x86 instruction sets as this CPU has them (with `isa` "avx2", only those of AVX2_LEVEL), AMX
    excepted: with -march=native on a CPU with AMX, ggml's AMX backend repacks Q4_0/Q8_0/Q4_K weights and
    llama-bench dies with SIGSEGV at the first product (seen on this project's Intel Xeon machine; llama.cpp
    issue 20824, closed without a fix)."""
    cpuinfo = Path("/proc/cpuinfo").read_text().splitlines()
    flags = set(next((line.split(":", 1)[1].split() for line in cpuinfo if line.startswith("flags")), []))
    if isa == "avx2":
        flags &= AVX2_LEVEL
    wanted = {"GGML_AVX": "avx", "GGML_AVX2": "avx2", "GGML_FMA": "fma", "GGML_F16C": "f16c",
              "GGML_AVX512": "avx512f", "GGML_AVX512_VBMI": "avx512vbmi", "GGML_AVX512_VNNI": "avx512_vnni",
              "GGML_AVX512_BF16": "avx512_bf16", "GGML_AVX_VNNI": "avx_vnni", "GGML_BMI2": "bmi2"}  # fmt: skip
    return ["-DGGML_NATIVE=OFF", *(f"-D{option}={'ON' if flag in flags else 'OFF'}" for option, flag in wanted.items())]


def make_ggufs(bin_dir: Path, types: list[str], threads: int) -> dict[str, Path]:
    """The reference weights as GGUF files of each type (made once into the cache)."""
    out_dir = cache_dir() / "llama.cpp" / "smollm2-135m"
    out_dir.mkdir(parents=True, exist_ok=True)
    f16 = out_dir / "smollm2-135m-F16.gguf"
    if not f16.is_file():
        run([str(bin_dir / "llama-quantize"), "--allow-requantize", str(fetch_alias("smollm2-135m")), str(f16), "F16"])
    imatrix = out_dir / "imatrix.dat"
    if set(types) & NEEDS_IMATRIX and not imatrix.is_file():
        run([str(bin_dir / "llama-imatrix"), "-m", str(f16), "-f", str(CALIBRATION), "-o", str(imatrix),
             "-t", str(threads), "--chunks", "32", "-c", "512"])  # fmt: skip
    files = {"F16": f16}
    for kind in types:
        target = out_dir / f"smollm2-135m-{kind}.gguf"
        if kind != "F16" and not target.is_file():
            extra = ["--imatrix", str(imatrix)] if kind in NEEDS_IMATRIX else []
            run([str(bin_dir / "llama-quantize"), *extra, str(f16), str(target), kind, str(threads)])
        files[kind] = target
    return {kind: files[kind] for kind in types}


def timed(command: list[str], threads: int, isa: str = "native") -> tuple[str, float]:
    """stdout of the command and its peak resident memory in MB (GNU time); torch takes `threads` threads."""
    env = isa_env(isa, OMP_NUM_THREADS=str(threads))
    done = run(["/usr/bin/time", "-f", "PEAK_RSS_KB=%M", *command], env=env)
    peak = next(line for line in done.stderr.splitlines() if line.startswith("PEAK_RSS_KB="))
    return done.stdout, int(peak.split("=")[1]) / 1024


def gguf_linear_bits(path: Path) -> float:
    """Bits per weight of a GGUF's decoder linears (every 2-D `blk.*.weight`), as stored."""
    import gguf

    linears = [t for t in gguf.GGUFReader(path).tensors if t.name.startswith("blk.") and len(t.shape) == 2]
    return 8 * sum(int(t.n_bytes) for t in linears) / sum(int(t.n_elements) for t in linears)


def llama_bench(bin_dir: Path, gguf: Path, threads: int) -> dict:
    out, peak = timed([str(bin_dir / "llama-bench"), "-m", str(gguf), "-p", "64", "-n", "128", "-t", str(threads),
                       "-b", "64", "-o", "json"], threads)  # fmt: skip
    rows = json.loads(out)
    prefill = next(r for r in rows if r["n_prompt"] and not r["n_gen"])
    decode = next(r for r in rows if r["n_gen"] and not r["n_prompt"])
    return {"prefill_tokens_per_s": prefill["avg_ts"], "decode_tokens_per_s": decode["avg_ts"],
            "peak_rss_mb": peak, "file_bytes": gguf.stat().st_size,
            "linear_bits_per_weight": gguf_linear_bits(gguf)}  # fmt: skip


def anybit_bench(model: str, threads: int, options: list[str] = (), isa: str = "native") -> dict:
    """`anybit bench` as a user runs it: its defaults (fast kernel, native decoder, 8-bit embedding and head)."""
    out, peak = timed([str(ANYBIT), "bench", model, "--json", "--dtype", "float32", "--prompt-tokens", "64",
                       "--new-tokens", "128", *options], threads, isa)  # fmt: skip
    result = json.loads(out.strip().splitlines()[-1])
    keys = ("prefill_tokens_per_s", "decode_tokens_per_s", "decoder", "kernel", "tensor_bytes", "kernel_bytes",
            "head", "head_bits_per_weight", "loader", "prompt_path")  # fmt: skip
    return {"peak_rss_mb": peak, **{key: result[key] for key in keys}}


def anybit_generate_peak(model: str, threads: int, isa: str = "native") -> dict:
    """Peak resident memory of `anybit generate` as a user runs it (its defaults), 128 new tokens."""
    _, peak = timed([str(ANYBIT), "generate", model, "--prompt", "The history of the city begins",
                     "--max-new-tokens", "128"], threads, isa)  # fmt: skip
    return {"generate_peak_rss_mb": peak}


def perplexity(model: str, windows: int, runtime: list[str] = ()) -> dict:
    """Perplexity by anybit's protocol; `runtime`: the eval options matching what the speed run ran."""
    if not windows:
        return {}
    command = [str(ANYBIT), "eval", model, "--json", "--dtype", "float32", "--max-windows", str(windows), *runtime]
    out = run(command).stdout
    result = json.loads(out.strip().splitlines()[-1])
    return {"ppl": result["ppl"], "ppl_windows": result["windows"], "bits_per_weight": result.get("bits_per_weight")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("anybit_dirs", nargs="*", help="quantized directories to run beside the GGUFs")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--ppl-windows", type=int, default=0)
    parser.add_argument("--types", default=",".join(TYPES))
    parser.add_argument("--dec", help="also bench each anybit directory with --dec K (needs `anybit residual DIR`)")
    parser.add_argument("--isa", choices=("native", "avx2"), default="native")
    args = parser.parse_args()
    bin_dir = build_llamacpp(args.isa)
    ggufs = make_ggufs(bin_dir, args.types.split(","), args.threads)
    for kind, gguf in ggufs.items():
        try:
            measured = llama_bench(bin_dir, gguf, args.threads)
        except SystemExit as failure:  # recorded, and the other models still run
            print(failure, file=sys.stderr, flush=True)
            log_result("cpu_vs_llamacpp", {"runtime": "llama.cpp", "model": kind, "error": str(failure)})
            continue
        record = {"runtime": "llama.cpp", "model": kind, "isa": args.isa, **measured}
        log_result("cpu_vs_llamacpp", {**record, **perplexity(str(gguf), args.ppl_windows)})
    for model in ["smollm2-135m", *args.anybit_dirs]:
        record = {
            "runtime": "anybit",
            "model": model,
            "isa": args.isa,
            **anybit_bench(model, args.threads, isa=args.isa),
        }
        record.update(anybit_generate_peak(model, args.threads, args.isa))
        runtime = ["--kernel", record["kernel"], "--head", record["head"]]
        log_result("cpu_vs_llamacpp", {**record, **perplexity(model, args.ppl_windows, runtime)})
        if args.dec and (Path(model) / RESIDUAL_FILE).is_file():
            dec = ["--dec", args.dec]
            record = {"runtime": "anybit", "model": model, "isa": args.isa, "dec": args.dec,
                      **anybit_bench(model, args.threads, dec, args.isa)}  # fmt: skip
            log_result("cpu_vs_llamacpp", {**record, **perplexity(model, args.ppl_windows, runtime + dec)})


if __name__ == "__main__":
    main()
