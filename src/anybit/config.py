"""`QuantConfig`: every choice of a quantization run, validated when it is made.

Its fields are made from the option declarations (`anybit.options.Option`): the run's own below, and each
recipe's in its `Method.options`; the TOML keys and the command-line flags come from the same declarations.
"""

from __future__ import annotations

import dataclasses
import re
import tomllib
from pathlib import Path

from anybit.errors import AnybitError
from anybit.methods import METHODS, get_method
from anybit.options import Option

DTYPES = ("auto", "float32", "bfloat16", "float16")  # auto: see `compute_dtype`
AUTO_DTYPE_HELP = "auto: bfloat16 where the hardware multiplies it natively, else float32."
LAYER_INPUTS = ("quantized", "original")  # what each layer is calibrated on (`--layer-inputs`)
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


RUN_OPTIONS = (
    Option("method", str, "anybit", "Quantization recipe."),
    Option("bits", float, None, "Target bits per weight.", method_default="default_bits"),
    Option("calib", str, "wikitext2-valid", "Calibration corpus name or text file."),
    Option("nsamples", int, 128, "Calibration windows.", low=1),
    Option("seqlen", int, 2048, "Calibration window length in tokens.", low=1),
    Option("seed", int, 0, "Random seed (calibration windows, K-means starts)."),
    Option("device", str, "cpu", "cpu or cuda[:N]."),
    Option(
        "calib_dtype",
        str,
        "auto",
        f"Dtype of the calibration forward passes (statistics are float32); {AUTO_DTYPE_HELP}",
        choices=DTYPES,
    ),
    Option("fisher_nsamples", int, None, "Calibration windows for Fisher weighting [default: all].", low=1),
    Option(
        "tune_steps",
        int,
        0,
        "Adam steps per decoder layer (one calibration window each) that tune its codebooks or scales and norms, "
        "codes fixed, toward the unquantized model's activations; 0: off.",
        low=0,
        high=MAX_TUNE_STEPS,
    ),
    Option("tune_lr", float, 3e-4, "Learning rate of --tune-steps.", low=0, high=1, low_open=True, high_open=True),
    Option(
        "layer_inputs",
        str,
        "quantized",
        "Calibrate each layer on the outputs of the already-quantized layers before it, or on the original "
        "model's: one forward pass per layer instead of two, faster, usually a little worse.",
        choices=LAYER_INPUTS,
    ),
)


def recipe_options() -> tuple[Option, ...]:
    """Every recipe option once, in the order the recipes list them."""
    seen: dict[str, Option] = {}
    for method in METHODS.values():
        for option in method.options:
            if seen.setdefault(option.name, option) is not option:
                raise TypeError(f"two different options are called {option.name}")  # a programming error
    return tuple(seen.values())


RECIPE_OPTIONS = recipe_options()
OPTIONS = RUN_OPTIONS + RECIPE_OPTIONS


def option_users(option: Option) -> list[str]:
    """The recipes that take `option` (all of them for a run option)."""
    if option in RUN_OPTIONS:
        return list(METHODS)
    return [name for name, method in METHODS.items() if method.takes(option.name)]


class _ConfigChecks:
    """The behaviour of `QuantConfig`; its fields are made from `OPTIONS` below."""

    def __post_init__(self) -> None:
        for option in OPTIONS:
            option.check(getattr(self, option.name))
        method = get_method(self.method)
        self._resolve_recipe_options(method)
        method.check_bits(self.bits, self.scope)
        check_device_name(self.device)
        object.__setattr__(self, "calib_dtype", compute_dtype(self.calib_dtype, self.device))
        if self.tune_steps and not method.needs_stats:
            raise AnybitError(f"method {self.method!r} uses no calibration data to tune on (--tune-steps)")
        if self.tune_steps and self.nsamples < 2:
            raise AnybitError("--tune-steps needs at least 2 calibration windows (--nsamples): one is held out")

    def _resolve_recipe_options(self, method) -> None:
        """The method's defaults for what was left at None; an option it does not take must stay unset."""
        if self.bits is None:
            object.__setattr__(self, "bits", method.default_bits)
        for option in RECIPE_OPTIONS:
            value = getattr(self, option.name)
            if not method.takes(option.name):
                if value is not None and value != option.default:
                    users = ", ".join(option_users(option))
                    raise AnybitError(
                        f"{option.cli_flag} is not an option of method {self.method!r} (methods that take it: {users})"
                    )
            elif value is None and option.method_default:
                object.__setattr__(self, option.name, method.option_default(option))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_toml(cls, path: str | Path, **overrides: object) -> QuantConfig:
        """Read a config file (keys as the fields); explicit overrides win."""
        try:
            values = tomllib.loads(Path(path).read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise AnybitError(f"cannot read config {path}: {exc}") from exc
        unknown = set(values) - {option.name for option in OPTIONS}
        if unknown:
            raise AnybitError(f"unknown keys in {path}: {', '.join(sorted(unknown))}")
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)


def _field_type(option: Option) -> object:
    return option.kind | None if option.takes_none else option.kind


QuantConfig = dataclasses.make_dataclass(
    "QuantConfig",
    [(o.name, _field_type(o), dataclasses.field(default=o.default)) for o in OPTIONS],
    bases=(_ConfigChecks,),
    frozen=True,
    namespace={
        "__doc__": "One quantization run: a field per option in `OPTIONS` (run options, then recipe options). "
        "`group_size` 0 means one group per output channel; None, the default, `default_group_size`.",
        "__module__": __name__,
    },
)
