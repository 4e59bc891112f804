"""Export an anybit rtn/gptq directory to the GPTQ layout and check it with an independent reader: GPTQModel.

Usage: python benchmarks/gptq_export.py DIR [--gptqmodel PATH] [--max-windows 8]

Writes DIR-gptq (v1) and DIR-gptq_v2 beside DIR (replacing earlier ones this script wrote), then, where
GPTQModel imports, loads each export that GPTQModel accepts with its torch (CPU) kernel in float16 and
records: the largest difference between its dequantized weights and anybit's, and the perplexity of the
export (GPTQModel's forward, anybit's evaluation protocol) beside anybit's own directory on the same
windows, both in bfloat16 (GPTQModel's torch kernel takes float16 or bfloat16; float16 matrix products are
very slow on CPUs without native float16), and anybit's in float32. GPTQModel loads an asymmetric v1
checkpoint only when GPTQModel wrote it (zero-point convention), so asymmetric exports are checked through
their gptq_v2 form.

GPTQModel is not an anybit dependency (it pins newer torch); install it apart, for example
`pip install --no-deps --target ~/.cache/anybit/gptqmodel gptqmodel==7.7.0 pypcre device-smi logbar tokenicer
defuser dill threadpoolctl`, and pass that folder as --gptqmodel. One JSON line per export goes to
benchmarks/results/gptq_export.jsonl.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

import torch

from _common import log_result
from anybit.cache import cache_dir
from anybit.data import eval_windows
from anybit.errors import AnybitError
from anybit.eval import evaluate
from anybit.model.checkpoint import load_quantized
from anybit.model.export import FORMATS, export_gptq
from anybit.model.loading import load_model
from anybit.pipeline import corpus_ids
from anybit.runtime.qlinear import quant_linears

DTYPE = torch.bfloat16  # GPTQModel's CPU kernel computes in float16 or bfloat16


def _gptqmodel_load(path: Path):
    from gptqmodel import BACKEND, GPTQModel

    return GPTQModel.load(str(path), device="cpu", backend=BACKEND.TORCH, dtype=DTYPE).model


def _weight_difference(ours: torch.nn.Module, theirs: torch.nn.Module) -> float:
    """Largest |W_theirs - W_ours| / max|W_ours| over the linears, W_theirs read through their forward (DTYPE)."""
    worst = 0.0
    for name, module in quant_linears(ours):
        layer = theirs.get_submodule(name)
        with torch.inference_mode():
            dense = layer(torch.eye(module.in_features, dtype=DTYPE)).float().t()
            if getattr(layer, "bias", None) is not None:
                dense = dense - layer.bias.float()[:, None]
        W = module.dequantize()
        worst = max(worst, float((dense - W).abs().max() / W.abs().max()))
    return worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("directory", type=Path)
    parser.add_argument("--gptqmodel", type=Path, default=cache_dir() / "gptqmodel", help="where GPTQModel is")
    parser.add_argument("--max-windows", type=int, default=4)
    parser.add_argument("--seqlen", type=int, default=2048)
    args = parser.parse_args()
    sys.path.insert(0, str(args.gptqmodel))
    loaded = load_model(str(args.directory))
    windows = eval_windows(corpus_ids(loaded, "wikitext2"), args.seqlen, args.max_windows)
    ours_float32 = evaluate(loaded.model.float(), windows, progress=False).ppl
    sym = bool(loaded.quant_info["config"].get("sym"))
    written: set[str] = set()
    for fmt in FORMATS:
        if fmt in written:
            continue  # "gptq" already fell back to it
        out = args.directory.with_name(f"{args.directory.name}-{fmt}")
        shutil.rmtree(out, ignore_errors=True)
        start = time.perf_counter()
        try:
            config = export_gptq(args.directory, out, fmt)
        except AnybitError as exc:  # recorded: a layout the format cannot hold
            log_result("gptq_export", {"directory": str(args.directory), "format": fmt, "error": str(exc)})
            continue
        written.add(config["checkpoint_format"])
        record = {
            "directory": str(args.directory),
            "format": fmt,
            "checkpoint_format": config["checkpoint_format"],
            "export_seconds": time.perf_counter() - start,
            "bits": config["bits"],
            "group_size": config["group_size"],
            "dynamic_overrides": len(config.get("dynamic", {})),
            "anybit_ppl_float32": ours_float32,
            "windows": len(windows),
        }
        if config["checkpoint_format"] == "gptq" and not sym:
            record["gptqmodel"] = "not loaded: GPTQModel takes asymmetric v1 only from its own quantizer"
        else:
            try:
                theirs = _gptqmodel_load(out)
            except ImportError as exc:
                record["gptqmodel"] = f"not importable: {exc}"
            else:
                quantized, _, _ = load_quantized(args.directory)
                record["max_relative_weight_difference"] = _weight_difference(quantized, theirs)
                record["gptqmodel_ppl_bfloat16"] = evaluate(theirs, windows, progress=False).ppl
                record["anybit_ppl_bfloat16"] = evaluate(quantized.to(DTYPE), windows, progress=False).ppl
        log_result("gptq_export", record)


if __name__ == "__main__":
    main()
