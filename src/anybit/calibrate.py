"""The layer-wise driver: quantize a model one decoder layer at a time.

For each decoder layer, in order: run the calibration activations through it (the inputs come from
the already-quantized previous layers), accumulate XᵀX in float32 for each group of linears sharing
an input (the forward stops once every group has its input), quantize every linear with the method, swap
in `QuantLinear`s (with `--tune-steps`, tune the layer: `anybit.tune`), and run the layer again to produce
the inputs of the next layer. With `--layer-inputs original` the layers are calibrated on the original
model's activations instead: the statistics pass runs the whole unquantized layer, and its output is the
next layer's input (one forward pass per layer instead of two). Only the current layer is moved to the
compute device. With a `Streamed` supply, the model is a weightless skeleton: each layer is read from the
source files when its turn comes, handed to `on_layer` (the writer) once quantized, and freed.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch
from torch import nn
from tqdm.auto import tqdm

from anybit.alloc.skim import RowPlan, RowTable, allocate_model
from anybit.config import QuantConfig
from anybit.errors import AnybitError
from anybit.fisher import fisher_diagonal, fisher_in_one_batch
from anybit.format.rotation import InputRotation
from anybit.layerwise import Resident, Supply, capture_layer_inputs, layer_rotations, run_layer
from anybit.memory import SpillFile, map_large_blocks, release_file_pages, return_freed_memory
from anybit.methods import LayerStats, Method, get_method
from anybit.model.adapters import Adapter, get_adapter, get_submodule, set_submodule
from anybit.model.checkpoint import round_unquantized_
from anybit.quant.gptq import HessianAccumulator
from anybit.runtime.qlinear import QuantLinear, dense_weights, set_kernel
from anybit.tune import LayerTuner, TuneStep


@dataclass
class QuantReport:
    seconds: float
    layers: int
    linears: int
    tuning: list[TuneStep] = field(default_factory=list)  # per layer, with --tune-steps

    def info(self) -> dict:
        """What the output's anybit.json records of the run."""
        info = {"quantize_seconds": self.seconds}
        if self.tuning:
            info["tuning"] = [
                {"before": round(t.before, 8), "after": round(t.after, 8), "kept": t.kept} for t in self.tuning
            ]
        return info


class _StatsComplete(Exception):
    """Raised once every input-sharing group has seen a window: the rest of the layer's forward is not needed."""


class _GroupInputs:
    """Forward pre-hooks on the first linear of each input-sharing group of a layer, accumulating XᵀX (float32)
    from every call. With `stop_when_complete`, a call raises `_StatsComplete` as soon as every group has
    seen its input (see `_collect_stats_only`)."""

    def __init__(
        self,
        layer: nn.Module,
        adapter: Adapter,
        method: Method,
        config: QuantConfig,
        device: torch.device,
        stop_when_complete: bool,
    ) -> None:
        self.stats: dict[str, LayerStats] = {}  # per linear; the linears of a group share one accumulator
        self.stop_when_complete = stop_when_complete
        self.groups = len(adapter.groups)
        self.seen: set[int] = set()
        self._handles = []
        for index, group in enumerate(adapter.groups):
            first = get_submodule(layer, group[0])
            acc = HessianAccumulator(
                adapter.weight_of(first).shape[1],
                device=device,
                diagonal_only=not (method.needs_full_hessian or config.rotate),  # a rotation needs all of XᵀX
                sample_stride=method.input_sample_stride,
            )
            self._handles.append(first.register_forward_pre_hook(self._hook(acc, index)))
            for name in group:
                self.stats[name] = LayerStats(hessian=acc)

    def _hook(self, acc: HessianAccumulator, group: int):
        def accumulate(_module: nn.Module, inputs: tuple) -> None:
            acc.add_batch(inputs[0].detach())
            self.seen.add(group)
            if self.stop_when_complete and len(self.seen) == self.groups:
                raise _StatsComplete

        return accumulate

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


def _collect_stats(
    layer: nn.Module, adapter: Adapter, hidden: torch.Tensor, args: tuple, kwargs: dict, method: Method,
    config: QuantConfig,
) -> tuple[dict[str, LayerStats], torch.Tensor]:  # fmt: skip
    """One forward pass of the layer that accumulates XᵀX per input-sharing group; returns the statistics
    and the (unquantized) layer's output."""
    hooks = _GroupInputs(layer, adapter, method, config, hidden.device, stop_when_complete=False)
    try:
        output = run_layer(layer, hidden, args, kwargs)
    finally:
        hooks.remove()
    return hooks.stats, output


