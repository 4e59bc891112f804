"""Layer by layer: how much of each linear's output error DEC removes, and why a partial correction
can make it larger.

Usage: python benchmarks/dec_layer_error.py DIR [DIR ...] [--k 8] [--score activation|contribution]
For the first WikiText-2 test window, with the quantized model's own activations x at every linear:
e = (W − Ŵ) x is the output error without compensation; with the channels S chosen per token
(dynamic) or fixed from calibration (static), the error left is e − R̂[:, S] x[S]. Printed and logged
per layer type, summed over layers and tokens, as shares of ‖e‖²: what is left after compensation,
and the cross term 2⟨R_S x_S, R_rest x_rest⟩ with the exact residual R = W − Ŵ. A negative cross term
means the other channels' errors cancel part of the selected channels' errors (error feedback builds
such cancellations), so removing only the selected part can leave a larger error than removing none.
One JSON line per (DIR, selection, layer type) to benchmarks/results/dec_layer_error.jsonl.
"""

from __future__ import annotations

import argparse
from collections import defaultdict
from pathlib import Path

import torch

from _common import log_result
from anybit.data import eval_windows, load_corpus, tokenize_corpus
from anybit.model.adapters import get_adapter
from anybit.model.checkpoint import load_residuals
from anybit.model.loading import load_model
from anybit.runtime.dec import select_channels, static_channels
from anybit.runtime.qlinear import dense_weights, quant_linears


def capture_inputs(loaded, window: torch.Tensor) -> dict[str, torch.Tensor]:
    """The input of every quantized linear for one window, float32 (tokens, in)."""
    inputs, handles = {}, []
    for name, module in quant_linears(loaded.model):

        def hook(_m, args, name=name):
            inputs[name] = args[0].detach().reshape(-1, args[0].shape[-1]).float()

        handles.append(module.register_forward_pre_hook(hook))
    try:
        with torch.inference_mode(), dense_weights(loaded.model):
            loaded.model(window[None], use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return inputs


def error_terms(x: torch.Tensor, R: torch.Tensor, R_hat: torch.Tensor, idx: torch.Tensor) -> dict[str, float]:
    """‖e‖², ‖e − R̂_S x_S‖² and the cross term 2⟨R_S x_S, R_rest x_rest⟩ for selections idx (tokens, k)."""
    mask = torch.zeros_like(x).scatter_(1, idx, 1.0)
    error = x @ R.t()
    selected = (x * mask) @ R.t()
    left = error - (x * mask) @ R_hat.t()
    return {
        "error": float(error.square().sum()),
        "left": float(left.square().sum()),
        "cross": float(2 * (selected * (error - selected)).sum()),
    }


def layer_type(name: str) -> str:
    return name.rsplit(".", 1)[-1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dirs", nargs="+")
    parser.add_argument("--k", type=int, default=8, help="k_chunk")
    parser.add_argument("--score", default="activation", help="channel ranking: activation or contribution")
    args = parser.parse_args()
    for directory in args.dirs:
        loaded = load_model(directory)
        original = load_model(loaded.quant_info["source"])
        adapter = get_adapter(original.model.config.model_type)
        residuals, means, _ = load_residuals(directory)
        window = eval_windows(tokenize_corpus(loaded.tokenizer, load_corpus("wikitext2")), 2048, 1)[0]
        inputs = capture_inputs(loaded, window)
        totals: dict[tuple[str, str], dict[str, float]] = defaultdict(lambda: defaultdict(float))
        for name, layer in quant_linears(loaded.model):
            x = inputs[name]
            R = adapter.weight_of(original.model.get_submodule(name)).float() - layer.dequantize().float()
            R_hat = residuals[name].dense()
            weight = residuals[name].row_norms() if args.score == "contribution" else None
            static = static_channels(means[name], args.k, weight).expand(x.shape[0], -1)
            for selection, idx in (("dynamic", select_channels(x, args.k, weight)), ("static", static)):
                for key, value in error_terms(x, R, R_hat, idx).items():
                    totals[selection, layer_type(name)][key] += value
                    totals[selection, "all"][key] += value
        print(f"{Path(directory).name}: k_chunk {args.k}, ranked by {args.score}")
        print(f"{'selection':<9} {'layer':<10} {'left/error':>10} {'cross/error':>12}")
        for (selection, kind), t in sorted(totals.items()):
            left, cross = t["left"] / t["error"], t["cross"] / t["error"]
            print(f"{selection:<9} {kind:<10} {left:>10.3f} {cross:>12.3f}")
            log_result(
                "dec_layer_error",
                {
                    "dir": Path(directory).name,
                    "k_chunk": args.k,
                    "score": args.score,
                    "selection": selection,
                    "layer_type": kind,
                    "left_share": left,
                    "cross_share": cross,
                },
            )


if __name__ == "__main__":
    main()
