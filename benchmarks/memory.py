"""Memory footprint of a quantized model against its 16-bit original, loaded and generating on CPU.

Usage: python benchmarks/memory.py DIR [DIR ...] [--source smollm2-135m] [--new-tokens 32]
Each measurement runs in a fresh process: the bytes of every tensor the model holds (parameters and
buffers, shared ones once), the peak resident memory after loading, and the peak after generating
(greedy, up to --new-tokens tokens; tokens per second counts the re-tokenized output).
The source model is loaded in bfloat16 (the size of fp16). One JSON line per model goes to
benchmarks/results/memory.jsonl.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from _common import log_result

PROBE = r"""
import json, resource, sys, torch
from anybit.generate import generate
from anybit.model.loading import load_model

def peak_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

base = peak_mb()
loaded = load_model(sys.argv[1], dtype=torch.bfloat16)
from anybit.bench import tensor_bytes as model_tensor_bytes
tensor_bytes, linear_bytes = model_tensor_bytes(loaded.model), 0
from anybit.runtime.qlinear import QuantLinear
for name, m in loaded.model.named_modules():
    if isinstance(m, QuantLinear):
        linear_bytes += sum(b.numel() * b.element_size() for b in m.buffers())
    elif isinstance(m, torch.nn.Linear) and ".layers." in f".{name}":
        linear_bytes += m.weight.numel() * m.weight.element_size()
after_load = peak_mb()
import time
generate(loaded, "The history of the city", max_new_tokens=2, quiet=True)  # warm-up
start = time.perf_counter()
text = generate(loaded, "The history of the city", max_new_tokens=int(sys.argv[2]), quiet=True)
seconds = time.perf_counter() - start
print(json.dumps({
    "tensor_bytes": tensor_bytes,
    "decoder_linear_bytes": linear_bytes,
    "peak_rss_mb_before_load": base,
    "peak_rss_mb_after_load": after_load,
    "peak_rss_mb_after_generate": peak_mb(),
    "generated_chars": len(text),
    "generate_seconds": seconds,
    "tokens_per_second": len(loaded.tokenizer(text, add_special_tokens=False).input_ids) / seconds,
}))
"""


def probe(spec: str, new_tokens: int) -> dict:
    proc = subprocess.run(
        [sys.executable, "-c", PROBE, spec, str(new_tokens)], capture_output=True, text=True, check=True
    )
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dirs", nargs="+")
    parser.add_argument("--source", default="smollm2-135m")
    parser.add_argument("--new-tokens", type=int, default=32)
    args = parser.parse_args()
    reference = probe(args.source, args.new_tokens)
    log_result("memory", {"model": args.source, "bits_per_weight": 16.0, **reference})
    for directory in args.dirs:
        info = json.loads((Path(directory) / "anybit.json").read_text())
        measured = probe(directory, args.new_tokens)
        log_result(
            "memory",
            {
                "model": directory,
                "method": info["method"],
                "bits_per_weight": info["bits_per_weight"],
                **measured,
                "tensor_ratio_to_16bit": measured["tensor_bytes"] / reference["tensor_bytes"],
                "linear_bits_per_weight_in_memory": 16
                * measured["decoder_linear_bytes"]
                / reference["decoder_linear_bytes"],
                "load_rss_growth_ratio": (measured["peak_rss_mb_after_load"] - measured["peak_rss_mb_before_load"])
                / (reference["peak_rss_mb_after_load"] - reference["peak_rss_mb_before_load"]),
            },
        )


if __name__ == "__main__":
    main()
