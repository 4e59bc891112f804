"""Quantizing a model larger than memory allows: wall time and peak resident memory against depth.

Usage: python benchmarks/scale.py [--layers 1 2 4 8 16 32] [--methods rtn gptq anybit]
       [--max-layers-for gptq=8 anybit=1]
       [--nsamples 4] [--seqlen 128] [--work DIR]

Writes a random model with Llama-2-7B's shapes (hidden 4096, intermediate 11008, 32 heads, vocabulary 32000)
as float16 safetensors, one shard per decoder layer, once (as deep as the deepest run asks): the 32-layer
model is 13.5 GB on disk. A model of
fewer layers is a directory whose index names the first shards. Each (method, depth) is quantized by
`anybit quantize` in its own process; its wall time and peak resident memory (`ru_maxrss` of that process)
go to benchmarks/results/scale.jsonl with the size of the source and of the output. The calibration is
deliberately small (few short windows of WikiText-2 validation text, tokenized by the reference model's
tokenizer): this measures the memory and time of the layer-wise machinery, not quality.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

from _common import log_result

HIDDEN, INTERMEDIATE, HEADS, VOCAB, FULL_DEPTH = 4096, 11008, 32, 32000, 32

_CHILD = """
import json, resource, sys, time
from anybit.cli import run
start = time.perf_counter()
try:
    run()
except SystemExit as exit:
    if exit.code:
        raise
print(json.dumps({"seconds": time.perf_counter() - start,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def llama7b_config(layers: int):
    import transformers as tf

    return tf.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=INTERMEDIATE,
        num_hidden_layers=layers,
        num_attention_heads=HEADS,
        num_key_value_heads=HEADS,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
    )


def write_shards(root: Path, depth: int = FULL_DEPTH) -> None:
    """One float16 shard per decoder layer of the full-depth model, plus one for everything else; only the
    first `depth` layers' shards are written (those of a deeper run are added by it)."""
    import transformers as tf
    from safetensors.torch import save_file

    root.mkdir(parents=True, exist_ok=True)
    with torch.device("meta"):
        skeleton = tf.AutoModelForCausalLM.from_config(llama7b_config(FULL_DEPTH))
    params = {name: tuple(p.shape) for name, p in skeleton.named_parameters()}
    for layer in [*range(depth), None]:
        path = root / shard_file(layer)
        if path.exists():
            continue
        generator = torch.Generator().manual_seed(0 if layer is None else layer + 1)  # the same at any depth
        names = [
            n for n in params if (n.startswith(f"model.layers.{layer}.") if layer is not None else "layers." not in n)
        ]
        tensors = {}
        for name in names:
            if name.endswith("norm.weight"):
                tensors[name] = torch.ones(params[name], dtype=torch.float16)
            else:
                std = 0.02 if len(params[name]) == 2 else 1.0
                tensors[name] = (torch.randn(params[name], generator=generator) * std).half()
        tmp = path.with_suffix(".partial")
        save_file(tensors, tmp, metadata={"format": "pt"})
        os.replace(tmp, path)
        print(f"wrote {path.name}", file=sys.stderr, flush=True)


def train_tokenizer():
    """A byte-level BPE tokenizer of Llama-2's vocabulary size, trained on the calibration text (no network)."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    from anybit.data import load_corpus

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator([load_corpus("wikitext2-valid")], vocab_size=VOCAB, special_tokens=["<|endoftext|>"])
    return PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, eos_token="<|endoftext|>")


def shard_file(layer: int | None) -> str:
    return "rest.safetensors" if layer is None else f"layer-{layer:02d}.safetensors"


def model_dir(root: Path, layers: int, tokenizer) -> Path:
    """A model directory of the first `layers` layers, its shards linked to the full model's."""
    from safetensors import safe_open

    path = root / f"llama7b-shapes-{layers}l"
    if (path / "config.json").exists():
        return path
    path.mkdir(exist_ok=True)
    weight_map = {}
    for layer in [*range(layers), None]:
        name = shard_file(layer)
        link = path / name
        if not link.exists():
            os.link(root / "shards" / name, link)
        with safe_open(link, framework="pt") as f:
            weight_map.update(dict.fromkeys(f.keys(), name))
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    tokenizer.save_pretrained(path)
    llama7b_config(layers).save_pretrained(path)
    return path


def quantize(model: Path, out: Path, method: str, nsamples: int, seqlen: int) -> dict:
    bits = {"rtn": "4", "gptq": "4", "anybit": "3.25"}[method]
    argv = ["anybit", "quantize", str(model), "--method", method, "--bits", bits,
            "--nsamples", str(nsamples), "--seqlen", str(seqlen), "--out", str(out), "--force"]  # fmt: skip
    if method == "anybit":  # per-row codebooks: no groups
        argv += ["--fisher-nsamples", str(min(nsamples, 2))]
    else:
        argv += ["--group", "128"]
    done = subprocess.run(
        [sys.executable, "-c", _CHILD, *argv[1:]],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    if done.returncode:
        raise SystemExit(f"{method} on {model.name} failed: {done.stderr.strip().splitlines()[-3:]}")
    record = json.loads(done.stdout.strip().splitlines()[-1])
    return {**record, "argv": argv}


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.iterdir() if p.is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32])
    parser.add_argument("--methods", nargs="+", default=["rtn", "gptq", "anybit"])
    parser.add_argument(
        "--max-layers-for", nargs="*", default=["gptq=8", "anybit=1"], help="METHOD=N: skip deeper models"
    )
    parser.add_argument("--nsamples", type=int, default=4)
    parser.add_argument("--seqlen", type=int, default=128)
    parser.add_argument("--work", type=Path, default=Path.home() / ".cache" / "anybit" / "scale")
    args = parser.parse_args()
    limits = {k: int(v) for k, v in (item.split("=") for item in args.max_layers_for)}

    tokenizer = train_tokenizer()
    runs = [(m, n) for m in args.methods for n in sorted(args.layers) if n <= limits.get(m, FULL_DEPTH)]
    write_shards(args.work / "shards", max((n for _, n in runs), default=0))
    for method, layers in runs:
        model = model_dir(args.work, layers, tokenizer)
        source_bytes = dir_bytes(model)
        out = args.work / f"out-{method}-{layers}l"
        start = time.perf_counter()
        measured = quantize(model, out, method, args.nsamples, args.seqlen)
        info = json.loads((out / "anybit.json").read_text())
        log_result("scale", {
            "method": method, "layers": layers,
            "quantized_weights": info["quantized_weights"], "bits_per_weight": info["bits_per_weight"],
            "source_gb": source_bytes / 1e9, "output_gb": dir_bytes(out) / 1e9,
            "seconds": measured["seconds"], "process_seconds": time.perf_counter() - start,
            "peak_rss_mb": measured["peak_rss_mb"], "nsamples": args.nsamples, "seqlen": args.seqlen,
            "quantize_command": " ".join(measured["argv"]),
        })  # fmt: skip
        shutil.rmtree(out)


if __name__ == "__main__":
    main()