def _collect_stats_only(
    layer: nn.Module, adapter: Adapter, hidden: torch.Tensor, args: tuple, kwargs: dict, method: Method,
    config: QuantConfig,
) -> dict[str, LayerStats]:  # fmt: skip
    """The statistics of `_collect_stats` without the layer's output: each window's forward stops once every
    group has seen its input (the down-projection's product and what follows are never computed)."""
    hooks = _GroupInputs(layer, adapter, method, config, hidden.device, stop_when_complete=True)
    try:
        for i in range(hidden.shape[0]):
            hooks.seen.clear()
            with contextlib.suppress(_StatsComplete):
                layer(hidden[i : i + 1], *args, **kwargs)
    finally:
        hooks.remove()
    return hooks.stats


class _TableCollector:
    """Fisher-pass observer (`anybit.fisher.LayerObserver`) that measures every linear's error table on the
    windows the pass recomputes each layer on, with the layer's final Fisher diagonals: the statistics-only
    table pass, without running the layers again."""

    def __init__(self, adapter: Adapter, method: Method, config: QuantConfig, spill: SpillFile) -> None:
        self.adapter, self.method, self.config, self.spill = adapter, method, config, spill
        self.tables: dict[str, RowTable] = {}
        self._inputs: _GroupInputs | None = None

    def before(self, index: int, layer: nn.Module) -> None:
        device = torch.device(self.config.device)
        self._inputs = _GroupInputs(layer, self.adapter, self.method, self.config, device, stop_when_complete=False)

    @torch.no_grad()
    def after(self, index: int, layer: nn.Module, fisher: dict[str, torch.Tensor]) -> None:
        inputs, self._inputs = self._inputs, None
        inputs.remove()
        rotated = _rotations(self.adapter, layer, index, self.config)
        _rotate_statistics(inputs.stats, rotated)
        for name in self.adapter.linear_names:
            stats = inputs.stats.pop(name)  # a group's XᵀX is freed after its last linear
            stats.fisher = fisher[name]
            W = _rotated_weight(self.adapter.weight_of(get_submodule(layer, name)), rotated.get(name))  # no copy
            self.tables[f"{index}.{name}"] = self.method.row_table(W, stats, self.config).spilled(self.spill)
            release_file_pages([stats.fisher])  # mapped accumulators: one linear's resident at a time


def _linear_shapes(model: nn.Module, adapter: Adapter) -> list[tuple[str, tuple[int, int]]]:
    """(name, (out, in)) of every decoder-layer linear, in order; read from the skeleton, no weights needed."""
    return [
        (f"layers.{index}.{name}", tuple(adapter.weight_of(get_submodule(layer, name)).shape))
        for index, layer in enumerate(adapter.layers(model))
        for name in adapter.linear_names
    ]


def _check_group_sizes(model: nn.Module, adapter: Adapter, config: QuantConfig) -> None:
    """Fail before any work when the group size asked for does not divide some linear's input dimension, or
    the recipe cannot code some linear's shape."""
    method = get_method(config.method)
    for name, shape in _linear_shapes(model, adapter):
        problem = method.shape_problem(shape)
        if problem:
            raise AnybitError(f"method {config.method!r} cannot quantize {name}: {problem}")
    if not config.group_size or not method.takes("group_size"):
        return
    for name, (_, in_features) in _linear_shapes(model, adapter):
        if in_features % config.group_size:
            raise AnybitError(
                f"group size {config.group_size} does not divide the input dimension {in_features} of {name}"
            )


def _check_model_budget(model: nn.Module, adapter: Adapter, method: Method, config: QuantConfig) -> None:
    """Fail before any work when a model-wide budget is below what the narrowest widths already cost."""
    if method.scope(config) != "model":
        return
    shapes = [shape for _, shape in _linear_shapes(model, adapter)]
    weights = sum(rows * cols for rows, cols in shapes)
    minimum = sum(method.cheapest_bits(shape, config) for shape in shapes) / weights
    if config.bits < minimum:
        raise AnybitError(f"{config.bits:g} bits per weight is below the model's minimum of {minimum:.3f}")


