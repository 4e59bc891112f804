"""The layer-wise driver: quantize a model one decoder layer at a time.

For each decoder layer, in order: run the calibration activations through it (the inputs come from
the already-quantized previous layers), accumulate XᵀX in float32 for each group of linears sharing
an input, quantize every linear with the method, swap in `QuantLinear`s, and run the layer again to
produce the inputs of the next layer. Only the current layer is moved to the compute device.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from anybit.alloc.skim import RowTable, allocate_model
from anybit.config import QuantConfig
from anybit.errors import AnybitError
from anybit.fisher import fisher_diagonal
from anybit.methods import LayerStats, Method, get_method
from anybit.model.adapters import Adapter, get_adapter, get_submodule, set_submodule
from anybit.model.checkpoint import round_unquantized_
from anybit.quant.gptq import HessianAccumulator
from anybit.runtime.qlinear import QuantLinear


@dataclass
class QuantReport:
    seconds: float
    layers: int
    linears: int


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


def _move_outside_layers(model: nn.Module, layers: nn.ModuleList, device: torch.device) -> None:
    """Move every parameter and buffer that is not inside a decoder layer, keeping tied ones tied."""
    inside = {id(m) for layer in layers for m in layer.modules()}
    moved: dict[int, torch.Tensor] = {}

    def move(t: torch.Tensor, make: type) -> torch.Tensor:
        if id(t) not in moved:
            moved[id(t)] = t if t.device == device else make(t.data.to(device))
        return moved[id(t)]

    for module in model.modules():
        if id(module) in inside or module is layers:
            continue
        for key, p in module._parameters.items():
            if p is not None:
                module._parameters[key] = move(p, lambda d: nn.Parameter(d, requires_grad=False))
        for key, b in module._buffers.items():
            if b is not None:
                module._buffers[key] = move(b, lambda d: d)


def _to_device(obj, device: torch.device, dtype: torch.dtype):
    """Move tensors nested in layer arguments; floating ones (rotary tables, masks) also take `dtype`."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device=device, dtype=dtype) if obj.is_floating_point() else obj.to(device)
    if isinstance(obj, tuple):
        return tuple(_to_device(o, device, dtype) for o in obj)
    if isinstance(obj, list):
        return [_to_device(o, device, dtype) for o in obj]
    if isinstance(obj, dict):
        return {k: _to_device(v, device, dtype) for k, v in obj.items()}
    return obj


@torch.inference_mode()
def capture_layer_inputs(
    model: nn.Module, adapter: Adapter, windows: torch.Tensor, device: torch.device, dtype: torch.dtype
) -> tuple[torch.Tensor, tuple, dict]:
    """Inputs of the first decoder layer for every calibration window, and its other arguments."""
    layers = adapter.layers(model)
    _move_outside_layers(model, layers, device)
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
        _move_outside_layers(model, layers, torch.device("cpu"))
    return hidden, catcher.args, catcher.kwargs


def _run_layer(layer: nn.Module, hidden: torch.Tensor, args: tuple, kwargs: dict) -> torch.Tensor:
    out = torch.empty_like(hidden)
    for i in range(hidden.shape[0]):
        result = layer(hidden[i : i + 1], *args, **kwargs)
        out[i] = (result[0] if isinstance(result, tuple) else result)[0]
    return out


def _collect_stats(
    layer: nn.Module, adapter: Adapter, hidden: torch.Tensor, args: tuple, kwargs: dict, method: Method
) -> dict[str, LayerStats]:
    """One forward pass of the layer with hooks that accumulate XᵀX per input-sharing group."""
    stats: dict[str, LayerStats] = {}
    handles = []
    for group in adapter.groups:
        first = get_submodule(layer, group[0])
        in_features = adapter.weight_of(first).shape[1]
        acc = HessianAccumulator(
            in_features,
            device=hidden.device,
            diagonal_only=not method.needs_full_hessian,
            sample_stride=method.input_sample_stride,
        )
        handles.append(first.register_forward_hook(lambda _m, inp, _out, acc=acc: acc.add_batch(inp[0])))
        for name in group:
            stats[name] = LayerStats(hessian=acc)
    try:
        _run_layer(layer, hidden, args, kwargs)
    finally:
        for h in handles:
            h.remove()
    return stats


