"""Block-wise tuning: with every code held fixed, train a quantized decoder layer's continuous parameters (the
codebooks or scales of its linears, their biases and the layer's norms) with Adam so that its outputs match the
unquantized model's activations on the calibration windows (the continuous step of AQLM and PV-tuning).

The driver (`calibrate`) runs a `LayerTuner` beside its layer loop: it carries the unquantized model's own
activations (the reference stream) and, once a layer's linears are quantized, tunes the layer so that on the
quantized stream's inputs it reproduces the reference stream's next activations, correcting the earlier layers'
error as well as its own. The tuned values are stored as before (fp16), so the counted bits do not change. A
layer is kept tuned only when its error on held-out check windows went down.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from anybit.format.vector import CodedTensor
from anybit.layerwise import layer_output, map_tensors, run_layer
from anybit.model.adapters import set_submodule
from anybit.runtime.qlinear import QuantLinear, quant_linears

CHECK_WINDOWS = 4  # windows set aside to decide whether a tuned layer is kept (never trained on)
ADAM_BETAS = (0.9, 0.95)


@dataclass
class TuneStep:
    """One layer's relative output error ‖y − ŷ‖² / ‖y‖² on the check windows, before and after tuning."""

    before: float
    after: float
    kept: bool


class LayerTuner:
    """The reference stream and the tuning of each quantized layer toward it (see the module doc)."""

    def __init__(self, hidden: torch.Tensor, steps: int, lr: float, seed: int = 0) -> None:
        self.reference = hidden.clone()  # the unquantized model's inputs of the current layer
        self.target: torch.Tensor | None = None
        self.steps, self.lr, self.seed = steps, lr, seed
        self.layers_done = 0

    def before_quantizing(self, layer: nn.Module, args: tuple, kwargs: dict) -> None:
        """Run the still unquantized layer on the reference stream: the target of its tuning."""
        self.target = run_layer(layer, self.reference, args, kwargs)

    def after_quantizing(self, layer: nn.Module, hidden: torch.Tensor, args: tuple, kwargs: dict) -> TuneStep:
        """Tune the quantized layer, fed the quantized stream's `hidden`, toward the target; advance the reference."""
        seed = self.seed + self.layers_done
        step = tune_layer(layer, hidden, self.target, args, kwargs, self.steps, self.lr, seed)
        self.reference, self.target = self.target, None
        self.layers_done += 1
        return step


