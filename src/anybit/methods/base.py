"""The `Method` protocol every recipe implements, and what the driver hands it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch

from anybit.config import default_group_size
from anybit.errors import AnybitError
from anybit.format.qtensor import QuantizedTensor

if TYPE_CHECKING:
    from anybit.alloc.skim import RowPlan, RowTable
    from anybit.config import QuantConfig
    from anybit.quant.gptq import HessianAccumulator


@dataclass
class LayerStats:
    """Calibration statistics of one linear layer's input."""

    hessian: HessianAccumulator
    fisher: torch.Tensor | None = None  # mean grad² of the LM loss, (out, in), when requested
    plan: RowPlan | None = None  # per-row widths (and codebooks) planned by a model-wide allocation


class Method:
    """A recipe: turns one weight matrix (out, in) and its statistics into a `QuantizedTensor`."""

    name: ClassVar[str]
    needs_stats: ClassVar[bool] = True
    needs_full_hessian: ClassVar[bool] = True  # False: diag(XᵀX) suffices (much cheaper to collect)
    input_sample_stride: ClassVar[int] = 0  # > 0: also keep every n-th calibration input token
    bit_range: ClassVar[tuple[float, float]] = (1, 8)  # allowed --bits
    integer_bits: ClassVar[bool] = True  # only whole widths (no fractional budgets)
    default_bits: ClassVar[float] = 4  # --bits when none is given
    default_weighting: ClassVar[str] = "activation"  # importance used when the config names none
    uses_groups: ClassVar[bool] = False  # honours --group (the driver checks it divides every linear)
    supports_model_scope: ClassVar[bool] = False  # can spend one budget over the whole model
    default_scope: ClassVar[str] = "matrix"

    def weighting(self, config: QuantConfig) -> str:
        return config.weighting or self.default_weighting

    def scope(self, config: QuantConfig) -> str:
        return config.scope or self.default_scope

    def needs_fisher(self, config: QuantConfig) -> bool:
        return self.weighting(config) == "fisher"

    def row_table(self, W: torch.Tensor, stats: LayerStats | None, config: QuantConfig) -> RowTable:
        """Per-row errors and costs at each candidate width, for a model-wide allocation."""
        raise AnybitError(f"method {self.name!r} has no model-wide allocation (use --scope matrix)")

    def check_bits(self, bits: float) -> None:
        lo, hi = self.bit_range
        if not lo <= bits <= hi or (self.integer_bits and bits != int(bits)):
            what = "an integer bit width" if self.integer_bits else "a bit budget"
            raise AnybitError(f"method {self.name!r} needs {what} in {lo:g}-{hi:g}, got {bits:g}")

    def quantize(self, W: torch.Tensor, stats: LayerStats | None, config: QuantConfig) -> QuantizedTensor:
        raise NotImplementedError

    @staticmethod
    def group_size_for(W: torch.Tensor, config: QuantConfig, name: str = "") -> int:
        """The group size for W: the one asked for (checked against its input dimension), else the default for it."""
        in_features = W.shape[1]
        if config.group_size is None:
            return default_group_size(in_features)
        gs = config.group_size or in_features
        if in_features % gs:
            where = f" of {name}" if name else ""
            raise AnybitError(f"group size {gs} does not divide the input dimension {in_features}{where}")
        return gs
