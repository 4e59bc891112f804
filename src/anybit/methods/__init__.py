"""Named quantization recipes behind one `Method` interface, in one registry."""

from __future__ import annotations

from anybit.errors import AnybitError
from anybit.methods.anybit import AnyBit
from anybit.methods.base import LayerStats, Method
from anybit.methods.claq import CLAQ
from anybit.methods.nonuniform import KMeansRows, SqueezeLLM
from anybit.methods.skim import SKIM
from anybit.methods.slim import SliM
from anybit.methods.uniform import GPTQ, RTN
from anybit.methods.vector import VectorCodebooks

METHODS: dict[str, Method] = {
    m.name: m for m in (RTN(), GPTQ(), KMeansRows(), SqueezeLLM(), CLAQ(), SliM(), SKIM(), AnyBit(), VectorCodebooks())
}


def get_method(name: str) -> Method:
    """The registered method called `name`; a clear error lists the known ones otherwise."""
    try:
        return METHODS[name]
    except KeyError:
        raise AnybitError(f"unknown method {name!r}; known methods: {', '.join(sorted(METHODS))}") from None


__all__ = ["METHODS", "LayerStats", "Method", "get_method"]
