"""`QuantConfig`: every choice of a quantization run, validated when it is made."""

from __future__ import annotations

import dataclasses
import math
import re
import tomllib
import typing
from dataclasses import dataclass
from pathlib import Path

from anybit.errors import AnybitError

DTYPES = ("auto", "float32", "bfloat16", "float16")  # auto: see `compute_dtype`
WEIGHTINGS = ("activation", "fisher", "none")
SCOPES = ("matrix", "model")
LAYER_INPUTS = ("quantized", "original")  # what each layer is calibrated on (`--layer-inputs`)
DEC_SCORES = ("activation", "contribution")  # how dynamic error compensation ranks input channels
KERNELS = ("auto", "fast", "exact", "triton", "reference")  # backends of the quantized linears (runtime.qlinear)
HEAD_CHOICES = ("int8", "dense")  # the embedding and output head at run time (runtime.head)
MAX_REFINE = 8  # rounds of codebook refits (`--refine`)
MAX_TUNE_STEPS = 10_000  # Adam steps per decoder layer (`--tune-steps`), or of `anybit tune`
E2E_LR = 3e-5  # `anybit tune`'s default learning rate (end-to-end tuning, `tune.tune_model`)
_DEVICE = re.compile(r"cpu|cuda(:\d+)?")


def cpu_has_native_bfloat16() -> bool:
    """Whether this CPU multiplies bfloat16 natively (AVX-512 BF16, AMX, Arm BF16); without, bfloat16 matmuls
    run about 80x slower than float32 (measured on an AVX2 EPYC)."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    flags = {flag for line in info.splitlines() if line.startswith(("flags", "Features")) for flag in line.split()}
    return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})


def compute_dtype(dtype: str, device: str = "cpu") -> str:
    """The dtype name `dtype` stands for on `device`: "auto" is bfloat16 where it runs fast (CUDA with
    bfloat16 support, CPUs with native bfloat16), else float32 (float16 on older GPUs)."""
    if dtype != "auto":
        return dtype
    if device.startswith("cuda"):
        import torch

        return "bfloat16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "float16"
    return "bfloat16" if cpu_has_native_bfloat16() else "float32"


def check_device_name(device: object) -> None:
    """An AnybitError unless `device` names a device anybit runs on: cpu, cuda or cuda:N."""
    if not isinstance(device, str) or not _DEVICE.fullmatch(device):
        raise AnybitError(f"device must be cpu, cuda or cuda:N, got {device!r}")


DEFAULT_GROUP = 64
DEFAULT_GROUP_RANGE = (32, 128)  # where DEFAULT_GROUP does not divide, a divisor in this range is used


def default_group_size(in_features: int) -> int:
    """The group of a matrix with `in_features` inputs when none was asked for: DEFAULT_GROUP where it divides,
    else the divisor of in_features in DEFAULT_GROUP_RANGE closest to it (the smaller on a tie), else one group
    per row (in_features)."""
    if in_features % DEFAULT_GROUP == 0:
        return DEFAULT_GROUP
    lo, hi = DEFAULT_GROUP_RANGE
    divisors = [g for g in range(lo, min(hi, in_features) + 1) if in_features % g == 0]
    return min(divisors, key=lambda g: (abs(g - DEFAULT_GROUP), g)) if divisors else in_features


@dataclass(frozen=True)
class QuantConfig:
    """One quantization run. `group_size` 0 means one group per output channel (per-channel); None, the
    default, means DEFAULT_GROUP wherever it divides a matrix's input dimension (`default_group_size`)."""

    method: str = "anybit"
    bits: float | None = None  # None: the method's default (anybit and skim 3.25, the others 4)
    group_size: int | None = None
    act_order: bool | None = None  # gptq/anybit: round columns in act-order; None: the method's default
    sym: bool = False  # rtn/gptq: symmetric grid (zero point fixed at the middle) instead of min-max
    damp: float = 0.01
    calib: str = "wikitext2-valid"
    nsamples: int = 128
    seqlen: int = 2048
    seed: int = 0
    device: str = "cpu"
    calib_dtype: str = "auto"  # resolved for the device when the config is made (`compute_dtype`)
    weighting: str | None = None  # K-means importance of each weight; None: the method's default
    outliers: float | None = None  # share of weights kept in fp16; None: the method's default
    fisher_nsamples: int | None = None  # calibration windows used for Fisher; None: all of them
    tau: float = 13.0  # CLAQ: a weight is an outlier when |w| >= tau * mean|W|
    search_split: bool = False  # CLAQ: try several high widths per matrix, keep the least output error
    clip_min: float = 0.9  # SliM: lowest clipping factor of the range searched (the paper's 0.9)
    scaling: bool | None = None  # SKIM: train the per-column scaling vector; None: the method's default
    scope: str | None = None  # SKIM/anybit: budget per "matrix" or over the whole "model"; None: method's default
    refine: int | None = None  # SKIM/anybit: rounds of least-squares codebook refits; None: the method's default
    tune_steps: int = 0  # Adam steps per decoder layer on its codebooks/scales and norms (`anybit.tune`); 0: off
    tune_lr: float = 3e-4
    layer_inputs: str = "quantized"  # the already-quantized layers' outputs, or the original model's (faster)

    def __post_init__(self) -> None:
        from anybit.methods import get_method  # the registry knows each method's bit range

        self._check_types()
        method = get_method(self.method)
        if self.bits is None:
            object.__setattr__(self, "bits", method.default_bits)
        method.check_bits(self.bits, self.scope)
        if self.act_order is None:
            object.__setattr__(self, "act_order", method.default_act_order)
        if self.group_size is not None and self.group_size < 0:
            raise AnybitError(f"group size must be positive (or 0 for per-channel), got {self.group_size}")
        if not 0 <= self.damp < 1:
            raise AnybitError(f"dampening must be in [0, 1), got {self.damp}")
        if self.nsamples < 1 or self.seqlen < 1:
            raise AnybitError("--nsamples and --seqlen must be positive")
        if self.calib_dtype not in DTYPES:
            raise AnybitError(f"calibration dtype must be one of {', '.join(DTYPES)}, got {self.calib_dtype}")
        check_device_name(self.device)
        object.__setattr__(self, "calib_dtype", compute_dtype(self.calib_dtype, self.device))
        if self.outliers is not None and not 0 <= self.outliers < 0.5:
            raise AnybitError(f"outlier fraction must be in [0, 0.5), got {self.outliers}")
        if not 0 < self.clip_min <= 1:
            raise AnybitError(f"--clip-min must be in (0, 1], got {self.clip_min}")
        if self.tau <= 0:
            raise AnybitError(f"--tau must be positive, got {self.tau}")
        if self.fisher_nsamples is not None and self.fisher_nsamples < 1:
            raise AnybitError("--fisher-nsamples must be positive")
        if self.weighting is not None and self.weighting not in WEIGHTINGS:
            raise AnybitError(f"weighting must be one of {', '.join(WEIGHTINGS)}, got {self.weighting!r}")
        if self.layer_inputs not in LAYER_INPUTS:
            raise AnybitError(f"layer inputs must be one of {', '.join(LAYER_INPUTS)}, got {self.layer_inputs!r}")
        if self.scope is not None and self.scope not in SCOPES:
            raise AnybitError(f"scope must be one of {', '.join(SCOPES)}, got {self.scope!r}")
        if self.refine is not None and not 0 <= self.refine <= MAX_REFINE:
            raise AnybitError(f"--refine must be in 0-{MAX_REFINE}, got {self.refine}")
        if self.refine and not method.refines_codebooks:
            raise AnybitError(
                f"method {self.method!r} has no per-row codebooks to refine (--refine is for skim, anybit)"
            )
        if self.refine is None:
            object.__setattr__(self, "refine", method.default_refine)
        if not 0 <= self.tune_steps <= MAX_TUNE_STEPS:
            raise AnybitError(f"--tune-steps must be in 0-{MAX_TUNE_STEPS}, got {self.tune_steps}")
        if not 0 < self.tune_lr < 1:
            raise AnybitError(f"--tune-lr must be in (0, 1), got {self.tune_lr}")
        if self.tune_steps and not method.needs_stats:
            raise AnybitError(f"method {self.method!r} uses no calibration data to tune on (--tune-steps)")
        if self.tune_steps and self.nsamples < 2:
            raise AnybitError("--tune-steps needs at least 2 calibration windows (--nsamples): one is held out")
        if self.scope == "model" and not method.supports_model_scope:
            raise AnybitError(f"method {self.method!r} has no model-wide allocation (use --scope matrix)")

    def _check_types(self) -> None:
        """Each field holds a value of its declared type (a TOML file can hold anything)."""
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            allowed = typing.get_args(hints[f.name]) or (hints[f.name],)
            if float in allowed:
                allowed = (*allowed, int)  # 3 is a fine 3.0
            if (isinstance(value, bool) and bool not in allowed) or not isinstance(value, allowed):
                names = " or ".join(
                    "none" if t is type(None) else t.__name__ for t in allowed if t is not int or float not in allowed
                )
                raise AnybitError(f"{f.name} must be {names}, got {value!r}")
            if isinstance(value, float) and not math.isfinite(value):
                raise AnybitError(f"{f.name} must be a finite number, got {value!r}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_toml(cls, path: str | Path, **overrides: object) -> QuantConfig:
        """Read a config file (keys as the fields); explicit overrides win."""
        try:
            values = tomllib.loads(Path(path).read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise AnybitError(f"cannot read config {path}: {exc}") from exc
        unknown = set(values) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise AnybitError(f"unknown keys in {path}: {', '.join(sorted(unknown))}")
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)
