"""Reproduce the reference perplexities of shared/data/README.md (fp16, RTN and GPTQ on SmolLM2).

Usage: python benchmarks/reference_figures.py [--configs fp16,rtn4,rtn3,gptq4,gptq3] [--dtype bfloat16]
       python benchmarks/reference_figures.py --configs "" --dirs DIR,...   (evaluate kept directories)
A configuration is a name from CONFIGS or `method:bits[:field=value...]`, e.g. `claq:3.25` or
`skim:2.5:scaling=false`.
Each configuration is quantized from scratch, saved, reloaded and evaluated on each `--datasets` corpus
(default the WikiText-2 test set; `--kl` adds KL divergence and top-1 agreement against the unquantized
model); one JSON line per configuration and corpus goes to benchmarks/results/RESULTS_NAME.jsonl.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from _common import log_result
from anybit.config import QuantConfig
from anybit.model.loading import load_model
from anybit.pipeline import evaluate_spec, quantize_to_dir

CONFIGS = {
    "rtn4": dict(method="rtn", bits=4, group_size=64),
    "rtn3": dict(method="rtn", bits=3, group_size=64),
    "rtn4pc": dict(method="rtn", bits=4, group_size=0),
    "rtn3sym": dict(method="rtn", bits=3, group_size=64, sym=True),
    "gptq3sym": dict(method="gptq", bits=3, group_size=64, sym=True),
    "gptq4sym": dict(method="gptq", bits=4, group_size=64, sym=True),
    "gptq4": dict(method="gptq", bits=4, group_size=64),
    "gptq3": dict(method="gptq", bits=3, group_size=64),
    "gptq2": dict(method="gptq", bits=2, group_size=64),
    "gptq4pc": dict(method="gptq", bits=4, group_size=0),
    "gptq3pc": dict(method="gptq", bits=3, group_size=0),
    "kmeans4": dict(method="kmeans", bits=4),
    "kmeans3": dict(method="kmeans", bits=3),
    "kmeans3u": dict(method="kmeans", bits=3, weighting="none"),
    "kmeans3f": dict(method="kmeans", bits=3, weighting="fisher"),
    "squeezellm3": dict(method="squeezellm", bits=3),
    "squeezellm4": dict(method="squeezellm", bits=4),
}


def parse_config(name: str) -> dict:
    """A named configuration above, or an ad-hoc one: `method:bits[:field=value...]` (e.g. `skim:2.5:scaling=false`)."""
    if name in CONFIGS:
        return dict(CONFIGS[name])
    method, bits, *fields = name.split(":")
    config: dict = {"method": method, "bits": float(bits)}
    for field in fields:
        key, value = field.split("=", 1)
        config[key] = {"true": True, "false": False}.get(value.lower(), _number(value))
    return config


def _number(value: str) -> int | float | str:
    for kind in (int, float):
        try:
            return kind(value)
        except ValueError:
            pass
    return value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--configs", default="fp16,rtn4,rtn3,gptq4,gptq3")
    parser.add_argument("--dtype", default="bfloat16", help="evaluation compute dtype")
    parser.add_argument("--calib-dtype", default="bfloat16")
    parser.add_argument("--nsamples", type=int, default=128)
    parser.add_argument("--fisher-nsamples", type=int, default=None)
    parser.add_argument("--max-windows", type=int, default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--results", default="reference_figures", help="name of the results/*.jsonl file")
    parser.add_argument("--keep", default=None, help="save each quantized model under KEEP/CONFIG (default: discard)")
    parser.add_argument("--calib", default="wikitext2-valid", help="calibration corpus of the quantized configs")
    parser.add_argument("--datasets", default="wikitext2", help="comma-separated evaluation corpora")
    parser.add_argument("--kl", action="store_true", help="also KL and top-1 agreement against the unquantized model")
    parser.add_argument("--dirs", default="", help="comma-separated quantized directories to evaluate as they are")
    args = parser.parse_args()
    eval_kwargs = dict(max_windows=args.max_windows, device=args.device, dtype=args.dtype)
    reference = load_model(args.model) if args.kl else None
    datasets = args.datasets.split(",")

    def evaluate_all(loaded, record: dict) -> None:
        for dataset in datasets:
            result = evaluate_spec(loaded, dataset=dataset, reference=reference, **eval_kwargs)
            log_result(args.results, {**record, "dataset": dataset, **result.to_dict()})

    for path in filter(None, args.dirs.split(",")):
        loaded = load_model(path)
        info = loaded.quant_info  # its counted bits were checked against the stored tensors at load
        record = {"config": f"dir:{path}", **info["config"], "bits_per_weight": info["bits_per_weight"]}
        if "end_to_end_tuning" in info:  # `anybit tune`: what it ran and its held-out KL
            record["end_to_end_tuning"] = info["end_to_end_tuning"]
        evaluate_all(loaded, {**record, "quantize_seconds": info.get("quantize_seconds")})
    for name in filter(None, args.configs.split(",")):
        if name == "fp16":
            evaluate_all(load_model(args.model), {"config": name, "bits_per_weight": 16.0})
            continue
        config = QuantConfig(
            **{"calib": args.calib, **parse_config(name)},
            nsamples=args.nsamples,
            device=args.device,
            calib_dtype=args.calib_dtype,
            fisher_nsamples=args.fisher_nsamples,
        )
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(args.keep) / name.replace(":", "_") if args.keep else Path(tmp) / "q"
            outcome = quantize_to_dir(args.model, config, out, force=bool(args.keep))
            record = {
                "config": name,
                **config.to_dict(),
                "bits_per_weight": outcome.bits_per_weight,
                "nominal_bits_per_weight": outcome.meta["nominal_bits_per_weight"],
                "file_bytes": outcome.file_bytes,
                "quantize_seconds": outcome.report.seconds,
            }
            evaluate_all(load_model(str(out)), record)


if __name__ == "__main__":
    main()
