"""What an input rotation does to one matrix's layer-wise error (issue 23, item 3): a quick proxy.

Each sampled linear of SmolLM2 is quantized alone on its own XᵀX (dense model's inputs, 4 calibration
windows), plainly and with a random rotation R (`format.rotation`: W Rᵀ on the statistics of R x), and its
layer-wise error tr(ΔW H ΔWᵀ) (the same in both coordinates, R being orthogonal) is compared, relative to
tr(W H Wᵀ). anybit's per-row codebooks at 2.5 and 3.25 bits (scope matrix, activation weights: no Fisher or
model-wide allocation here) and GPTQ's group-64 grids at 3 and 4 bits.

Usage: python benchmarks/incoherence_proxy.py [--layers 2,15,27]
One JSON line per recipe and width goes to benchmarks/results/incoherence_proxy.jsonl.
"""

from __future__ import annotations

import argparse

import torch

from _common import log_result
from anybit.config import QuantConfig
from anybit.format.rotation import InputRotation
from anybit.methods import LayerStats, get_method
from anybit.model.loading import load_model
from anybit.pipeline import _calibration
from anybit.quant.gptq import HessianAccumulator
from anybit.quant.scaling import layer_loss

NAMES = ("self_attn.q_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.down_proj")
RECIPES = {
    "anybit": [dict(method="anybit", bits=b, scope="matrix", weighting="activation") for b in (2.5, 3.25)],
    "gptq": [dict(method="gptq", bits=b, group_size=64) for b in (3, 4)],
}


def stats_of(H: torch.Tensor) -> LayerStats:
    """Statistics holding H (full) as their XᵀX."""
    acc = HessianAccumulator(H.shape[0])
    acc.XtX.copy_(H)
    acc.tokens = 2  # hessian() is then 2 XᵀX / 2 = H
    return LayerStats(hessian=acc)


def relative_error(method, W: torch.Tensor, H: torch.Tensor, config: QuantConfig) -> float:
    W_hat = method.quantize(W, stats_of(H), config).dequantize(torch.float32)
    return float(layer_loss(W, W_hat, H) / layer_loss(W, torch.zeros_like(W), H))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", default="2,15,27")
    parser.add_argument("--nsamples", type=int, default=4)
    args = parser.parse_args()
    loaded = load_model("smollm2-135m", dtype=torch.float32)
    model = loaded.model
    windows = _calibration(loaded.tokenizer, model, QuantConfig(method="gptq", nsamples=args.nsamples))
    layers = [int(i) for i in args.layers.split(",")]
    accs, handles = {}, []
    for index in layers:
        for name in NAMES:
            module = model.model.layers[index].get_submodule(name)
            acc = accs[(index, name)] = HessianAccumulator(module.in_features)
            handles.append(module.register_forward_pre_hook(lambda _m, x, acc=acc: acc.add_batch(x[0])))
    with torch.inference_mode():
        for window in windows:
            model(window[None], use_cache=False)
    for handle in handles:
        handle.remove()
    generator = torch.Generator().manual_seed(0)
    matrices = []
    for (index, name), acc in accs.items():
        W = model.model.layers[index].get_submodule(name).weight.detach().float()
        H = acc.hessian().clone()
        rotation = InputRotation.random(W.shape[1], generator)
        rotated_H = rotation.apply(rotation.apply(H).t())  # R H Rᵀ
        matrices.append((f"{index}.{name}", W, H, rotation.apply(W), rotated_H))
    for recipe, configs in RECIPES.items():
        method = get_method(recipe)
        for fields in configs:
            config = QuantConfig(**fields)
            rows = []
            for key, W, H, W_rot, H_rot in matrices:
                plain, rotated = relative_error(method, W, H, config), relative_error(method, W_rot, H_rot, config)
                rows.append({"matrix": key, "plain": plain, "rotated": rotated, "ratio": rotated / plain})
                print(recipe, fields["bits"], rows[-1], flush=True)
            ratios = [r["ratio"] for r in rows]
            log_result(
                "incoherence_proxy",
                {"recipe": recipe, **fields, "nsamples": args.nsamples, "layers": layers, "matrices": rows,
                 "ratio_min": min(ratios), "ratio_max": max(ratios)},
            )  # fmt: skip


if __name__ == "__main__":
    main()
