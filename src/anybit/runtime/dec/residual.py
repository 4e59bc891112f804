"""The stored residual: R = W − Q(W) of one linear in 4 bits, a row per input channel (format in the
package doc)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from anybit.runtime.dec.select import chunk_budgets

RESIDUAL_BITS = 4
LEVELS = 7  # codes -7..7 around 0
SCALE_CANDIDATES = 32  # scale grid: max|r|/7 · t/32 for t = 1..32, the lowest squared error wins


@dataclass
class Residual:
    """A 4-bit residual matrix stored row-per-input-channel (format in the module doc)."""

    codes: torch.Tensor  # uint8 (in, ceil(out / 2))
    scales: torch.Tensor  # fp16 (out,)

    def __post_init__(self) -> None:
        if self.scales.dim() != 1:
            raise ValueError(f"residual scales must be one per output channel, got shape {tuple(self.scales.shape)}")
        if self.scales.dtype != torch.float16 or not bool(torch.isfinite(self.scales).all()):
            raise ValueError(f"residual scales must be finite float16, got {self.scales.dtype}")
        out = self.scales.numel()
        if self.codes.dtype != torch.uint8 or self.codes.dim() != 2 or self.codes.shape[1] != (out + 1) // 2:
            raise ValueError(f"residual codes {tuple(self.codes.shape)} do not fit {out} output channels")

    @property
    def in_features(self) -> int:
        return self.codes.shape[0]

    @property
    def out_features(self) -> int:
        return self.scales.numel()

    def storage_bits(self) -> int:
        return (self.codes.numel() * self.codes.element_size() + self.scales.numel() * 2) * 8

    def fetch_bytes(self, k_chunk: int) -> int:
        """Bytes of residual codes one token's compensation reads at this k_chunk (the PCIe traffic)."""
        kept = sum(k for _, _, k in chunk_budgets(self.in_features, k_chunk))
        return kept * self.codes.shape[1] * self.codes.element_size()

    def rows(self, channels: torch.Tensor) -> torch.Tensor:
        """Dequantized residual rows (len(channels), out) of the given input channels, float32."""
        packed = self.codes.index_select(0, channels.to(self.codes.device)).to(torch.int16)
        nibbles = torch.stack([packed & 0xF, packed >> 4], dim=-1).flatten(-2)[:, : self.out_features]
        return (nibbles - 8).float() * self.scales.float()

    def dense(self) -> torch.Tensor:
        """The whole dequantized residual as (out, in) float32, the layout of W."""
        return self.rows(torch.arange(self.in_features)).t()

    def row_norms(self) -> torch.Tensor:
        """‖R̂[:, j]‖ of every input channel j, float32 (in,)."""
        return torch.linalg.vector_norm(self.dense(), dim=0)


def quantize_residual(R: torch.Tensor) -> Residual:
    """4-bit residual of an (out, in) matrix; each output channel's scale minimises its squared error."""
    R = R.float()
    peak = R.abs().amax(dim=1).clamp(min=1e-12) / LEVELS
    best_err = torch.full_like(peak, float("inf"))
    best_scale = peak.clone()
    for t in range(1, SCALE_CANDIDATES + 1):
        scale = (peak * (t / SCALE_CANDIDATES)).half().float()
        q = torch.clamp(torch.round(R / scale[:, None]), -LEVELS, LEVELS)
        err = (R - q * scale[:, None]).square().sum(dim=1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_scale = torch.where(better, scale, best_scale)
    codes = (torch.clamp(torch.round(R / best_scale[:, None]), -LEVELS, LEVELS) + 8).to(torch.uint8).t()
    if codes.shape[1] % 2:
        codes = torch.cat([codes, torch.full_like(codes[:, :1], 8)], dim=1)
    packed = codes[:, 0::2] | (codes[:, 1::2] << 4)
    return Residual(packed.contiguous(), best_scale.half())
