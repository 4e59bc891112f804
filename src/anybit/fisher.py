"""Fisher sensitivity: the mean squared gradient of the language-model loss for each linear weight.

SqueezeLLM weights its K-means objective by this diagonal Fisher approximation; anybit's recipe also
compares rows across the model by it. The gradients are taken one decoder layer at a time, so that only one
layer's weights need to be in memory (the layer-wise driver's `Supply`): for a batch of windows, a forward
pass stores each layer's input, the model's own head gives the loss gradient at the last hidden state, and
a backward pass recomputes each layer from its stored input, in reverse, adding the squared gradient of
each window's loss to float32 accumulators. Accumulators for models too large for memory live in an
unlinked temporary file, memory-mapped; each layer's pages leave the resident set once its gradients are in.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch
from torch import nn
from tqdm.auto import tqdm

from anybit.format.rotation import InputRotation
from anybit.layerwise import Resident, Supply, capture_layer_inputs, layer_output, move_outside_layers
from anybit.memory import mapped_zeros, release_file_pages
from anybit.model.adapters import Adapter, get_submodule

STORED_INPUT_BYTES = 2 << 30  # layer inputs kept for one batch of windows (SmolLM2: 8 windows of 2048 tokens)
# Larger Fisher accumulators go to a memory-mapped file, whose pages the driver hands back after each linear:
# resident, they would grow with the model's depth (0.8 GB per 7B-shaped layer); SmolLM2's 0.42 GB stay.
RESIDENT_ACCUMULATOR_BYTES = 512 << 20


Rotations = Callable[[Adapter, nn.Module, int], dict[str, InputRotation]]  # a layer's input rotations by linear


class LayerObserver(Protocol):
    """Sees each decoder layer while the Fisher pass recomputes it on the windows (the unquantized model)."""

    def before(self, index: int, layer: nn.Module) -> None:
        """Before the layer is recomputed on every window (its weights are in memory)."""

    def after(self, index: int, layer: nn.Module, fisher: dict[str, torch.Tensor]) -> None:
        """After the layer's last window, with its final Fisher diagonals by linear name (still in memory)."""


class _Replay(nn.Module):
    """Stands in for the first decoder layer: returns the given last hidden state; the others pass it on."""

    def __init__(self, hidden: torch.Tensor | None, as_tuple: bool) -> None:
        super().__init__()
        self.hidden, self.as_tuple = hidden, as_tuple

    def forward(self, hidden: torch.Tensor, *args, **kwargs):
        out = hidden if self.hidden is None else self.hidden
        return (out,) if self.as_tuple else out


def _accumulators(shapes: dict[str, tuple[int, int]]) -> dict[str, torch.Tensor]:
    """Zeroed float32 tensors of the given shapes, in memory or (when large) in one mapped temporary file."""
    total = sum(r * c for r, c in shapes.values())
    if total * 4 <= RESIDENT_ACCUMULATOR_BYTES:
        return {key: torch.zeros(shape, dtype=torch.float32) for key, shape in shapes.items()}
    flat = mapped_zeros(total)
    out, offset = {}, 0
    for key, (r, c) in shapes.items():
        out[key] = flat[offset : offset + r * c].view(r, c)
        offset += r * c
    return out


@torch.inference_mode(False)
def _tail_gradient(
    model: nn.Module, layers: nn.ModuleList, window: torch.Tensor, last: torch.Tensor, as_tuple: bool
) -> torch.Tensor:
    """d loss / d (last hidden state) of one window, through the model's own final norm, head and loss."""
    last = last.detach().requires_grad_(True)
    originals = list(layers)
    for i in range(len(layers)):
        layers[i] = _Replay(last if i == 0 else None, as_tuple)
    try:
        with torch.enable_grad():
            loss = model(window[None], labels=window[None], use_cache=False).loss
            (grad,) = torch.autograd.grad(loss, last)
    finally:
        for i, layer in enumerate(originals):
            layers[i] = layer
    return grad


