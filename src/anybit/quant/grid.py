"""Uniform asymmetric grids: parameters from min-max, and the one place where values are rounded.

Convention (as in the GPTQ reference quantizer): the range of a segment is extended to contain
zero, scale = (max - min) / (2**b - 1), zero = round(-min / scale) is an integer in [0, 2**b - 1],
and w ~ (q - zero) * scale with q = clamp(round(w / scale) + zero, 0, 2**b - 1). Scales are
rounded to fp16 here, because fp16 is what is stored: what is used while quantizing is exactly what
the packed tensor later decodes to.
"""

from __future__ import annotations

import torch


def minmax_params(
    x: torch.Tensor, bits: torch.Tensor | int, symmetric: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and integer zero per row of x (..., n) for widths `bits` (broadcastable to x[..., 0]).

    Symmetric grids (GPTQ's `sym`) span [-max|x|, max|x|] with the zero point fixed at (2**b)/2.
    """
    maxq = (2 ** torch.as_tensor(bits, device=x.device) - 1).to(x.dtype)
    xmin = x.amin(dim=-1).clamp(max=0)
    xmax = x.amax(dim=-1).clamp(min=0)
    if symmetric:
        xmax = torch.maximum(-xmin, xmax)
        xmin = -xmax
    scale = (xmax - xmin) / maxq
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    scale = scale.to(torch.float16).to(x.dtype)
    scale = torch.where(scale > 0, scale, torch.full_like(scale, 2.0**-24))  # fp16 underflow guard
    if symmetric:
        return scale, ((maxq + 1) / 2).expand_as(scale).clone()
    zero = torch.clamp(torch.round(-xmin / scale), torch.zeros_like(maxq), maxq)
    return scale, zero


def quantize_to_grid(
    x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: torch.Tensor | int
) -> torch.Tensor:
    """Integer codes of x on the grid (scale, zero); scale/zero broadcast against x."""
    maxq = (2 ** torch.as_tensor(bits, device=x.device) - 1).to(x.dtype)
    return torch.clamp(torch.round(x / scale) + zero, torch.zeros_like(maxq), maxq)


def dequantize_from_grid(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """Values of integer codes q on the grid (scale, zero)."""
    return (q - zero) * scale
