"""Fisher sensitivity: the mean squared gradient of the language-model loss for each linear weight.

SqueezeLLM weights its K-means objective by this diagonal Fisher approximation. Gradients are taken
one calibration window at a time; after each backward pass the squared gradients are added to
float32 accumulators and the gradients are dropped, so at most one copy of the gradients exists.
Only decoder-layer linear weights require gradients (embeddings and head are not differentiated).
"""

from __future__ import annotations

import torch
from torch import nn
from tqdm.auto import tqdm

from anybit.model.adapters import Adapter, get_submodule


@torch.inference_mode(False)
@torch.enable_grad()
def fisher_diagonal(
    model: nn.Module, adapter: Adapter, windows: torch.Tensor, device: str = "cpu", progress: bool = True
) -> dict[str, torch.Tensor]:
    """Mean of grad² over windows for every decoder linear, keyed "LAYER.NAME", as (out, in) float32 on CPU."""
    params: dict[str, nn.Parameter] = {}
    for i, layer in enumerate(adapter.layers(model)):
        for name in adapter.linear_names:
            params[f"{i}.{name}"] = get_submodule(layer, name).weight
    fisher = {key: torch.zeros(p.shape, dtype=torch.float32, device=device) for key, p in params.items()}
    model.to(device)
    model.requires_grad_(False)
    for p in params.values():
        p.requires_grad_(True)
    was_training = model.training
    model.eval()
    try:
        for window in tqdm(windows, desc="fisher", unit="window", disable=not progress):
            ids = window.unsqueeze(0).to(device)
            loss = model(ids, labels=ids, use_cache=False).loss
            loss.backward()
            for key, p in params.items():
                fisher[key].add_(p.grad.float().square())
                p.grad = None
    finally:
        model.requires_grad_(False)
        model.train(was_training)
        model.to("cpu")
    n = len(windows)
    return {k: (f.t() if adapter.transposed_weights else f).div_(n).cpu().contiguous() for k, f in fisher.items()}
