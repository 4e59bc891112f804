"""Running a model one decoder layer at a time, with its weights resident or streamed from its files.

Both layer-wise passes (the quantization driver in `anybit.calibrate` and the Fisher pass in
`anybit.fisher`) capture the first decoder layer's inputs, then call each layer on its own. A `Supply`
says where each layer's weights come from: `Resident` for a model already in memory, `Streamed` for a
weightless skeleton whose layers are read from the source files when their turn comes and freed after.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
from torch import nn

from anybit.format.rotation import InputRotation
from anybit.memory import return_freed_memory
from anybit.model.adapters import Adapter, get_submodule
from anybit.model.sources import Skeleton


class Supply:
    """Where the driver gets each layer's weights: a model already in memory (this base class)."""

    streamed = False

    def outside(self, model: nn.Module, layers: nn.ModuleList) -> None:
        """Make every parameter outside the decoder layers usable (embeddings, final norm, head)."""

    def release_outside(self, model: nn.Module, layers: nn.ModuleList) -> None:
        """Free what `outside` made, where it can be read again."""

    def enter(self, layer: nn.Module) -> None:
        """Make the layer's parameters usable."""

    def leave(self, layer: nn.Module) -> None:
        """The layer is no longer needed in this pass (unchanged)."""


Resident = Supply


class Streamed(Supply):
    """Layers read from a `Skeleton`'s source when entered and put back on the meta device when left. The
    modules outside the layers are read when first called (only the embedding, for capturing inputs)."""

    streamed = True

    def __init__(self, skeleton: Skeleton) -> None:
        self.skeleton = skeleton
        self._hooks: list = []

    def outside(self, model: nn.Module, layers: nn.ModuleList) -> None:
        for module in outside_modules(model, layers):
            if any(p.is_meta for p in module.parameters(recurse=False)):
                self._hooks.append(module.register_forward_pre_hook(self._materialize_on_call))

    def _materialize_on_call(self, module: nn.Module, args: tuple) -> None:
        if any(p.is_meta for p in module.parameters(recurse=False)):
            device = next((a.device for a in args if isinstance(a, torch.Tensor)), torch.device("cpu"))
            self.skeleton.materialize(module, device=device)  # onto the input's device, ties kept

    def release_outside(self, model: nn.Module, layers: nn.ModuleList) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()
        self.skeleton.release(*outside_modules(model, layers))
        return_freed_memory()

    def enter(self, layer: nn.Module) -> None:
        self.skeleton.materialize(*layer.modules())

    def leave(self, layer: nn.Module) -> None:
        self.skeleton.release(*layer.modules())
        return_freed_memory()


def outside_modules(model: nn.Module, layers: nn.ModuleList) -> list[nn.Module]:
    """Every module of `model` that is not a decoder layer or inside one."""
    inside = {id(m) for layer in layers for m in layer.modules()} | {id(layers)}
    return [m for m in model.modules() if id(m) not in inside]


class _Captured(Exception):
    """Raised by the input catcher to stop the forward pass after the first decoder layer's input."""


class _InputCatcher(nn.Module):
    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer
        self.args: tuple = ()
        self.kwargs: dict = {}
        self.hidden: torch.Tensor | None = None

    def forward(self, hidden: torch.Tensor, *args, **kwargs):
        self.hidden, self.args, self.kwargs = hidden, args, kwargs
        raise _Captured


def move_outside_layers(model: nn.Module, layers: nn.ModuleList, device: torch.device) -> None:
    """Move every parameter and buffer that is not inside a decoder layer, keeping tied ones tied."""
    moved: dict[int, torch.Tensor] = {}

    def move(t: torch.Tensor, make: type) -> torch.Tensor:
        if id(t) not in moved:
            moved[id(t)] = t if t.device == device or t.is_meta else make(t.data.to(device))
        return moved[id(t)]

    for module in outside_modules(model, layers):
        for key, p in module._parameters.items():
            if p is not None:
                module._parameters[key] = move(p, lambda d: nn.Parameter(d, requires_grad=False))
        for key, b in module._buffers.items():
            if b is not None:
                module._buffers[key] = move(b, lambda d: d)


def map_tensors(obj, fn: Callable[[torch.Tensor], torch.Tensor]):
    """`obj` with every tensor nested in its tuples, lists and dicts replaced by `fn(tensor)`."""
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, tuple):
        return tuple(map_tensors(o, fn) for o in obj)
    if isinstance(obj, list):
        return [map_tensors(o, fn) for o in obj]
    if isinstance(obj, dict):
        return {k: map_tensors(v, fn) for k, v in obj.items()}
    return obj


def to_device(obj, device: torch.device, dtype: torch.dtype):
    """Move tensors nested in layer arguments; floating ones (rotary tables, masks) also take `dtype`."""
    return map_tensors(obj, lambda t: t.to(device=device, dtype=dtype) if t.is_floating_point() else t.to(device))


@torch.inference_mode()
def capture_layer_inputs(
    model: nn.Module,
    adapter: Adapter,
    windows: torch.Tensor,
    device: torch.device,
    dtype: torch.dtype,
    supply: Supply | None = None,
) -> tuple[torch.Tensor, tuple, dict]:
    """Inputs of the first decoder layer for every calibration window (in `dtype`, on `device`), and its other
    arguments (on `device`, floating ones in `dtype`)."""
    supply = supply or Resident()
    layers = adapter.layers(model)
    supply.outside(model, layers)
    move_outside_layers(model, layers, device)
    first = layers[0]
    catcher = _InputCatcher(first)
    layers[0] = catcher
    hidden = None
    try:
        for i, window in enumerate(windows):
            with contextlib.suppress(_Captured):
                model(window.unsqueeze(0).to(device), use_cache=False)
            if hidden is None:
                hidden = torch.empty((len(windows), *catcher.hidden.shape[1:]), dtype=dtype, device=device)
            hidden[i] = catcher.hidden[0].to(dtype)
    finally:
        layers[0] = first
        move_outside_layers(model, layers, torch.device("cpu"))
        supply.release_outside(model, layers)
    return hidden, to_device(catcher.args, device, dtype), to_device(catcher.kwargs, device, dtype)


def layer_output(result) -> torch.Tensor:
    """The hidden states a decoder layer returns (alone, or first of a tuple)."""
    return result[0] if isinstance(result, tuple) else result


def run_layer(layer: nn.Module, hidden: torch.Tensor, args: tuple, kwargs: dict) -> torch.Tensor:
    """The layer's output for each window of `hidden` (n, seqlen, d), one window at a time."""
    out = torch.empty_like(hidden)
    for i in range(hidden.shape[0]):
        out[i] = layer_output(layer(hidden[i : i + 1], *args, **kwargs))[0]
    return out


def layer_rotations(adapter: Adapter, layer: nn.Module, index: int, seed: int) -> dict[str, InputRotation]:
    """The input rotation of each linear of decoder layer `index` (`--rotate`): one per group of linears that
    share an input, the same in every pass (drawn from the run's seed and the layer's and group's positions)."""
    out = {}
    for position, group in enumerate(adapter.groups):
        width = adapter.weight_of(get_submodule(layer, group[0])).shape[1]
        generator = torch.Generator().manual_seed((seed * 1_000_003 + index) * 101 + position)
        rotation = InputRotation.random(width, generator)
        out.update(dict.fromkeys(group, rotation))
    return out