def _weight_and_bias(adapter: Adapter, module: nn.Module, copy: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The float32 (out, in) weight and bias of a linear; copies unless the layer is read afresh for each pass."""
    bias = getattr(module, "bias", None)
    W, b = adapter.weight_of(module), None if bias is None else bias.detach().float()
    return (W.clone(), None if b is None else b.clone()) if copy else (W, b)


Visit = Callable[
    [str, nn.Module, str, torch.Tensor, torch.Tensor | None, LayerStats | None, InputRotation | None], None
]


def _rotations(adapter: Adapter, layer: nn.Module, index: int, config: QuantConfig) -> dict[str, InputRotation]:
    """Each linear's input rotation in decoder layer `index` (none without `--rotate`)."""
    return layer_rotations(adapter, layer, index, config.seed) if config.rotate else {}


def _rotate_statistics(stats: dict[str, LayerStats], rotated: dict[str, InputRotation]) -> None:
    """Each rotated group's XᵀX made that of its rotated inputs (once per group: its linears share it)."""
    done: set[int] = set()
    for name, layer_stats in stats.items():
        rotation, acc = rotated.get(name), layer_stats.hessian
        if rotation is not None and id(acc) not in done:
            acc.rotate_(rotation)
            done.add(id(acc))


def _rotated_weight(W: torch.Tensor, rotation: InputRotation | None) -> torch.Tensor:
    """W Rᵀ, the weight the recipe quantizes, or W itself without a rotation."""
    return W if rotation is None else rotation.apply(W)


LayerDone = Callable[[int, nn.Module], None]


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
    supply: Supply,
    on_layer: LayerDone | None = None,
    tuning: list[TuneStep] | None = None,
) -> None:
    """Run the calibration data layer by layer and call `visit(key, layer, name, W, bias, stats, rotation)` on
    every linear (with `--rotate`, W is the rotated weight and the statistics those of the rotated inputs).
    With `commit` the visits swap in quantized linears, which then produce the next layer's inputs, and each finished layer goes to `on_layer`; without it every layer is left exactly
    as it was (a statistics-only pass). With `tuning` (a list, committing, `config.tune_steps` > 0) each
    quantized layer is tuned toward the unquantized model's activations (`anybit.tune`), its result appended.
    """
    device = torch.device(config.device)
    dtype = getattr(torch, config.calib_dtype)
    hidden = args = kwargs = None
    if method.needs_stats:
        hidden, args, kwargs = capture_layer_inputs(model, adapter, calib_windows, device, dtype, supply)
    tuner = None
    if tuning is not None and commit and config.tune_steps and method.needs_stats:
        tuner = LayerTuner(hidden, config.tune_steps, config.tune_lr, config.seed)
    layers = adapter.layers(model)
    with tqdm(total=len(layers), desc=desc, unit="layer", disable=not progress) as bar:  # closed on errors too
        for index in range(len(layers)):
            layer = layers[index]  # not a list of all layers: a finished one must be freed when it is replaced
            supply.enter(layer)
            saved = None if commit or supply.streamed else {k: v.clone() for k, v in layer.state_dict().items()}
            layer.to(device)
            originals = {
                name: _weight_and_bias(adapter, get_submodule(layer, name), copy=not supply.streamed)
                for name in adapter.linear_names
            }
            layer.to(dtype)  # the forward passes run in the calibration dtype; weights come from `originals`
            stats, next_hidden = {}, None
            if tuner is not None:
                tuner.before_quantizing(layer, args, kwargs)
            if method.needs_stats and commit and config.layer_inputs == "quantized":
                stats = _collect_stats_only(layer, adapter, hidden, args, kwargs, method, config)  # next: quantized
            elif method.needs_stats:  # the unquantized layer's output is the next layer's input
                stats, next_hidden = _collect_stats(layer, adapter, hidden, args, kwargs, method, config)
            for name, layer_stats in stats.items():
                layer_stats.fisher = fisher.get(f"{index}.{name}")
            rotated = _rotations(adapter, layer, index, config)
            _rotate_statistics(stats, rotated)
            for name in adapter.linear_names:
                W, bias = originals.pop(name)
                W = _rotated_weight(W, rotated.get(name))
                # once swapped for its quantized form, a linear's float weight and (after the last linear of
                # its group) its XᵀX are freed before the next linear is quantized
                layer_stats = stats.pop(name, None) if commit else stats.get(name)
                visit(f"{index}.{name}", layer, name, W, bias, layer_stats, rotated.get(name))
                del W, bias
                return_freed_memory()  # the quantizer's temporaries under glibc's mmap threshold
            del originals, stats
            if tuner is not None:
                tuning.append(tuner.after_quantizing(layer, hidden, args, kwargs))
            if method.needs_stats and next_hidden is None:
                with dense_weights(layer):  # each matrix decoded once for all windows, not once per product
                    next_hidden = run_layer(layer, hidden, args, kwargs)
            hidden = next_hidden
            layer.to("cpu")
            layer.float()  # QuantLinear keeps its stored dtypes; the rest goes back to float32
            if saved is not None:
                layer.load_state_dict(saved)
            if not commit:
                supply.leave(layer)
            elif on_layer is not None:
                on_layer(index, layer)
            if commit and supply.streamed:
                layers[index] = nn.Module()  # written: nothing of it stays in memory
                del layer
                return_freed_memory()
            bar.update()


