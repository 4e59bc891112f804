"""Checkpoints of quantized models: write a model with QuantLinear layers to a directory atomically, read it
back with every stored tensor checked, and the residuals of dynamic error compensation beside it. The
directory's layout and anybit.json are `anybit.format.directory`'s.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from anybit.errors import AnybitError
from anybit.format.directory import (
    FORMAT_NAME,
    FORMAT_VERSION,
    QUANT_FILE,
    RESIDUAL_FILE,
    check_output,
    read_quant_info,
    transformers_quantization_config,
)
from anybit.format.files import make_temp_dir, make_temp_file, remove_stale_temporaries, replace_dir
from anybit.format.qtensor import all_finite
from anybit.format.shards import ShardWriter, iter_tensors, weight_files
from anybit.format.vector import CodedTensor, coded_tensor_from_stored
from anybit.memory import release_file_pages, return_freed_memory
from anybit.model.adapters import get_adapter, set_submodule
from anybit.runtime.dec import DecPlan, Residual
from anybit.runtime.head import quantize_head
from anybit.runtime.qlinear import QuantLinear, quant_linears

STORE_DTYPE = torch.float16  # dtype of the parameters that are not quantized


def round_unquantized_(model: nn.Module) -> None:
    """Round every floating parameter outside QuantLinears to the stored dtype, in place.

    Called once quantization is done, so the in-memory model computes exactly what a reload will.
    """
    for module in model.modules():
        if isinstance(module, QuantLinear):
            continue
        for p in module.parameters(recurse=False):
            if p.is_floating_point():
                p.data = p.data.to(STORE_DTYPE).to(p.dtype)


def layer_record(qt: CodedTensor) -> dict:
    """What anybit.json says of one quantized linear: its layout metadata and counted bits."""
    return {**qt.meta(), "storage_bits": qt.storage_bits(), "nominal_bits": qt.nominal_bits()}


def summarize(records: dict[str, dict]) -> dict:
    """Counted bits of the quantized linears described by `records` (name -> `layer_record`)."""
    total_bits = sum(r["storage_bits"] for r in records.values())
    numels = {name: math.prod(r["shape"]) for name, r in records.items()}
    total_weights = sum(numels.values())
    nominal = sum(r["nominal_bits"] * numels[name] for name, r in records.items())
    return {
        "layers": records,
        "quantized_weights": total_weights,
        "storage_bits": total_bits,
        "bits_per_weight": total_bits / total_weights if total_weights else None,
        "nominal_bits_per_weight": nominal / total_weights if total_weights else None,
    }


def quantization_summary(model: nn.Module) -> dict:
    """Counted bits of all quantized linears, and per-linear layout metadata."""
    return summarize({name: layer_record(module.qtensor) for name, module in quant_linears(model)})


def packed_fingerprint(model: nn.Module) -> str:
    """sha256 of every quantized linear's name and packed tensors: identifies one quantization of a model."""
    digest = hashlib.sha256()
    for name, module in quant_linears(model):
        for key, tensor in sorted(module.named_buffers()):
            digest.update(f"{name}.{key}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
            digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def tied_aliases(model: nn.Module) -> dict[str, str]:
    """Parameter name -> the name it is stored under, for every parameter tied to an earlier one."""
    first: dict[int, str] = {}
    aliases = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in first:
            aliases[name] = first[id(p)]
        else:
            first[id(p)] = name
    return aliases


def own_state(module: nn.Module, prefix: str = "") -> dict[str, torch.Tensor]:
    """A module's own parameters and persistent buffers (not its children's), named under `prefix`."""
    state = {f"{prefix}{k}": p.detach() for k, p in module._parameters.items() if p is not None}
    persistent = {
        f"{prefix}{k}": b
        for k, b in module._buffers.items()
        if b is not None and k not in module._non_persistent_buffers_set
    }
    return state | persistent


class CheckpointWriter:
    """Writes a quantized model into a temporary directory beside `out_dir`, part by part as the parts are
    finished (one decoder layer at a time when streaming); `finish` puts the directory in place atomically.
    Nothing is left behind when writing fails."""

    def __init__(self, out_dir: Path, aliases: dict[str, str]) -> None:
        self.out_dir = out_dir
        self.aliases = aliases
        self.records: dict[str, dict] = {}
        self.tmp = make_temp_dir(out_dir)
        self.shards = ShardWriter(self.tmp, {"format": FORMAT_NAME})

    def __enter__(self) -> CheckpointWriter:
        return self

    def __exit__(self, kind, exc, tb) -> None:
        if kind is None:
            return
        self.shards.close()
        shutil.rmtree(self.tmp, ignore_errors=True)
        if isinstance(exc, (OSError, SafetensorError)):  # a full disk, a quota, a vanished parent
            raise AnybitError(f"cannot write {self.out_dir}: {getattr(exc, 'strerror', None) or exc}") from None

    def add(self, module: nn.Module, prefix: str = "", recurse: bool = True) -> None:
        """Store every tensor of `module` (without `recurse`: its own parameters and persistent buffers only)
        under `prefix`: quantized linears as their packed buffers, other floating tensors in the stored
        dtype, tied parameters once."""
        quantized = {f"{prefix}{name}": m for name, m in quant_linears(module)} if recurse else {}
        for name, m in quantized.items():
            self.records[name] = layer_record(m.qtensor)
        packed_prefixes = tuple(f"{name}." for name in quantized)
        for name, tensor in (module.state_dict(prefix=prefix) if recurse else own_state(module, prefix)).items():
            if name in self.aliases:
                continue
            packed = name.startswith(packed_prefixes) and not name.endswith(".bias")
            if tensor.is_floating_point() and not packed:
                tensor = tensor.to(STORE_DTYPE)
            self.shards.add(name, tensor)

    def finish(self, config, tokenizer, info: dict) -> dict:
        """Write the weights' index, config, tokenizer and anybit.json, and put the directory at `out_dir`."""
        meta = {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            **info,
            "aliases": self.aliases,
            **summarize(self.records),
        }
        self.shards.finish()
        config = copy.deepcopy(config)
        config.quantization_config = transformers_quantization_config(meta)
        config.to_json_file(self.tmp / "config.json")
        if tokenizer is not None:
            tokenizer.save_pretrained(self.tmp)
        meta["files"] = sorted({*(p.name for p in self.tmp.iterdir()), QUANT_FILE})
        (self.tmp / QUANT_FILE).write_text(json.dumps(meta, indent=1))
        replace_dir(self.tmp, self.out_dir)
        return meta


def save_quantized(model: nn.Module, tokenizer, out_dir: str | Path, info: dict, force: bool = False) -> dict:
    """Write the quantized model to `out_dir` atomically; returns the written anybit.json content."""
    out_dir = check_output(out_dir, force)
    with CheckpointWriter(out_dir, tied_aliases(model)) as writer:
        writer.add(model)
        return writer.finish(model.config, tokenizer, info)


def load_quantized(
    path: str | Path, dtype: torch.dtype = torch.float32, head: str = "dense"
) -> tuple[nn.Module, object, dict]:
    """The model (with QuantLinear layers) and tokenizer stored in `path`, and its anybit.json.

    Everything stored is checked before any kernel sees it (`fill_quantized`). With `head="int8"` the
    embedding and output head are packed to 8 bits (`runtime.head`) straight from their stored values, never
    held in `dtype`.
    """
    from transformers import AutoConfig, AutoTokenizer

    from anybit.model.sources import first_line, weightless_model

    path = Path(path)
    info, tensors = read_checkpoint(path)
    try:
        config = AutoConfig.from_pretrained(path)
        tokenizer = AutoTokenizer.from_pretrained(path)
    except Exception as exc:  # transformers' own checks raise many kinds (ValueError, ZeroDivisionError, ...)
        raise AnybitError(f"cannot read the model config or tokenizer in {path}: {first_line(exc)}") from None
    get_adapter(config.model_type)
    model = weightless_model(config, dtype, f"cannot build the model of {path}")
    fill_quantized(model, path, info, tensors, dtype, head)
    return model, tokenizer, info


def read_checkpoint(path: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """A quantized directory's anybit.json and its stored tensors, memory-mapped (never a dense copy)."""
    return read_quant_info(path), dict(iter_tensors(path, weight_files(path)))


def fill_quantized(
    model: nn.Module, path: Path, info: dict, tensors: dict[str, torch.Tensor], dtype: torch.dtype, head: str
) -> None:
    """Fill a model skeleton (parameters on the meta device) from a quantized directory's stored tensors:
    QuantLinears where anybit.json names a layer, every other tensor into its parameter, each checked against
    its layout or its parameter, and the counted bits against anybit.json's claims; anything that does not
    fit is an AnybitError naming the tensor. With `head="int8"` the embedding and head are packed to 8 bits."""
    packed_later = _head_names(model) if head == "int8" else set()
    try:
        _install_quantized(model, info, tensors, dtype)
        _install_unquantized(model, info, tensors, dtype, keep_stored=packed_later)
        check_counted_bits(model, info)
    except (KeyError, ValueError) as exc:
        raise AnybitError(f"corrupt quantized checkpoint {path}: {exc}") from exc
    if getattr(model.config, "tie_word_embeddings", False):
        model.tie_weights()
    leftover = [n for n, p in model.named_parameters() if p.is_meta]
    if leftover:
        raise AnybitError(f"corrupt quantized checkpoint {path}: no values for {', '.join(leftover[:3])}")
    if packed_later:
        stored = [model.get_submodule(name.rpartition(".")[0]).weight for name in packed_later]
        quantize_head(model, "int8", dtype=dtype)
        release_file_pages(stored)
        return_freed_memory()
    model.eval()
    model.requires_grad_(False)


def _install_quantized(model: nn.Module, info: dict, tensors: dict[str, torch.Tensor], dtype: torch.dtype) -> None:
    """Replace each linear named in anybit.json by a QuantLinear built from its (checked) stored tensors;
    the tensors used are removed from `tensors`."""
    for name, layer_meta in info["layers"].items():
        check_layer_fits(model, name, layer_meta)
        prefix = f"{name}."
        own = {
            k[len(prefix) :]: tensors.pop(k)
            for k in list(tensors)
            if k.startswith(prefix) and "." not in k[len(prefix) :]
        }
        set_submodule(model, name, quant_linear_from_stored(name, layer_meta, own, dtype))


def check_layer_fits(model: nn.Module, name: str, layer_meta: dict) -> None:
    """A ValueError unless the architecture has a linear `name` of the shape anybit.json gives it."""
    try:
        target = model.get_submodule(name)
    except AttributeError:
        raise ValueError(f"{name}: the architecture has no such layer") from None
    if getattr(target, "weight", None) is None or tuple(layer_meta["shape"]) != tuple(
        get_adapter(model).weight_of(target).shape
    ):
        raise ValueError(f"{name}: quantized shape {layer_meta['shape']} does not fit the architecture")


def quant_linear_from_stored(
    name: str, layer_meta: dict, own: dict[str, torch.Tensor], dtype: torch.dtype
) -> QuantLinear:
    """The QuantLinear of linear `name` from its stored tensors (`own`: packed buffers and an optional bias,
    by their short names), each checked against the layout in `layer_meta`; a ValueError names what does not fit."""
    own = dict(own)
    bias = own.pop("bias", None)
    try:
        qt = coded_tensor_from_stored(layer_meta, own)
    except ValueError as exc:
        raise ValueError(f"{name}.{exc}") from None
    if bias is not None:
        bias = _checked_float(f"{name}.bias", bias, (qt.shape[0],), dtype)
    return QuantLinear(qt, bias)


def _checked_float(name: str, tensor: torch.Tensor, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A stored unquantized floating tensor, checked for dtype, shape and finite values, cast to `dtype`."""
    if tensor.dtype != STORE_DTYPE:
        raise ValueError(f"{name}: stored as {str(tensor.dtype).removeprefix('torch.')}, expected float16")
    if tuple(tensor.shape) != tuple(shape):
        raise ValueError(f"{name}: shape {tuple(tensor.shape)}, expected {tuple(shape)}")
    if not all_finite(tensor):
        raise ValueError(f"{name}: holds NaN or infinite values")
    return tensor.to(dtype)


def _head_names(model: nn.Module) -> set[str]:
    """Parameter names of the weights `runtime.head.quantize_head` packs: the embedding's and an untied
    linear head's (none where the embedding is not a plain lookup table)."""
    embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
    if not isinstance(embedding, nn.Embedding):
        return set()
    wanted = {id(embedding)} | ({id(head)} if isinstance(head, nn.Linear) else set())
    return {f"{name}.weight" for name, module in model.named_modules() if id(module) in wanted}


def _install_unquantized(
    model: nn.Module,
    info: dict,
    tensors: dict[str, torch.Tensor],
    dtype: torch.dtype,
    keep_stored: set[str] = frozenset(),
) -> None:
    """Load every remaining stored tensor into the parameter (or buffer) of its name, each checked against it,
    in `dtype` (those named in `keep_stored`: as stored, for a caller that packs them next). Stored values
    that were copied are handed back (`memory.release_file_pages`)."""
    expected = model.state_dict(keep_vars=True)
    unexpected = sorted(set(tensors) - set(expected))
    if unexpected:
        raise ValueError(f"unexpected stored tensors {', '.join(unexpected[:3])}")
    state, copied = {}, []
    for name, tensor in tensors.items():
        like = expected[name]
        if like.is_floating_point():
            state[name] = _checked_float(
                name, tensor, tuple(like.shape), tensor.dtype if name in keep_stored else dtype
            )
            if state[name].data_ptr() != tensor.data_ptr():
                copied.append(tensor)
        elif tensor.dtype != like.dtype or tensor.shape != like.shape:
            raise ValueError(
                f"{name}: stored as {tensor.dtype} {tuple(tensor.shape)}, expected {like.dtype} {tuple(like.shape)}"
            )
        else:
            state[name] = tensor
    for alias, target in info["aliases"].items():
        if alias not in expected or target not in state or expected[alias].shape != state[target].shape:
            raise ValueError(f"alias {alias} -> {target} does not fit the architecture")
        state[alias] = state[target]
    model.load_state_dict(state, strict=False, assign=True)
    release_file_pages(copied)


def check_counted_bits(model: nn.Module, info: dict) -> None:
    """The counted bits anybit.json claims must be those of the stored tensors; the info then carries the
    measured figures."""
    measured = quantization_summary(model)
    for name, layer in measured["layers"].items():
        if layer["storage_bits"] != info["layers"][name]["storage_bits"]:
            raise ValueError(
                f"{name}: anybit.json counts {info['layers'][name]['storage_bits']} bits, "
                f"the stored tensors hold {layer['storage_bits']}"
            )
    claimed = info["bits_per_weight"]
    if measured["storage_bits"] != info["storage_bits"] or abs(measured["bits_per_weight"] - claimed) > 1e-9:
        raise ValueError(
            f"anybit.json claims {claimed} bits per weight, the stored tensors hold {measured['bits_per_weight']:.6f}"
        )
    info.update({k: measured[k] for k in ("layers", "quantized_weights", "storage_bits", "bits_per_weight")})
    info["nominal_bits_per_weight"] = measured["nominal_bits_per_weight"]


def save_residuals(
    quant_dir: str | Path, residuals: dict[str, Residual], activation_means: dict[str, torch.Tensor], info: dict
) -> dict:
    """Write the 4-bit residuals (and calibration mean |x| per channel) next to a quantized model, atomically."""
    quant_dir = Path(quant_dir)
    tensors: dict[str, torch.Tensor] = {}
    bits = weights = 0
    for name, residual in residuals.items():
        tensors[f"{name}.residual_codes"] = residual.codes.contiguous()
        tensors[f"{name}.residual_scales"] = residual.scales.contiguous()
        tensors[f"{name}.act_mean_abs"] = activation_means[name].float().contiguous()
        bits += residual.storage_bits()
        weights += residual.in_features * residual.out_features
    meta = {**info, "storage_bits": bits, "bits_per_weight": bits / weights}
    remove_stale_temporaries(quant_dir / RESIDUAL_FILE)
    tmp = make_temp_file(quant_dir / RESIDUAL_FILE)
    try:
        save_file(tensors, tmp, metadata={"format": FORMAT_NAME, "residual": json.dumps(meta)})
        os.replace(tmp, quant_dir / RESIDUAL_FILE)
    except (OSError, SafetensorError) as exc:
        Path(tmp).unlink(missing_ok=True)
        raise AnybitError(
            f"cannot write {quant_dir / RESIDUAL_FILE}: {getattr(exc, 'strerror', None) or exc}"
        ) from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return meta


def load_residuals(quant_dir: str | Path) -> tuple[dict[str, Residual], dict[str, torch.Tensor], dict]:
    """Residuals, calibration mean |x| per channel, and the residual metadata of a quantized directory."""
    path = Path(quant_dir) / RESIDUAL_FILE
    if not path.exists():
        raise AnybitError(f"{quant_dir} has no residuals; run `anybit residual {quant_dir}` first")
    try:
        with safe_open(path, framework="pt") as f:
            meta = json.loads(f.metadata()["residual"])
            tensors = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118 - safe_open is not iterable
    except (OSError, SafetensorError, KeyError, json.JSONDecodeError) as exc:
        raise AnybitError(f"corrupt residual file {path}: {exc}") from exc
    names = {k.rsplit(".", 1)[0] for k in tensors}
    residuals, means = {}, {}
    for name in names:
        try:
            residuals[name] = Residual(tensors[f"{name}.residual_codes"], tensors[f"{name}.residual_scales"])
            means[name] = tensors[f"{name}.act_mean_abs"]
        except KeyError as exc:
            raise AnybitError(f"corrupt residual file {path}: missing {exc}") from exc
        except ValueError as exc:
            raise AnybitError(f"corrupt residual file {path}: {name}: {exc}") from None
        if means[name].dtype != torch.float32 or not bool(torch.isfinite(means[name]).all()):
            raise AnybitError(f"corrupt residual file {path}: {name} activation means are not finite float32")
        if means[name].shape != (residuals[name].in_features,):
            raise AnybitError(f"corrupt residual file {path}: {name} activation means do not fit its codes")
    if "fit_k" in meta:
        try:
            DecPlan.parse(meta["fit_k"])
        except ValueError as exc:
            raise AnybitError(f"corrupt residual file {path}: fit_k {meta['fit_k']!r}: {exc}") from None
    return residuals, means, meta
