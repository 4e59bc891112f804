"""Per-architecture adapters: where the decoder layers are and which linears they run, in order.

Each adapter is data: the dotted path of the decoder-layer list and the linear sublayers grouped by
shared input, in execution order (the driver collects one XᵀX per group). GPT-2's `Conv1D` stores
its weight as (in, out); adapters mark that, and `weight_of` always returns (out, in).
"""

from __future__ import annotations

from dataclasses import dataclass
from operator import attrgetter

import torch
from torch import nn

from anybit.errors import AnybitError

LLAMA_GROUPS = (
    ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    ("self_attn.o_proj",),
    ("mlp.gate_proj", "mlp.up_proj"),
    ("mlp.down_proj",),
)


@dataclass(frozen=True)
class Adapter:
    """Where a family keeps its decoder layers and linears."""

    layers_path: str
    groups: tuple[tuple[str, ...], ...]  # linears sharing one input, in execution order
    transposed_weights: bool = False  # GPT-2 Conv1D: weight is (in, out)

    @property
    def linear_names(self) -> tuple[str, ...]:
        return tuple(name for group in self.groups for name in group)

    def layers(self, model: nn.Module) -> nn.ModuleList:
        return attrgetter(self.layers_path)(model)

    def weight_of(self, module: nn.Module) -> torch.Tensor:
        """The (out, in) float32 weight of a linear sublayer."""
        if getattr(module, "qtensor", None) is not None:
            raise AnybitError("this layer is already quantized")
        W = module.weight.detach()
        return (W.t() if self.transposed_weights else W).float()


ADAPTERS: dict[str, Adapter] = {
    "llama": Adapter("model.layers", LLAMA_GROUPS),
    "mistral": Adapter("model.layers", LLAMA_GROUPS),
    "qwen2": Adapter("model.layers", LLAMA_GROUPS),
    "qwen3": Adapter("model.layers", LLAMA_GROUPS),  # q/k norms sit between the linears: no linear of their own
    # Gemma 3 (text): embedding scaling, sandwich norms and GeGLU live in the layer code; linears as Llama's
    "gemma3_text": Adapter("model.layers", LLAMA_GROUPS),
    "phi3": Adapter(
        "model.layers",
        (("self_attn.qkv_proj",), ("self_attn.o_proj",), ("mlp.gate_up_proj",), ("mlp.down_proj",)),
    ),
    "gpt2": Adapter(
        "transformer.h",
        (("attn.c_attn",), ("attn.c_proj",), ("mlp.c_fc",), ("mlp.c_proj",)),
        transposed_weights=True,
    ),
}


def get_adapter(model_or_type: nn.Module | str) -> Adapter:
    """The adapter for a model (by its config's model_type) or a model_type string."""
    model_type = model_or_type if isinstance(model_or_type, str) else model_or_type.config.model_type
    try:
        return ADAPTERS[model_type]
    except KeyError:
        raise AnybitError(
            f"unsupported architecture {model_type!r}; supported: {', '.join(sorted(ADAPTERS))}"
        ) from None


def get_submodule(root: nn.Module, dotted: str) -> nn.Module:
    return attrgetter(dotted)(root)


def set_submodule(root: nn.Module, dotted: str, module: nn.Module) -> None:
    parent, _, leaf = dotted.rpartition(".")
    setattr(get_submodule(root, parent) if parent else root, leaf, module)
