"""The `Method` protocol every recipe implements, and what the driver hands it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch

from anybit.errors import AnybitError
from anybit.format.qtensor import QuantizedTensor
from anybit.options import Option
from anybit.quant.groups import DEFAULT_GROUP, DEFAULT_GROUP_RANGE, default_group_size

if TYPE_CHECKING:
    from anybit.alloc.skim import RowPlan, RowTable
    from anybit.config import QuantConfig
    from anybit.quant.gptq import HessianAccumulator


WEIGHTINGS = ("activation", "fisher", "none")
SCOPES = ("matrix", "model")

# Options several recipes take; each recipe lists the ones it takes in `Method.options`.
GROUP = Option(
    "group_size",
    int,
    None,
    f"Group size (0: per output channel) [default: {DEFAULT_GROUP}; for a matrix whose inputs {DEFAULT_GROUP} does "
    f"not divide, the divisor of them closest to {DEFAULT_GROUP} in {DEFAULT_GROUP_RANGE[0]}-{DEFAULT_GROUP_RANGE[1]}, "
    "else per channel].",
    low=0,
    flag="--group",
)
SYM = Option(
    "sym",
    bool,
    False,
    "Symmetric grid (zero point fixed at the middle) instead of min-max.",
    negatable=True,
    off_flag="--asym",
)
DAMP = Option("damp", float, 0.01, "GPTQ dampening, fraction of mean diag(H).", low=0, high=1, high_open=True)
ACT_ORDER = Option(
    "act_order",
    bool,
    None,
    "Round columns in order of descending Hessian diagonal.",
    method_default="default_act_order",
    negatable=True,
)
WEIGHTING = Option(
    "weighting",
    str,
    None,
    "Importance of each weight in K-means.",
    choices=WEIGHTINGS,
    method_default="default_weighting",
    flag="--weights",
)
OUTLIERS = Option(
    "outliers",
    float,
    None,
    "Share of weights kept in fp16 (claq: the mean reserved share).",
    low=0,
    high=0.5,
    high_open=True,
    method_default="default_outliers",
)
SCOPE = Option(
    "scope",
    str,
    None,
    "One bit budget per matrix or over the whole model (skim/anybit: per-row widths; gptq: each linear 2, 3, 4 or "
    "8 bits within a fractional budget).",
    choices=SCOPES,
    method_default="default_scope",
)

ROTATE = Option(
    "rotate",
    bool,
    None,
    "Rotate each linear's input dimension by a random Hadamard-based orthogonal transform before quantizing "
    "(incoherence processing, stored with the layer and applied to its input at run time).",
    method_default="default_rotate",
    negatable=True,
)


@dataclass
class LayerStats:
    """Calibration statistics of one linear layer's input."""

    hessian: HessianAccumulator
    fisher: torch.Tensor | None = None  # mean grad² of the LM loss, (out, in), when requested
    plan: RowPlan | None = None  # widths (and codebooks) planned by a model-wide allocation


class Method:
    """A recipe: turns one weight matrix (out, in) and its statistics into a `QuantizedTensor`."""

    name: ClassVar[str]
    options: ClassVar[tuple[Option, ...]] = ()  # the recipe options it takes beyond the run's (config.RUN_OPTIONS)
    needs_stats: ClassVar[bool] = True
    needs_full_hessian: ClassVar[bool] = True  # False: diag(XᵀX) suffices (much cheaper to collect)
    input_sample_stride: ClassVar[int] = 0  # > 0: also keep every n-th calibration input token
    bit_range: ClassVar[tuple[float, float]] = (1, 8)  # allowed --bits
    integer_bits: ClassVar[bool] = True  # only whole widths (no fractional budgets)
    default_bits: ClassVar[float] = 4  # --bits when none is given
    # The defaults of the options in `options` that have none of their own (`Option.method_default`):
    default_weighting: ClassVar[str] = "activation"
    default_scope: ClassVar[str] = "matrix"
    default_refine: ClassVar[int] = 0
    default_act_order: ClassVar[bool] = False
    default_outliers: ClassVar[float] = 0.0
    default_scaling: ClassVar[bool] = False
    default_rotate: ClassVar[bool] = False

    @classmethod
    def takes(cls, option: str) -> bool:
        """Whether this recipe takes the option called `option` (beyond the run's own)."""
        return any(o.name == option for o in cls.options)

    @classmethod
    def option_default(cls, option: Option) -> object:
        """What `option` is for this recipe when the config leaves it at None."""
        return getattr(cls, option.method_default) if option.method_default else option.default

    def weighting(self, config: QuantConfig) -> str:
        return config.weighting or self.default_weighting

    def scope(self, config: QuantConfig) -> str:
        return config.scope or self.default_scope

    def needs_fisher(self, config: QuantConfig) -> bool:
        return self.weighting(config) == "fisher"

    def row_table(self, W: torch.Tensor, stats: LayerStats | None, config: QuantConfig) -> RowTable:
        """Per-row errors and costs at each candidate width, for a model-wide allocation."""
        raise AnybitError(f"method {self.name!r} has no model-wide allocation (use --scope matrix)")

    def shape_problem(self, shape: tuple[int, int]) -> str:
        """Why this recipe cannot code a linear of `shape` (out, in) ("" when it can)."""
        return ""

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
