"""Uniform-grid baselines: round-to-nearest and GPTQ (with an optional model-wide width per linear)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from anybit.alloc.skim import RowTable
from anybit.format.qtensor import QuantizedTensor
from anybit.methods.base import ACT_ORDER, DAMP, GROUP, ROTATE, SCOPE, SYM, LayerStats, Method, row_importance
from anybit.quant.gptq import gptq_quantize
from anybit.quant.uniform import UniformColumnQuantizer, rtn_quantize

if TYPE_CHECKING:
    from anybit.config import QuantConfig


def _uniform_bitmap(W: torch.Tensor, group_size: int, bits: float) -> torch.Tensor:
    return torch.full((W.shape[0], W.shape[1] // group_size), int(bits), dtype=torch.uint8, device=W.device)


class RTN(Method):
    """Asymmetric min-max round-to-nearest per output channel or per group; needs no calibration."""

    name = "rtn"
    options = (GROUP, SYM)
    needs_stats = False

    def quantize(self, W: torch.Tensor, stats: LayerStats | None, config: QuantConfig) -> QuantizedTensor:
        gs = self.group_size_for(W, config)
        return rtn_quantize(W, gs, _uniform_bitmap(W, gs, config.bits), symmetric=config.sym)


class GPTQ(Method):
    """GPTQ with a min-max grid per group (Frantar et al., 2023).

    `--scope model` gives each linear one of `MODEL_WIDTHS` bits so that the whole model averages the counted
    budget (`--bits 3.5`): every linear is quantized at every width on the unquantized model, its error
    δᵀHδ weighted per row by the Fisher-estimated importance anybit's recipe uses, and the greedy allocation
    spends the budget where the estimated loss falls most per counted bit. One width per linear is what the
    GPTQ checkpoint format (with per-module overrides) can hold.
    """

    name = "gptq"
    options = (GROUP, SYM, DAMP, ACT_ORDER, SCOPE, ROTATE)
    MODEL_WIDTHS = (2, 3, 4, 8)

    def needs_fisher(self, config: QuantConfig) -> bool:
        return self.scope(config) == "model"

    def quantize(self, W: torch.Tensor, stats: LayerStats | None, config: QuantConfig) -> QuantizedTensor:
        bits = int(config.bits) if stats.plan is None else int(stats.plan.widths[0])
        return self._gptq(W, stats.hessian.hessian(), config, bits)

    def _gptq(self, W: torch.Tensor, H: torch.Tensor, config: QuantConfig, bits: int) -> QuantizedTensor:
        gs = self.group_size_for(W, config)
        quantizer = UniformColumnQuantizer(W.shape[0], W.shape[1], gs, _uniform_bitmap(W, gs, bits), config.sym)
        result = gptq_quantize(W, H, quantizer, damp=config.damp, act_order=config.act_order)
        return quantizer.to_qtensor(tuple(W.shape), perm=result.perm)

    def cheapest_bits(self, shape: tuple[int, int], config: QuantConfig) -> float:
        """Counted bits of a linear of `shape` at the narrowest model-wide width (codes, fp16 scales and zero
        points per group; the packing's few padding bytes left out)."""
        rows, cols = shape
        bits = min(self.MODEL_WIDTHS)
        groups = cols // self.group_size_of(cols, config)
        return rows * cols * bits + rows * groups * (16 + bits)

    def row_table(self, W: torch.Tensor, stats: LayerStats | None, config: QuantConfig) -> RowTable:
        """The whole linear as one unit: its Fisher-weighted layer-wise error and counted bits at each width."""
        H = stats.hessian.hessian()
        importance = row_importance(stats, H, W.shape[0])
        errors, costs = [], []
        for bits in self.MODEL_WIDTHS:
            qt = self._gptq(W, H, config, bits)
            delta = W - qt.dequantize()
            errors.append(float((((delta @ H) * delta).sum(dim=1).double().cpu() * importance).sum()))
            costs.append(float(qt.storage_bits()))
        table = torch.tensor([errors], dtype=torch.float64), torch.tensor([costs], dtype=torch.float64)
        return RowTable(*table, widths=list(self.MODEL_WIDTHS), fixed_bits=0, weights=W.numel())
