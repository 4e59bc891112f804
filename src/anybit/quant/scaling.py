"""SKIM's trainable scaling vector: one factor per input column, learned around fixed K-means labels.

With labels fixed, each centroid of the scaled row w·α has a closed form (the importance-weighted
mean of its members, importance divided by α² so the objective stays the original one), so the
reconstruction Ŵ = C[labels] / α is differentiable in α and the layer-wise loss tr(ΔHΔᵀ) can be
minimised by gradient descent. α = exp(θ) keeps it positive.
"""

from __future__ import annotations

import torch


def closed_form_centroids(scaled: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor, k: int) -> torch.Tensor:
    """Weighted mean of each cluster's members, per row: (rows, k); empty clusters are 0."""
    rows = scaled.shape[0]
    zeros = torch.zeros(rows, k, dtype=scaled.dtype, device=scaled.device)
    sums = zeros.scatter_add(1, labels, weights * scaled)
    mass = zeros.scatter_add(1, labels, weights)
    return torch.where(mass > 0, sums / mass.clamp(min=1e-30), zeros)


def layer_loss(W: torch.Tensor, W_hat: torch.Tensor, H: torch.Tensor) -> torch.Tensor:
    """tr((W − Ŵ) H (W − Ŵ)ᵀ): the layer-wise output error."""
    delta = W - W_hat
    return ((delta @ H) * delta).sum()


def train_scaling(
    W: torch.Tensor, H: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor, k: int,
    steps: int = 50, lr: float = 0.01,
) -> torch.Tensor:  # fmt: skip
    """The per-column scale α minimising the layer-wise loss with the K-means labels held fixed."""
    with torch.inference_mode(False), torch.enable_grad():
        # the driver runs under inference mode; autograd needs ordinary tensors
        return _train_scaling(W.clone(), H.clone(), labels.clone(), weights.clone(), k, steps, lr)


def _train_scaling(
    W: torch.Tensor, H: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor, k: int, steps: int, lr: float
) -> torch.Tensor:
    theta = torch.zeros(W.shape[1], dtype=torch.float32, device=W.device, requires_grad=True)
    optimizer = torch.optim.Adam([theta], lr=lr)
    scale = H.diagonal().mean().clamp(min=1e-30)  # keeps the loss O(1) for any layer
    for _ in range(steps):
        alpha = theta.exp()
        C = closed_form_centroids(W * alpha, labels, weights / alpha.square(), k)
        W_hat = torch.gather(C, 1, labels) / alpha
        loss = layer_loss(W, W_hat, H) / scale
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return theta.detach().exp()