def _clone(obj):
    """`obj` with every tensor nested in it cloned."""
    if isinstance(obj, torch.Tensor):
        return obj.clone()
    if isinstance(obj, (tuple, list)):
        return type(obj)(_clone(o) for o in obj)
    if isinstance(obj, dict):
        return {k: _clone(v) for k, v in obj.items()}
    return obj


def _batches(n: int, per_window_bytes: int) -> list[range]:
    size = max(1, STORED_INPUT_BYTES // max(1, per_window_bytes))
    return [range(i, min(n, i + size)) for i in range(0, n, size)]


def _window_batches(model: nn.Module, adapter: Adapter, windows: torch.Tensor) -> list[range]:
    """The batches of windows whose every layer's input is kept at once (STORED_INPUT_BYTES)."""
    per_window = windows.shape[1] * model.config.hidden_size * 4 * len(adapter.layers(model))
    return _batches(len(windows), per_window)


def fisher_in_one_batch(model: nn.Module, adapter: Adapter, windows: torch.Tensor) -> bool:
    """Whether the Fisher pass over `windows` keeps every layer's input at once (what an observer needs)."""
    return len(_window_batches(model, adapter, windows)) == 1


@torch.inference_mode(False)
def fisher_diagonal(
    model: nn.Module,
    adapter: Adapter,
    windows: torch.Tensor,
    device: str = "cpu",
    progress: bool = True,
    supply: Supply | None = None,
    observer: LayerObserver | None = None,
    rotations: Rotations | None = None,
) -> dict[str, torch.Tensor]:
    """Mean of grad² over windows for every decoder linear, keyed "LAYER.NAME", as (out, in) float32 on CPU.

    With an `observer` (only where `fisher_in_one_batch`), each layer is also shown to it while it is
    recomputed on every window, and once its Fisher diagonals are final. With `rotations` (`--rotate`), the
    diagonals are those of each rotated weight W Rᵀ: each window's gradient G is taken as G Rᵀ before squaring.
    """
    supply = supply or Resident()
    model.requires_grad_(False)  # only the linear being differentiated takes a gradient
    dev = torch.device(device)
    layers = adapter.layers(model)
    names = adapter.linear_names
    shapes = {}
    for i, layer in enumerate(layers):
        for name in names:
            shape = tuple(get_submodule(layer, name).weight.shape)
            shapes[f"{i}.{name}"] = shape[::-1] if adapter.transposed_weights else shape
    fisher = _accumulators(shapes)
    batches = _window_batches(model, adapter, windows)
    if observer is not None and len(batches) > 1:
        raise ValueError("an observer needs every window in one batch (see fisher_in_one_batch)")
    with tqdm(total=len(windows), desc="fisher", unit="window", disable=not progress) as bar:  # closed on errors
        for batch in batches:
            final = _Final(len(windows), observer) if batch is batches[-1] else None
            _batch_fisher(model, adapter, windows[batch.start : batch.stop], dev, supply, fisher, final, rotations)
            bar.update(len(batch))
    return fisher


class _Final:
    """What the last batch does with each layer once its gradients are in: divide its sums by the number of
    windows, then show the layer to the observer."""

    def __init__(self, windows: int, observer: LayerObserver | None) -> None:
        self.windows, self.observer = windows, observer

    def before(self, index: int, layer: nn.Module) -> None:
        if self.observer is not None:
            self.observer.before(index, layer)

    def after(self, index: int, layer: nn.Module, fisher: dict[str, torch.Tensor]) -> None:
        for f in fisher.values():
            f.div_(self.windows)
        release_file_pages(fisher.values())  # the observer reads them back one linear at a time
        if self.observer is not None:
            self.observer.after(index, layer, fisher)


def _batch_fisher(
    model: nn.Module,
    adapter: Adapter,
    windows: torch.Tensor,
    device: torch.device,
    supply: Supply,
    fisher: dict[str, torch.Tensor],
    final: _Final | None = None,
    rotations: Rotations | None = None,
) -> None:
    """Add the squared gradients of each window's loss to `fisher`; in the last batch, `final` sees each layer."""
    layers = adapter.layers(model)
    # clones: tensors made in inference mode cannot take part in autograd
    hidden, args, kwargs = _clone(capture_layer_inputs(model, adapter, windows, device, torch.float32, supply))
    inputs, as_tuple = [], False
    with torch.no_grad():
        for layer in layers:
            supply.enter(layer)
            layer.to(device)
            inputs.append(hidden)
            outputs = []
            for i in range(hidden.shape[0]):
                result = layer(hidden[i : i + 1], *args, **kwargs)
                as_tuple = isinstance(result, tuple)
                outputs.append(layer_output(result))
            hidden = torch.cat(outputs)
            layer.to("cpu")
            supply.leave(layer)
    supply.outside(model, layers)
    move_outside_layers(model, layers, device)
    try:
        grads = torch.cat(
            [_tail_gradient(model, layers, w.to(device), hidden[i : i + 1], as_tuple) for i, w in enumerate(windows)]
        )
    finally:
        move_outside_layers(model, layers, torch.device("cpu"))
        supply.release_outside(model, layers)
    del hidden
    for index in reversed(range(len(layers))):
        grads = _layer_backward(
            layers[index], index, adapter, inputs.pop(), grads, args, kwargs, device, supply, fisher, final, rotations
        )


@torch.inference_mode(False)
def _layer_backward(
    layer: nn.Module,
    index: int,
    adapter: Adapter,
    inputs: torch.Tensor,
    grads: torch.Tensor,
    args: tuple,
    kwargs: dict,
    device: torch.device,
    supply: Supply,
    fisher: dict[str, torch.Tensor],
    final: _Final | None = None,
    rotations: Rotations | None = None,
) -> torch.Tensor:
    """Recompute the layer on each window's input, add grad² of its linear weights to `fisher`; returns the
    gradient at the layer's input. `final` sees the layer before and after (the last batch)."""
    supply.enter(layer)
    layer.to(device)
    weights = {name: get_submodule(layer, name).weight for name in adapter.linear_names}
    rotated = rotations(adapter, layer, index) if rotations is not None else {}
    # each weight's gradient is squared into its accumulator as soon as it is complete and then dropped, so
    # that one weight's gradient at a time is alive, not the whole layer's
    for w in weights.values():
        w.requires_grad_(True)
    hooks = [
        w.register_post_accumulate_grad_hook(
            _square_into(fisher[f"{index}.{name}"], adapter.transposed_weights, rotated.get(name))
        )
        for name, w in weights.items()
    ]
    upstream = torch.empty_like(inputs)
    try:
        if final is not None:
            final.before(index, layer)
        with torch.enable_grad():
            for i in range(inputs.shape[0]):
                x = inputs[i : i + 1].detach().requires_grad_(True)
                out = layer_output(layer(x, *args, **kwargs))
                out.backward(grads[i : i + 1])
                upstream[i] = x.grad[0]
        mine = {name: fisher[f"{index}.{name}"] for name in weights}
        if final is not None:
            final.after(index, layer, mine)
        release_file_pages(mine.values())  # accumulators in a mapped file: written back, out of the resident set
    finally:
        for hook in hooks:
            hook.remove()
        for w in weights.values():
            w.requires_grad_(False)
            w.grad = None
        layer.to("cpu")
        supply.leave(layer)
    return upstream


def _square_into(accumulator: torch.Tensor, transposed: bool, rotation: InputRotation | None = None):
    """A post-accumulate-grad hook adding grad² (of the rotated weight, with a `rotation`) to `accumulator` (on
    its device) and dropping the gradient."""

    def hook(weight: torch.Tensor) -> None:
        g = weight.grad.t() if transposed else weight.grad
        g = g.to(accumulator.device, torch.float32)
        if rotation is not None:
            g = rotation.apply(g)  # the gradient of W Rᵀ is G Rᵀ: each row rotated
        accumulator.addcmul_(g, g)
        weight.grad = None

    return hook
