"""Incoherence processing before quantizing (issue 23, item 3), simulated end to end.

Each chosen linear's input dimension is rotated by a random orthogonal transform R (`format.rotation`; the
records of commit 13c5b6b drew R with this script's own copy of the construction, in another order): the
weight becomes W Rᵀ and the layer's input x becomes R x, so the model computes the same function. Linears that share an input share
one R. The recipe then quantizes W Rᵀ on the rotated inputs as it would any weight (its XᵀX, Fisher
diagonal and error tables are those of the rotated layer, by the same code).

This is a simulation: the rotation is a forward pre-hook on each linear (moved onto its quantized
replacement), not part of anybit's stored format or kernels, and the model is evaluated in this process.
A stored R costs nothing that the counted bits would show (a seed, or one sign bit per column and a few
fp16 entries per matrix); the figures below count the quantized linears only. Its run-time cost is one
small transform per layer input, not measured here.

Usage: python benchmarks/incoherence.py --bits 3.25 --rotate none|all|o_proj,down_proj [--max-windows 40]
One JSON line per corpus goes to benchmarks/results/incoherence.jsonl.
"""

from __future__ import annotations

import argparse
import time

import torch

import anybit.calibrate as calibrate
from _common import evaluate_corpora, log_result
from anybit.config import QuantConfig
from anybit.format.rotation import InputRotation
from anybit.model.adapters import get_adapter, get_submodule
from anybit.model.loading import load_model
from anybit.pipeline import _calibration
from anybit.runtime.qlinear import QuantLinear, set_kernel


def _rotate_input(rotation: InputRotation):
    def hook(_module, inputs: tuple) -> tuple:
        return (rotation.apply(inputs[0]), *inputs[1:])

    return hook


def rotate_model(model: torch.nn.Module, names: set[str], seed: int) -> int:
    """Rotate the inputs of the named linears of every decoder layer (a group of linears sharing an input is
    rotated as a whole when any of it is named); returns how many linears were rotated."""
    adapter = get_adapter(model)
    generator = torch.Generator().manual_seed(seed)
    count = 0
    for layer in adapter.layers(model):
        for group in adapter.groups:
            if not names & set(group) and "all" not in names:
                continue
            rotation = InputRotation.random(get_submodule(layer, group[0]).in_features, generator)
            for name in group:
                linear = get_submodule(layer, name)
                with torch.no_grad():
                    linear.weight.copy_(rotation.apply(linear.weight.float()))
                linear._incoherence = rotation
                linear.register_forward_pre_hook(_rotate_input(rotation))
                count += 1
    return count


def _keep_rotation(set_submodule):
    """The driver's `set_submodule`, moving a rotated linear's input rotation onto its replacement."""

    def replace(layer, name, module):
        old = get_submodule(layer, name)
        rotation = getattr(old, "_incoherence", None)
        if rotation is not None:
            module._incoherence = rotation
            module.register_forward_pre_hook(_rotate_input(rotation))
        set_submodule(layer, name, module)

    return replace


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bits", type=float, default=3.25)
    parser.add_argument("--method", default="anybit")
    parser.add_argument("--group-size", type=int, default=None)
    parser.add_argument("--rotate", default="none", help="none, all, or linear names (o_proj,down_proj)")
    parser.add_argument("--nsamples", type=int, default=32)
    parser.add_argument("--fisher-nsamples", type=int, default=8)
    parser.add_argument("--max-windows", type=int, default=40)
    parser.add_argument("--datasets", default="wikitext2")
    parser.add_argument("--kl", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    loaded = load_model("smollm2-135m", dtype=torch.float32)
    fields = dict(method=args.method, bits=args.bits, nsamples=args.nsamples, calib_dtype="float32")
    if args.method == "anybit":
        fields["fisher_nsamples"] = args.fisher_nsamples
    if args.group_size is not None:
        fields["group_size"] = args.group_size
    config = QuantConfig(**fields)
    windows = _calibration(loaded.tokenizer, loaded.model, config)
    names = set() if args.rotate == "none" else set(args.rotate.split(","))
    adapter = get_adapter(loaded.model)
    suffixes = {name.split(".")[-1]: name for name in adapter.linear_names}
    names = {suffixes.get(n, n) for n in names}
    rotated = rotate_model(loaded.model, names, args.seed) if names else 0

    calibrate.set_submodule = _keep_rotation(calibrate.set_submodule)
    start = time.perf_counter()
    calibrate.quantize_model(loaded.model, config, windows)
    quantize_seconds = time.perf_counter() - start
    linears = [m for m in loaded.model.modules() if isinstance(m, QuantLinear)]
    bits = sum(m.qtensor.storage_bits() for m in linears) / sum(m.in_features * m.out_features for m in linears)
    set_kernel(loaded.model, "exact")
    for evaluated in evaluate_corpora(loaded, "smollm2-135m", args.datasets, args.max_windows, args.kl):
        log_result(
            "incoherence",
            {
                "method": args.method,
                "bits": args.bits,
                "group_size": args.group_size,
                "rotate": args.rotate,
                "rotated_linears": rotated,
                "seed": args.seed,
                "nsamples": args.nsamples,
                "fisher_nsamples": args.fisher_nsamples if args.method == "anybit" else None,
                "bits_per_weight": bits,
                "quantize_seconds": quantize_seconds,
                **evaluated,
            },
        )


if __name__ == "__main__":
    main()
