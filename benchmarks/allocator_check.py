"""The linear model behind anybit's model-wide allocation, checked against measured losses (issue 23, item 4).

The allocation spends one budget over every row of the model by a Fisher-scaled layer-wise error: row i of a
matrix at width b is predicted to raise the model's loss by c · impᵢ · eᵢ(b), with eᵢ(b) = δᵢᵀHδᵢ its
layer-wise error, impᵢ its Fisher importance (`row_importance`) and c one model-wide constant, and the
predictions of all rows are taken to add up. This script tests both claims on the dense reference model:

1. one matrix at a time: every row of a sampled matrix quantized at width b (its K-means codebooks of the
   error table, no error feedback), the rest of the model dense; the measured rise of the cross-entropy on
   held-out text against the prediction Σᵢ impᵢ eᵢ(b). If the model holds, measured / predicted is one
   constant for every matrix and width;
2. additivity: all sampled matrices quantized at once against the sum of their single rises;
3. the allocation itself: on every matrix's error table (the recipe's own `row_table`) at the budget, the
   greedy's objective against the lower bound of the convex relaxation. An exact integer solution lies
   between the two, so their gap bounds what an exact allocator could gain under this model.

Usage: python benchmarks/allocator_check.py [--layers 1,14,28] [--widths 2,3,4] [--eval-windows 5]
One JSON line per run goes to benchmarks/results/allocator_check.jsonl.
"""

from __future__ import annotations

import argparse
import math
import time

import torch
import torch.nn.functional as F

from _common import log_result
from anybit.alloc.skim import error_table, greedy_allocation, hull_segments
from anybit.config import QuantConfig
from anybit.data import eval_windows
from anybit.fisher import fisher_diagonal
from anybit.methods import LayerStats, get_method
from anybit.methods.base import row_importance
from anybit.methods.nonuniform import sensitivity_weights
from anybit.model.adapters import get_adapter, get_submodule
from anybit.model.loading import load_model
from anybit.pipeline import _calibration, corpus_ids
from anybit.quant.gptq import HessianAccumulator
from anybit.quant.kmeans import reconstruct


def collect_hessians(model, adapter, windows: torch.Tensor) -> dict[str, HessianAccumulator]:
    """XᵀX of every decoder linear's input on `windows` (the dense model's activations), keyed "LAYER.NAME"."""
    accs, handles = {}, []
    for index, layer in enumerate(adapter.layers(model)):
        for group in adapter.groups:
            first = get_submodule(layer, group[0])
            acc = HessianAccumulator(first.in_features)
            handles.append(first.register_forward_pre_hook(lambda _m, inputs, acc=acc: acc.add_batch(inputs[0])))
            for name in group:
                accs[f"{index}.{name}"] = acc
    with torch.inference_mode():
        for window in windows:
            model(window[None], use_cache=False)
    for handle in handles:
        handle.remove()
    return accs


@torch.inference_mode()
def cross_entropy(model, windows: torch.Tensor) -> float:
    """Mean next-token cross-entropy (nats) over the windows."""
    total, count = 0.0, 0
    for window in windows:
        logits = model(window[None], use_cache=False).logits[0, :-1].float()
        total += F.cross_entropy(logits, window[1:], reduction="sum").item()
        count += window.numel() - 1
    return total / count


