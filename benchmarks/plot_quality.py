"""Perplexity against counted bits per weight for every recipe measured on the full WikiText-2 test.

Usage: python benchmarks/plot_quality.py [--out benchmarks/quality_vs_bits.png]
Reads results/recipes_gpu.jsonl, results/reference_figures.jsonl and results/recipes.jsonl (full
147-window runs only; the latest run of each configuration wins, a CPU run over a GPU one) and draws
one marker series per method, fp16 as a line (`anybit.report.plot_quality`, as `anybit plot` draws).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

from _common import RESULTS_DIR
from anybit.config import QuantConfig
from anybit.report import plot_quality

# GPU runs first: where a configuration was also run on the CPU, the CPU run (the tables' figure) wins
SOURCES = ("recipes_gpu.jsonl", "reference_figures.jsonl", "recipes.jsonl")
FULL_WINDOWS = 147
# settings a run leaves unset (null) but the recipe applies
DEFAULTS = {"anybit": {"weighting": "fisher"}, "skim": {"scope": "matrix", "scaling": True}}
# runs made before a recipe default changed: what they really used
RUN_BEFORE_DEFAULT_CHANGE = {"anybit:3.25": {"weighting": "activation"}}
# recipe options named in a label only when they differ from QuantConfig's default
OPTIONAL = {f.name: f.default for f in dataclasses.fields(QuantConfig) if f.name in ("search_split", "clip_min")}


def load_points() -> tuple[dict[str, list[tuple[float, float, str]]], float | None]:
    latest: dict[str, dict] = {}
    for source in SOURCES:
        path = RESULTS_DIR / source
        if not path.exists():
            continue
        for line in path.read_text().splitlines():
            record = json.loads(line)
            if record.get("windows") == FULL_WINDOWS:
                latest[record["config"]] = record
    fp16 = latest.pop("fp16", {}).get("ppl")
    series: dict[str, list[tuple[float, float, str]]] = {}
    for name, record in latest.items():
        settings = {**DEFAULTS.get(record["method"], {}), **{k: v for k, v in record.items() if v is not None}}
        settings.update(RUN_BEFORE_DEFAULT_CHANGE.get(name, {}))
        keys = ("weighting", "scope", "scaling", "outliers")
        options = [f"{key}={settings[key]}" for key in keys if settings.get(key) is not None]
        options += [
            f"{key}={settings[key]}" for key, default in OPTIONAL.items() if settings.get(key, default) != default
        ]
        label = record["method"] + (f" ({', '.join(options)})" if options else "")
        series.setdefault(label, []).append((record["bits_per_weight"], record["ppl"], name))
    return series, fp16


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "quality_vs_bits.png"))
    args = parser.parse_args()
    series, fp16 = load_points()
    points = {label: [(bits, ppl) for bits, ppl, _ in runs] for label, runs in series.items()}
    references = {} if fp16 is None else {"fp16": fp16}
    title = "SmolLM2-135M-Instruct: perplexity against counted bits"
    print(plot_quality(points, references, Path(args.out), title, "WikiText-2 test perplexity (147 × 2048 tokens)"))


if __name__ == "__main__":
    main()