def _check_group_sizes(model: nn.Module, adapter: Adapter, config: QuantConfig) -> None:
    """Fail before any work when the group size does not divide some linear's input dimension."""
    if not config.group_size or not get_method(config.method).uses_groups:
        return
    for layer_idx, layer in enumerate(adapter.layers(model)):
        for name in adapter.linear_names:
            in_features = adapter.weight_of(get_submodule(layer, name)).shape[1]
            if in_features % config.group_size:
                raise AnybitError(
                    f"group size {config.group_size} does not divide the input dimension {in_features} "
                    f"of layers.{layer_idx}.{name}"
                )


def _weight_and_bias(adapter: Adapter, module: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    bias = getattr(module, "bias", None)
    return adapter.weight_of(module).clone(), None if bias is None else bias.detach().float().clone()


Visit = Callable[[str, nn.Module, str, torch.Tensor, torch.Tensor | None, LayerStats | None], None]


def _layer_pass(
    model: nn.Module,
    adapter: Adapter,
    method: Method,
    config: QuantConfig,
    calib_windows: torch.Tensor | None,
    fisher: dict[str, torch.Tensor],
    visit: Visit,
    desc: str,
    progress: bool,
    commit: bool,
) -> None:
    """Run the calibration data layer by layer and call `visit(key, layer, name, W, bias, stats)` on
    every linear. With `commit` the visits swap in quantized linears, which then produce the next
    layer's inputs; without it every layer is left exactly as it was (a statistics-only pass).
    """
    device = torch.device(config.device)
    dtype = getattr(torch, config.calib_dtype)
    hidden = args = kwargs = None
    if method.needs_stats:
        hidden, args, kwargs = capture_layer_inputs(model, adapter, calib_windows, device, dtype)
        args, kwargs = _to_device(args, device, dtype), _to_device(kwargs, device, dtype)
    for index, layer in enumerate(tqdm(adapter.layers(model), desc=desc, unit="layer", disable=not progress)):
        saved = None if commit else {k: v.clone() for k, v in layer.state_dict().items()}
        layer.to(device)
        originals = {name: _weight_and_bias(adapter, get_submodule(layer, name)) for name in adapter.linear_names}
        layer.to(dtype)  # the forward passes run in the calibration dtype; weights come from `originals`
        stats = {}
        if method.needs_stats:
            stats = _collect_stats(layer, adapter, hidden, args, kwargs, method)
        for name, layer_stats in stats.items():
            layer_stats.fisher = fisher.get(f"{index}.{name}")
        for name, (W, bias) in originals.items():
            visit(f"{index}.{name}", layer, name, W, bias, stats.get(name))
        if method.needs_stats:
            hidden = _run_layer(layer, hidden, args, kwargs)
        layer.to("cpu")
        layer.float()  # QuantLinear keeps its stored dtypes; the rest goes back to float32
        if saved is not None:
            layer.load_state_dict(saved)


@torch.inference_mode()
def quantize_model(
    model: nn.Module, config: QuantConfig, calib_windows: torch.Tensor | None, progress: bool = True
) -> QuantReport:
    """Quantize every decoder-layer linear of `model` in place (they become QuantLinear).

    With a model-wide scope (`--scope model`) a first pass collects every linear's per-row error table (on the
    unquantized model), one budget is spent over all rows of the model, and the second pass quantizes
    each row at its planned width.
    """
    start = time.perf_counter()
    adapter = get_adapter(model)
    method = get_method(config.method)
    _check_group_sizes(model, adapter, config)
    fisher = {}
    if method.needs_stats and calib_windows is None:
        raise AnybitError(f"method {config.method!r} needs calibration data")
    if method.needs_stats and method.needs_fisher(config):
        fisher = fisher_diagonal(model, adapter, calib_windows[: config.fisher_nsamples], config.device, progress)
    plan: dict[str, torch.Tensor] = {}
    if method.scope(config) == "model":
        tables: dict[str, RowTable] = {}

        def collect(key, _layer, _name, W, _bias, stats):
            tables[key] = method.row_table(W, stats, config)

        _layer_pass(model, adapter, method, config, calib_windows, fisher, collect, "error tables", progress, False)
        plan = allocate_model(tables, config.bits)
    linears = 0

    def commit(key, layer, name, W, bias, stats):
        nonlocal linears
        if stats is not None:
            stats.widths = plan.get(key)
        set_submodule(layer, name, QuantLinear(method.quantize(W, stats, config), bias))
        linears += 1

    desc = f"{config.method} {config.bits:g}-bit"
    _layer_pass(model, adapter, method, config, calib_windows, fisher, commit, desc, progress, True)
    round_unquantized_(model)
    return QuantReport(seconds=time.perf_counter() - start, layers=len(adapter.layers(model)), linears=linears)
