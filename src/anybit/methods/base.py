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
    plan: RowPlan | None = None  # widths (and codebooks) planned by a model-wide allocation


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
    refines_codebooks: ClassVar[bool] = False  # takes --refine (least-squares codebook refits)
    default_refine: ClassVar[int] = 0  # --refine when none is given
    default_act_order: ClassVar[bool] = False  # --act-order when none is given

    def weighting(self, config: QuantConfig) -> str:
        return config.weighting or self.default_weighting

    def scope(self, config: QuantConfig) -> str:
        return config.scope or self.default_scope

    def needs_fisher(self, config: QuantConfig) -> bool:
        return self.weighting(config) == "fisher"

    def row_table(self, W: torch.Tensor, stats: LayerStats | None, config: QuantConfig) -> RowTable:
        """Per-row errors and costs at each candidate width, for a model-wide allocation."""
        raise AnybitError(f"method {self.name!r} has no model-wide allocation (use --scope matrix)")

    def cheapest_bits(self, shape: tuple[int, int], config: QuantConfig) -> float:
        """A lower bound of the counted bits a model-wide allocation can give a linear of `shape` (0: none known)."""
        return 0.0

    def check_bits(self, bits: float, scope: str | None = None) -> None:
        """An AnybitError unless `bits` is a budget this method takes (at `scope`, None: its default)."""
        lo, hi = self.bit_range
        integer = self.integer_bits and (scope or self.default_scope) != "model"
        if not lo <= bits <= hi or (integer and bits != int(bits)):
            what = "an integer bit width" if integer else "a bit budget"
            raise AnybitError(f"method {self.name!r} needs {what} in {lo:g}-{hi:g}, got {bits:g}")

    def quantize(self, W: torch.Tensor, stats: LayerStats | None, config: QuantConfig) -> QuantizedTensor:
        raise NotImplementedError

    @staticmethod
    def group_size_for(W: torch.Tensor, config: QuantConfig, name: str = "") -> int:
        """The group size for W: the one asked for (checked against its input dimension), else the default for it."""
        return Method.group_size_of(W.shape[1], config, name)

    @staticmethod
    def group_size_of(in_features: int, config: QuantConfig, name: str = "") -> int:
        """`group_size_for` a matrix of `in_features` inputs."""
        if config.group_size is None:
            return default_group_size(in_features)
        gs = config.group_size or in_features
        if in_features % gs:
            where = f" of {name}" if name else ""
            raise AnybitError(f"group size {gs} does not divide the input dimension {in_features}{where}")
        return gs


def row_importance(stats: LayerStats, H: torch.Tensor, rows: int) -> torch.Tensor:
    """How much a unit of layer-wise output error in each row costs the model's loss, up to one
    model-wide constant: 1 for every row without Fisher information, else the row's mean squared
    output gradient, estimated as Σⱼ F_ij / Σⱼ E[x_j²] (F: Fisher diagonal of the weights, which is
    ≈ E[g_i²] E[x_j²] when gradients and inputs are independent; an approximation).
    """
    if stats.fisher is None:
        return torch.ones(rows, dtype=torch.float64)
    input_energy = torch.diagonal(H).double().sum().clamp(min=1e-30)
    return stats.fisher.sum(dim=1, dtype=torch.float64).cpu() / input_energy.cpu()  # no float64 copy of F