def lp_lower_bound(errors: torch.Tensor, costs: torch.Tensor, budget: float) -> float:
    """The least total error of the convex relaxation (rows may take a fraction of a hull step) within `budget`."""
    errors, costs = errors.double(), costs.double().expand_as(errors)
    _, _, _, cost, gain = hull_segments(errors, costs)
    order = torch.argsort(gain / cost, descending=True)  # convex hulls: a row's steps come in its order
    left = budget - float(costs[:, 0].sum())
    paid = torch.cumsum(cost[order], 0)
    whole = int((paid <= left).sum())
    value = float(errors[:, 0].sum()) - float(gain[order[:whole]].sum())
    if whole < len(order):
        rest = left - (float(paid[whole - 1]) if whole else 0.0)
        value -= float(gain[order[whole]]) * rest / float(cost[order[whole]])
    return value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bits", type=float, default=3.25, help="budget of the allocation check (part 3)")
    parser.add_argument("--layers", default="1,14,28", help="decoder layers whose linears are sampled")
    parser.add_argument("--widths", default="2,3,4")
    parser.add_argument("--eval-windows", type=int, default=5, help="WikiText-2 test windows the losses use")
    parser.add_argument("--fisher-nsamples", type=int, default=8)
    args = parser.parse_args()
    start = time.perf_counter()

    loaded = load_model("smollm2-135m", dtype=torch.float32)
    model, adapter = loaded.model, get_adapter(loaded.model)
    config = QuantConfig(method="anybit", bits=args.bits, nsamples=args.fisher_nsamples, calib_dtype="float32")
    method = get_method("anybit")
    windows = _calibration(loaded.tokenizer, model, config)[: args.fisher_nsamples]
    fisher = fisher_diagonal(model, adapter, windows, "cpu", progress=True)
    hessians = collect_hessians(model, adapter, windows)
    held_out = eval_windows(corpus_ids(loaded, "wikitext2"), 2048, args.eval_windows)
    dense_loss = cross_entropy(model, held_out)

    # 3. the allocation over every matrix's table, as the recipe measures them
    tables = []
    for key, acc in hessians.items():
        index, name = key.split(".", 1)
        W = adapter.weight_of(get_submodule(adapter.layers(model)[int(index)], name))
        tables.append(method.row_table(W, LayerStats(hessian=acc, fisher=fisher[key]), config))
    errors = torch.cat([t.errors for t in tables])
    costs = torch.cat([t.costs.expand_as(t.errors) for t in tables])
    weights = sum(t.weights for t in tables)
    budget = args.bits * weights - sum(t.fixed_bits for t in tables)
    choice = greedy_allocation(errors, costs, budget)
    greedy_value = float(errors.double().gather(1, choice[:, None]).sum())
    bound = lp_lower_bound(errors, costs, budget)
    spent = float(costs.double().gather(1, choice[:, None]).sum())
    allocation = {
        "budget_bits": budget,
        "greedy_bits": spent,
        "greedy_objective": greedy_value,
        "lp_lower_bound": bound,
        "relative_gap": (greedy_value - bound) / bound,
    }
    print(allocation, flush=True)
    del tables, errors, costs

    # 1. one matrix at a time
    widths = [int(w) for w in args.widths.split(",")]
    sampled, points = [], []
    for index in (int(i) for i in args.layers.split(",")):
        for name in adapter.linear_names:
            key = f"{index}.{name}"
            linear = get_submodule(adapter.layers(model)[index], name)
            W = adapter.weight_of(linear)
            stats = LayerStats(hessian=hessians[key], fisher=fisher[key])
            H = stats.hessian.hessian()
            importance = row_importance(stats, H, W.shape[0])
            table = error_table(W, H, sensitivity_weights(W, stats, "fisher"), widths)
            original = linear.weight.data.clone()
            for i, b in enumerate(widths):
                predicted = float((table.errors[:, i].double() * importance).sum())
                W_hat = reconstruct(table.centroids[i], table.codes[i].long())
                linear.weight.data.copy_(W_hat)
                measured = cross_entropy(model, held_out) - dense_loss
                points.append({"matrix": key, "width": b, "predicted": predicted, "measured": measured})
                print(points[-1], flush=True)
                if b == widths[len(widths) // 2]:
                    sampled.append((linear, W_hat, measured, predicted))
            linear.weight.data.copy_(original)
    logs = [(math.log(p["measured"]), math.log(p["predicted"])) for p in points if p["measured"] > 0]
    log_c = sum(m - p for m, p in logs) / len(logs)
    spread = [m - p - log_c for m, p in logs]
    ranks = _spearman([p["measured"] for p in points], [p["predicted"] for p in points])

    # 2. additivity: every sampled matrix at the middle width at once
    for linear, W_hat, _, _ in sampled:
        linear.weight.data.copy_(W_hat)
    joint = cross_entropy(model, held_out) - dense_loss
    log_result(
        "allocator_check",
        {
            "bits": args.bits,
            "fisher_nsamples": args.fisher_nsamples,
            "eval_windows": args.eval_windows,
            "dense_loss": dense_loss,
            "allocation": allocation,
            "points": points,
            "constant": math.exp(log_c),
            "ratio_spread_log_sd": (sum(s * s for s in spread) / len(spread)) ** 0.5,
            "ratio_min_max": [math.exp(min(spread)), math.exp(max(spread))],
            "spearman": ranks,
            "nonpositive_measured": len(points) - len(logs),
            "additivity": {
                "width": widths[len(widths) // 2],
                "matrices": len(sampled),
                "joint_measured": joint,
                "sum_of_single_measured": sum(s[2] for s in sampled),
                "sum_of_predicted_times_constant": math.exp(log_c) * sum(s[3] for s in sampled),
            },
            "seconds": time.perf_counter() - start,
        },
    )


def _spearman(a: list[float], b: list[float]) -> float:
    def ranks(x: list[float]) -> torch.Tensor:
        return torch.argsort(torch.argsort(torch.tensor(x))).double()

    ra, rb = ranks(a), ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()))


if __name__ == "__main__":
    main()
