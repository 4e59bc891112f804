"""Quality of dynamic error compensation (QDEC/DecDEC) on quantized SmolLM2 directories.

Usage: python benchmarks/dec_quality.py DIR [DIR ...] [--ks 4,8,16,32,64] [--static-ks 8,32] [--max-windows N]
                                        [--plans PLAN ...] [--score activation|contribution] [--device cuda]
                                        [--fit K|PLAN] [--dataset wikitext2|wikitext2-valid]
For each quantized DIR: stores its 4-bit residuals (`anybit residual [--fit K]`) unless those stored
already match, then evaluates
perplexity without DEC, with dynamic top-k selection for every K and every per-layer-type PLAN
("qkv=4,o=8,gu=4,down=16", see `anybit.runtime.dec.DecPlan`), and with the static baseline
(channels with the largest mean |x| on calibration data) for each K in --static-ks. One JSON line
per evaluation goes to benchmarks/results/dec_quality.jsonl.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from _common import log_result
from anybit.format.directory import RESIDUAL_FILE
from anybit.model.adapters import get_adapter
from anybit.model.checkpoint import load_residuals
from anybit.model.loading import load_model
from anybit.pipeline import build_residuals, evaluate_spec
from anybit.runtime.dec import FIT_RIDGE, DecPlan


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dirs", nargs="+")
    parser.add_argument("--ks", default="4,8,16,32,64")
    parser.add_argument("--static-ks", default="8,32")
    parser.add_argument("--max-windows", type=int, default=None)
    parser.add_argument("--dataset", default="wikitext2", help="evaluation text (wikitext2-valid: calibration text)")
    parser.add_argument("--skip-base", action="store_true", help="do not evaluate without DEC")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--device", default="cpu", help="evaluation device (cpu or cuda)")
    parser.add_argument("--residual-nsamples", type=int, default=8)
    parser.add_argument("--score", default="activation", help="channel ranking: activation or contribution")
    parser.add_argument("--plans", nargs="*", default=[], help="per-layer-type k_chunk plans, dynamic selection")
    parser.add_argument("--fit", default=None, help="residuals fitted for k_chunk K or a PLAN (default: W - Q(W))")
    parser.add_argument("--ridge", type=float, default=FIT_RIDGE, help="with --fit: the fit's ridge")
    args = parser.parse_args()
    for directory in args.dirs:
        fit = None if args.fit is None else DecPlan.parse(args.fit).to_json()
        wanted = (args.residual_nsamples, fit, args.ridge if fit is not None else None)
        stored = (Path(directory) / RESIDUAL_FILE).exists()
        residual_meta = load_residuals(directory)[2] if stored else {}
        if tuple(residual_meta.get(key) for key in ("nsamples", "fit_k", "ridge")) != wanted:
            build_residuals(directory, nsamples=args.residual_nsamples, fit_k=fit, ridge=args.ridge)
        residuals, _, residual_meta = load_residuals(directory)
        loaded = load_model(directory)
        adapter = get_adapter(loaded.model)
        runs = (
            [(None, False)] * (not args.skip_base)
            + [(DecPlan.parse(k), False) for k in _ints(args.ks) + args.plans]
            + [(DecPlan.parse(k), True) for k in _ints(args.static_ks)]
        )
        for k, static in runs:
            result = evaluate_spec(
                loaded,
                args.dataset,
                max_windows=args.max_windows,
                dtype=args.dtype,
                device=args.device,
                dec=k,
                dec_static=static,
                dec_score=args.score,
                progress=False,
            )
            log_result(
                "dec_quality",
                {
                    "dir": Path(directory).name,
                    "method": loaded.quant_info["method"],
                    "bits_per_weight": loaded.quant_info["bits_per_weight"],
                    "residual_bits_per_weight": residual_meta["bits_per_weight"],
                    "k_chunk": None if k is None else k.to_json(),
                    "fetch_bytes_per_token": None if k is None else k.fetch_bytes(residuals, adapter),
                    "static": static,
                    "score": args.score if k is not None else None,
                    "residual_nsamples": residual_meta.get("nsamples"),
                    "fit_k": residual_meta.get("fit_k"),
                    "ridge": residual_meta.get("ridge"),
                    "device": args.device,
                    "dataset": args.dataset,
                    **result.to_dict(),
                },
            )


if __name__ == "__main__":
    main()
