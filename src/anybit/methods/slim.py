"""SliM-LLM: salience-determined group bit allocation and salience-weighted calibration inside GPTQ."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from anybit.alloc.slim import salience_allocation
from anybit.format.qtensor import QuantizedTensor
from anybit.methods.base import DAMP, GROUP, LayerStats, Method
from anybit.options import Option
from anybit.quant.gptq import gptq_quantize, prepare_hessian
from anybit.quant.uniform import ClippedColumnQuantizer

if TYPE_CHECKING:
    from anybit.config import QuantConfig

CLIP_MAX, CLIP_STEP = 1.1, 0.002  # the paper's grid: 0.9 to 1.1 in 100 steps (1.0 included)
CLIP_MIN = Option(
    "clip_min",
    float,
    0.9,
    "Lowest clipping factor searched (grid to 1.1 in steps of 0.002; the paper's 0.9).",
    low=0,
    high=1,
    low_open=True,
)
SALIENT_Z = 2.0  # a weight is salient when its salience is this many std above its group's mean


class SliM(Method):
    """SliM-LLM (Huang et al., 2024): per-group widths N−1/N/N+1 averaging N (fractional N: see
    `anybit.alloc.slim`), chosen by output KL, and a per-row clipping search on each group minimising
    the OBS-weighted squared error, where salient weights (salience z-score > 2 within the group)
    count double. GPTQ without act-order, as in the
    paper. The per-group widths are stored once per group (3 bits each) and counted. `--clip-min`
    lowers the start of the clipping grid (same step); the paper's 0.9 is the default.
    """

    name = "slim"
    options = (GROUP, DAMP, CLIP_MIN)
    bit_range = (2, 7)  # widths from N - 1 >= 1 to N + 1 (fractional N: ⌊N⌋ + 2) <= 8
    integer_bits = False
    input_sample_stride = 64  # 32 tokens per 2048-token window for the KL search

    def quantize(self, W: torch.Tensor, stats: LayerStats | None, config: QuantConfig) -> QuantizedTensor:
        gs = self.group_size_for(W, config)
        rows, columns = W.shape
        H = stats.hessian.hessian()
        W_fixed, Hinv, _ = prepare_hessian(W, H, config.damp, act_order=False)
        widths, _ = salience_allocation(W_fixed, Hinv, stats.hessian.input_sample(), config.bits, gs)
        cost = torch.diagonal(Hinv).square().reciprocal()  # OBS cost of a unit error in column j

        def importance(W_group: torch.Tensor, group: int) -> torch.Tensor:
            column_cost = cost[group * gs : (group + 1) * gs][None, :]
            salience = W_group.square() * column_cost
            z = (salience - salience.mean()) / salience.std().clamp(min=1e-30)
            return (1.0 + (z.abs() > SALIENT_Z).float()) * column_cost

        bitmap = widths[None, :].expand(rows, columns // gs).contiguous()
        quantizer = ClippedColumnQuantizer(rows, columns, gs, bitmap, clip_factors(config.clip_min), importance)
        gptq_quantize(W, H, quantizer, damp=config.damp, act_order=False)
        return quantizer.to_qtensor((rows, columns))


def clip_factors(low: float) -> torch.Tensor:
    """The clipping factors searched: `low` to 1.1 in steps of 0.002."""
    return torch.linspace(low, CLIP_MAX, round((CLIP_MAX - low) / CLIP_STEP) + 1)
