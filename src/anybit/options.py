"""Recipe options, each declared once: `QuantConfig`'s fields, the TOML keys, the command-line flags, their
help and their checks are all made from these declarations (`config.py`, `cli.py`)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from anybit.errors import AnybitError

_TYPE_NAMES = {bool: "bool", int: "int", float: "float", str: "str"}


@dataclass(frozen=True)
class Option:
    """One setting of a quantization run.

    `default` None is a value of its own (e.g. "all windows"), or, with `method_default` set, "the method's
    own": the `Method` class attribute of that name gives it. `low`/`high` bound numbers (closed unless `low_open`/`high_open`); `choices` bound strings.
    """

    name: str  # QuantConfig field and TOML key
    kind: type  # bool, int, float or str
    default: object
    help: str
    choices: tuple[str, ...] = ()
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    method_default: str = ""  # Method attribute holding the default when the value is None
    negatable: bool = False  # a bool with an "off" spelling too (else a flag that turns it on)
    flag: str = ""  # command-line spelling when not --name-with-dashes
    off_flag: str = ""  # a negatable bool's "off" spelling when not --no-name-with-dashes

    @property
    def cli_flag(self) -> str:
        return self.flag or "--" + self.name.replace("_", "-")

    @property
    def cli_off_flag(self) -> str:
        return self.off_flag or "--no-" + self.cli_flag.removeprefix("--")

    @property
    def takes_none(self) -> bool:
        return self.default is None

    def check(self, value: object) -> None:
        """An AnybitError naming the option unless `value` is one it takes."""
        if value is None and self.takes_none:
            return
        self._check_type(value)
        if isinstance(value, float) and not math.isfinite(value):
            raise AnybitError(f"{self.name} must be a finite number, got {value!r}")
        if self.choices and value not in self.choices:
            raise AnybitError(f"{self.name} must be one of {', '.join(self.choices)}, got {value!r}")
        if isinstance(value, int | float) and not isinstance(value, bool) and not self._in_range(value):
            raise AnybitError(f"{self.cli_flag} must be {self.range_text()}, got {value:g}")

    def _check_type(self, value: object) -> None:
        allowed = (float, int) if self.kind is float else (self.kind,)  # 3 is a fine 3.0
        if (isinstance(value, bool) and self.kind is not bool) or not isinstance(value, allowed):
            names = _TYPE_NAMES[self.kind] + (" or none" if self.takes_none else "")
            raise AnybitError(f"{self.name} must be {names}, got {value!r}")

    def _in_range(self, value: float) -> bool:
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return self.high is None or (value < self.high if self.high_open else value <= self.high)

    def range_text(self) -> str:
        """The allowed numbers in words: "positive", "at least 1", "in [0, 0.5)", "in 0-8"."""
        lo, hi = self.low, self.high
        if lo is None:
            return f"at most {hi:g}"
        if hi is None:
            if self.low_open:
                return "positive" if lo == 0 else f"above {lo:g}"
            return "positive" if (lo == 1 and self.kind is int) else f"at least {lo:g}"
        if self.kind is int and not (self.low_open or self.high_open):
            return f"in {lo:g}-{hi:g}"
        return f"in {'(' if self.low_open else '['}{lo:g}, {hi:g}{')' if self.high_open else ']'}"