class _TunableLinear(nn.Module):
    """A quantized linear whose decoded weight is differentiable in its codebooks (codebook kind) or scales
    (uniform and vector kinds) and bias; the codes, bit map, permutation, scaling vector and outliers stay as
    stored."""

    def __init__(self, linear: QuantLinear) -> None:
        super().__init__()
        self.qtensor = linear.qtensor
        if self.qtensor.rotation is not None:  # made while quantizing (inference mode): autograd cannot keep those
            rotation = self.qtensor.rotation
            self.qtensor = dataclasses.replace(
                self.qtensor,
                rotation=dataclasses.replace(rotation, signs=rotation.signs.clone(), mix=rotation.mix.clone()),
            )
        if self.qtensor.kind == "codebook":
            self.values = nn.ParameterDict({str(b): _trainable(c) for b, c in self.qtensor.codebooks.items()})
        else:
            self.values = nn.ParameterDict({"scales": _trainable(self.qtensor.scales)})
        self.bias = None if linear.bias is None else _trainable(linear.bias)
        self.codes = self.qtensor.unpacked_codes()  # unpacked once: every step decodes the weight again

    def current(self) -> CodedTensor:
        """The quantized tensor with the trained values in place of the stored ones (kept in float32)."""
        if self.qtensor.kind == "codebook":
            return dataclasses.replace(self.qtensor, codebooks={int(b): p for b, p in self.values.items()})
        return dataclasses.replace(self.qtensor, scales=self.values["scales"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.current().dequantize(torch.float32, self.codes).to(x.dtype), bias)

    def stored(self) -> QuantLinear:
        """The tuned layer as it is stored: its values rounded to fp16."""
        qt = self.current()
        if qt.kind == "codebook":
            qt = dataclasses.replace(qt, codebooks={b: c.detach().half() for b, c in qt.codebooks.items()})
        else:
            qt = dataclasses.replace(qt, scales=qt.scales.detach().half())
        bias = None if self.bias is None else self.bias.detach()
        linear = QuantLinear(qt, bias)
        linear.kernel = "exact"
        return linear


def _trainable(t: torch.Tensor) -> nn.Parameter:
    """A float32 copy of `t` that takes gradients (a normal tensor even when `t` was made in inference mode)."""
    return nn.Parameter(t.detach().float().clone())


def _relative_error(layer: nn.Module, hidden: torch.Tensor, target: torch.Tensor, args, kwargs) -> float:
    with torch.no_grad():
        out = run_layer(layer, hidden, args, kwargs).float()
    target = target.float()
    return float((out - target).square().sum()) / max(float(target.square().sum()), 1e-30)


def tune_layer(
    layer: nn.Module,
    hidden: torch.Tensor,
    target: torch.Tensor,
    args: tuple,
    kwargs: dict,
    steps: int,
    lr: float,
    seed: int = 0,
) -> TuneStep:
    """Tune `layer`'s continuous parameters in place for `steps` Adam steps, one calibration window each, toward
    `target` (the outputs it should give for `hidden`, both (windows, seqlen, d)). The last
    `CHECK_WINDOWS` windows (at most half of them) only judge the result; the layer keeps its tuned values
    when they lower the error there, else it is left exactly as it was."""
    with torch.inference_mode(False), torch.enable_grad():
        # autograd cannot save tensors made in inference mode (the driver's): clone them out of it
        args, kwargs = map_tensors(args, torch.clone), map_tensors(kwargs, torch.clone)
        n_check = min(CHECK_WINDOWS, hidden.shape[0] // 2)
        n_train = hidden.shape[0] - n_check
        check = slice(n_train, None) if n_check else slice(0, None)
        swapped, replaced = _make_tunable(layer)
        before = _relative_error(layer, hidden[check], target[check], args, kwargs)
        params = [p for p in layer.parameters() if p.requires_grad]
        optimizer = torch.optim.Adam(params, lr=lr, betas=ADAM_BETAS)
        order = torch.randperm(n_train, generator=torch.Generator().manual_seed(seed))
        scale = 1.0 / max(float(target[:n_train].float().square().mean()), 1e-30)
        for step in range(steps):
            i = int(order[step % n_train])
            out = layer_output(layer(hidden[i : i + 1].clone(), *args, **kwargs))[0]
            loss = F.mse_loss(out.float(), target[i].float().clone()) * scale
            if not math.isfinite(float(loss.detach())):
                break
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        after = _relative_error(layer, hidden[check], target[check], args, kwargs)
        kept = after < before
        _finish(layer, swapped, replaced, kept)
    return TuneStep(before, after if kept else before, kept)


def tune_model(
    model: nn.Module,
    teacher: nn.Module,
    windows: torch.Tensor,
    steps: int,
    lr: float,
    seed: int = 0,
    progress: bool = False,
) -> TuneStep:
    """End-to-end tuning: train every quantized linear's continuous parameters and every norm of `model`
    (codes, embedding and head fixed) for `steps` Adam steps, one calibration window each, so that its next-token
    distributions match `teacher`'s (KL(teacher ‖ model), mean over tokens). The last `CHECK_WINDOWS`
    windows (at most half) only judge the result, by the same mean KL; the model keeps its tuned values when
    that went down, else it is left exactly as it was."""
    with torch.inference_mode(False), torch.enable_grad():
        n_check = min(CHECK_WINDOWS, windows.shape[0] // 2)
        n_train = windows.shape[0] - n_check
        check = windows[n_train:] if n_check else windows
        frozen = (model.get_input_embeddings(), model.get_output_embeddings())
        swapped, replaced = _make_tunable(model, frozen=tuple(m for m in frozen if m is not None))
        before = _mean_kl(model, teacher, check)
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.Adam(params, lr=lr, betas=ADAM_BETAS)
        order = torch.randperm(n_train, generator=torch.Generator().manual_seed(seed))
        bar = tqdm(range(steps), desc="end-to-end tuning", unit="step", disable=not progress)
        for step in bar:
            window = windows[int(order[step % n_train])][None]
            loss = _kl(model, teacher, window)
            if not math.isfinite(float(loss.detach())):
                break
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            bar.set_postfix(kl=f"{float(loss.detach()):.4f}")
        after = _mean_kl(model, teacher, check)
        kept = after < before
        _finish(model, swapped, replaced, kept)
    return TuneStep(before, after if kept else before, kept)


def _kl(model: nn.Module, teacher: nn.Module, window: torch.Tensor) -> torch.Tensor:
    """KL(teacher ‖ model) of one (1, seqlen) window's next-token distributions, mean over its tokens."""
    with torch.no_grad():
        target = F.log_softmax(teacher(window, use_cache=False).logits[0].float(), dim=-1)
    logits = model(window, use_cache=False).logits[0].float()
    return F.kl_div(F.log_softmax(logits, dim=-1), target, log_target=True, reduction="batchmean")


def _mean_kl(model: nn.Module, teacher: nn.Module, windows: torch.Tensor) -> float:
    with torch.no_grad():
        return sum(float(_kl(model, teacher, w[None])) for w in windows) / windows.shape[0]


Swapped = dict[str, tuple[QuantLinear, _TunableLinear]]
Replaced = dict[tuple[str, str], nn.Parameter]


def _make_tunable(layer: nn.Module, frozen: tuple[nn.Module, ...] = ()) -> tuple[Swapped, Replaced]:
    """Swap every stored QuantLinear of `layer` for a `_TunableLinear` and give every other floating parameter
    (norms) a trainable copy, except those of the `frozen` modules; returns the swapped linears (stored,
    tunable) by name and the replaced parameters by (module name, parameter name)."""
    swapped = {name: (module, _TunableLinear(module)) for name, module in quant_linears(layer)}
    replaced = {}
    for module_name, module in layer.named_modules():
        if isinstance(module, QuantLinear) or any(module is f for f in frozen):
            continue
        for name, p in list(module.named_parameters(recurse=False)):
            if p.is_floating_point():
                replaced[module_name, name] = p
                setattr(module, name, nn.Parameter(p.detach().clone()))
    for name, (_, tunable) in swapped.items():
        set_submodule(layer, name, tunable)
    return swapped, replaced


def _finish(layer: nn.Module, swapped: Swapped, replaced: Replaced, kept: bool) -> None:
    """Store the tuned values (fp16 codebooks or scales, frozen parameters), or put everything back as it was."""
    for name, (stored, tunable) in swapped.items():
        set_submodule(layer, name, tunable.stored() if kept else stored)
    for (module_name, name), original in replaced.items():
        module = layer.get_submodule(module_name)
        tuned = getattr(module, name)
        setattr(module, name, nn.Parameter(tuned.detach(), requires_grad=False) if kept else original)