@torch.inference_mode()
def quantize_model(
    model: nn.Module,
    config: QuantConfig,
    calib_windows: torch.Tensor | None,
    progress: bool = True,
    supply: Supply | None = None,
    on_layer: LayerDone | None = None,
) -> QuantReport:
    """Quantize every decoder-layer linear of `model` in place (they become QuantLinear), each finished
    decoder layer handed to `on_layer(index, layer)`.

    With a model-wide scope (`--scope model`) a first pass collects every linear's per-row error table (on the
    unquantized model; with Fisher weighting, on the Fisher windows only), one budget is spent over all rows of
    the model, and the second pass quantizes each row at its planned width and codebook. With
    `config.tune_steps`, each quantized layer is then tuned toward the unquantized model's activations
    (`anybit.tune`). With a `Streamed` supply `model` is a weightless skeleton and the finished layers are freed
    after `on_layer`.
    """
    start = time.perf_counter()
    map_large_blocks()  # freed temporaries of large layers go back to the system, not into a scattered heap
    supply = supply or Resident()
    adapter = get_adapter(model)
    method = get_method(config.method)
    _check_group_sizes(model, adapter, config)
    _check_model_budget(model, adapter, method, config)
    if method.needs_stats and calib_windows is None:
        raise AnybitError(f"method {config.method!r} needs calibration data")
    with SpillFile() as spill:  # what the model-wide plan keeps of every matrix, out of memory
        fisher, plan = _first_pass(model, adapter, method, config, calib_windows, spill, supply, progress)
        linears = 0
        tuning: list[TuneStep] = []

        def commit(key, layer, name, W, bias, stats, rotation):
            nonlocal linears
            if stats is not None:
                stats.plan = plan.get(key)
            qtensor = method.quantize(W, stats, config)
            if rotation is not None:
                qtensor = replace(qtensor, rotation=rotation)
            quantized = QuantLinear(qtensor, bias)
            if stats is not None and stats.fisher is not None:
                release_file_pages([stats.fisher])  # Fisher accumulators of a deep model live in a mapped file
            quantized.kernel = "exact"  # the next layers calibrate on the stored values, whatever the CPU rounds
            set_submodule(layer, name, quantized)
            linears += 1

        desc = f"{config.method} {config.bits:g}-bit"
        _layer_pass(
            model, adapter, method, config, calib_windows, fisher, commit, desc, commit=True, on_layer=on_layer,
            tuning=tuning, supply=supply, progress=progress,
        )  # fmt: skip
    set_kernel(model, "auto")  # calibrated on the exact products; from here on, like a loaded model
    if not supply.streamed:
        round_unquantized_(model)
    seconds = time.perf_counter() - start
    return QuantReport(seconds=seconds, layers=len(adapter.layers(model)), linears=linears, tuning=tuning)


def _first_pass(
    model: nn.Module,
    adapter: Adapter,
    method: Method,
    config: QuantConfig,
    calib_windows: torch.Tensor | None,
    spill: SpillFile,
    supply: Supply,
    progress: bool,
) -> tuple[dict[str, torch.Tensor], dict[str, RowPlan]]:
    """What the quantizing pass needs before it starts: the Fisher diagonals (where the recipe weighs by them)
    and, with a model-wide scope, each matrix's planned widths and codebooks (its error table's codebooks kept
    in `spill`)."""
    fisher: dict[str, torch.Tensor] = {}
    table_windows = calib_windows
    model_scope = method.scope(config) == "model"
    collector = None
    if method.needs_stats and method.needs_fisher(config):
        # the error tables are measured on the windows the Fisher pass saw: the row importances they are
        # scaled by then come from the same text, and the statistics cost only those windows; where the
        # Fisher pass keeps every layer's input at once, its recomputation of each layer collects them
        table_windows = calib_windows[: config.fisher_nsamples]
        if model_scope and fisher_in_one_batch(model, adapter, table_windows):
            collector = _TableCollector(adapter, method, config, spill)
        rotations = (lambda a, layer, index: _rotations(a, layer, index, config)) if config.rotate else None
        fisher = fisher_diagonal(model, adapter, table_windows, config.device, progress, supply, collector, rotations)
    if not model_scope:
        return fisher, {}
    tables: dict[str, RowTable] = {}
    if collector is not None:  # in the model's order, as the table pass gives them (the allocation breaks ties
        tables = {key: collector.tables.pop(key) for key in fisher}  # by position); the Fisher keys are in it
    else:

        def collect(key, _layer, _name, W, _bias, stats, _rotation):
            tables[key] = method.row_table(W, stats, config).spilled(spill)

        _layer_pass(
            model, adapter, method, config, table_windows, fisher, collect, "error tables", commit=False,
            supply=supply, progress=progress,
        )  # fmt: skip
    return fisher, allocate_model(tables, config.bits, spill)
