"""Uniform-grid baselines: round-to-nearest and GPTQ."""

from __future__ import annotations

import torch

from anybit.config import QuantConfig
from anybit.format.qtensor import QuantizedTensor
from anybit.methods.base import LayerStats, Method
from anybit.quant.gptq import gptq_quantize
from anybit.quant.uniform import UniformColumnQuantizer, rtn_quantize


def _uniform_bitmap(W: torch.Tensor, group_size: int, bits: float) -> torch.Tensor:
    return torch.full((W.shape[0], W.shape[1] // group_size), int(bits), dtype=torch.uint8, device=W.device)


class RTN(Method):
    """Asymmetric min-max round-to-nearest per output channel or per group; needs no calibration."""

    name = "rtn"
    uses_groups = True
    needs_stats = False

    def quantize(self, W: torch.Tensor, stats: LayerStats | None, config: QuantConfig) -> QuantizedTensor:
        gs = self.group_size_for(W, config)
        return rtn_quantize(W, gs, _uniform_bitmap(W, gs, config.bits), symmetric=config.sym)


class GPTQ(Method):
    """GPTQ with a min-max grid per group (Frantar et al., 2023)."""

    name = "gptq"
    uses_groups = True

    def quantize(self, W: torch.Tensor, stats: LayerStats | None, config: QuantConfig) -> QuantizedTensor:
        gs = self.group_size_for(W, config)
        bitmap = _uniform_bitmap(W, gs, config.bits)
        quantizer = UniformColumnQuantizer(W.shape[0], W.shape[1], gs, bitmap, symmetric=config.sym)
        result = gptq_quantize(W, stats.hessian.hessian(), quantizer, damp=config.damp, act_order=config.act_order)
        return quantizer.to_qtensor(tuple(W.shape), perm=result.perm)
