"""How much to compensate: k_chunk per layer type (`DecPlan`, the CLI's `--dec` grammar) and per layer."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from anybit.model.adapters import Adapter
from anybit.runtime.dec.residual import Residual

DEC_ROLES = ("qkv", "o", "gu", "down")  # the paper's layer types: the adapters' linear groups, in order


@dataclass(frozen=True)
class DecPlan:
    """k_chunk per layer type (`DEC_ROLES`); 0 leaves that type uncompensated.

    Written "8" (every type), "qkv=4,down=16" (types not named get 0) or "8,down=16" (a default for
    the types not named)."""

    ks: tuple[int, ...]

    def __post_init__(self) -> None:
        if len(self.ks) != len(DEC_ROLES) or min(self.ks) < 0 or max(self.ks) < 1:
            raise ValueError(f"a DEC plan needs k_chunk >= 0 for each of {', '.join(DEC_ROLES)}, one of them > 0")

    @classmethod
    def parse(cls, text: str | int) -> DecPlan:
        default, named = 0, {}
        for item in str(text).replace(" ", "").split(","):
            role, _, value = item.rpartition("=")
            if role and role not in DEC_ROLES:
                raise ValueError(f"unknown layer type {role!r} in DEC plan {text!r}; known: {', '.join(DEC_ROLES)}")
            try:
                k = int(value)
            except ValueError:
                raise ValueError(f"DEC plan {text!r}: {value!r} is not an integer k_chunk") from None
            if role:
                named[role] = k
            else:
                default = k
        try:
            return cls(tuple(named.get(role, default) for role in DEC_ROLES))
        except ValueError as exc:
            raise ValueError(f"DEC plan {text!r}: {exc}") from None

    @property
    def uniform(self) -> int | None:
        """The k_chunk shared by every layer type, or None."""
        return self.ks[0] if len(set(self.ks)) == 1 else None

    def __str__(self) -> str:
        if self.uniform is not None:
            return str(self.uniform)
        return ",".join(f"{role}={k}" for role, k in zip(DEC_ROLES, self.ks, strict=True))

    def to_json(self) -> int | str:
        return self.uniform if self.uniform is not None else str(self)

    def for_layers(self, names: Iterable[str], adapter: Adapter) -> dict[str, int]:
        """k_chunk of each named linear (dotted module names ending in one of the adapter's linears)."""
        return {name: self.ks[layer_type(name, adapter)] for name in names}

    def fetch_bytes(self, residuals: Mapping[str, Residual], adapter: Adapter) -> int:
        """Residual bytes one token's compensation reads from host memory under this plan."""
        return sum(residuals[name].fetch_bytes(k) for name, k in self.for_layers(residuals, adapter).items())


def layer_type(name: str, adapter: Adapter) -> int:
    """The position in `DEC_ROLES` of a linear's type: its group in the adapter."""
    types = [i for i, group in enumerate(adapter.groups) for linear in group if name.endswith("." + linear)]
    if len(types) != 1 or len(adapter.groups) != len(DEC_ROLES):
        raise ValueError(f"cannot tell the DEC layer type of {name}")
    return types[0]


def per_layer(k_chunks: int | Mapping[str, int], layers: Mapping[str, object]) -> dict[str, int]:
    """k_chunk of each layer from one int for all or a mapping that names exactly these layers."""
    if isinstance(k_chunks, int):
        return dict.fromkeys(layers, k_chunks)
    if set(k_chunks) != set(layers):
        raise ValueError("k_chunks must name exactly the compensated layers")
    return dict(k_chunks)
