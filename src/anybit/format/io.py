"""The quantized model directory: write it atomically, read it back, refuse anything foreign.

Layout of DIR:
- `model.safetensors`: every tensor of the model; quantized linears as their packed buffers
  (`<linear>.codes_4`, `<linear>.scales`, ...), all other parameters in fp16;
- `anybit.json`: format name and version, the quantization config, per-linear layout metadata,
  tied-parameter aliases, and the counted bits;
- `config.json` and the tokenizer files, as Hugging Face writes them.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from anybit.errors import AnybitError
from anybit.format.qtensor import QuantizedTensor
from anybit.model.adapters import get_adapter, set_submodule
from anybit.runtime.dec import DecPlan, Residual
from anybit.runtime.qlinear import QuantLinear, quant_linears

FORMAT_NAME = "anybit"
FORMAT_VERSION = 1
QUANT_FILE = "anybit.json"
WEIGHTS_FILE = "model.safetensors"
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


def quantization_summary(model: nn.Module) -> dict:
    """Counted bits of all quantized linears, and per-linear layout metadata."""
    layers, total_bits, total_weights, nominal = {}, 0, 0, 0.0
    for name, module in quant_linears(model):
        qt = module.qtensor
        bits = qt.storage_bits()
        layers[name] = {**qt.meta(), "storage_bits": bits, "nominal_bits": qt.nominal_bits()}
        total_bits += bits
        total_weights += qt.numel
        nominal += qt.nominal_bits() * qt.numel
    return {
        "layers": layers,
        "quantized_weights": total_weights,
        "storage_bits": total_bits,
        "bits_per_weight": total_bits / total_weights if total_weights else None,
        "nominal_bits_per_weight": nominal / total_weights if total_weights else None,
    }


def _state_to_store(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors to write (shared tensors once) and the aliases of the shared ones."""
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple[int, int], str] = {}
    quantized_prefixes = tuple(f"{name}." for name, _ in quant_linears(model))
    for name, tensor in model.state_dict(keep_vars=False).items():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset())
        if tensor.numel() and key in seen:
            aliases[name] = seen[key]
            continue
        seen[key] = name
        packed = name.startswith(quantized_prefixes) and not name.endswith(".bias")
        if tensor.is_floating_point() and not packed:
            tensor = tensor.to(STORE_DTYPE)
        tensors[name] = tensor.detach().cpu().contiguous()
    return tensors, aliases


def save_quantized(model: nn.Module, tokenizer, out_dir: str | Path, info: dict, force: bool = False) -> dict:
    """Write the quantized model to `out_dir` atomically; returns the written anybit.json content."""
    out_dir = Path(out_dir).expanduser()
    if out_dir.exists() and not force:
        raise AnybitError(f"output {out_dir} already exists (use --force to replace it)")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tensors, aliases = _state_to_store(model)
    meta = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        **info,
        "aliases": aliases,
        **quantization_summary(model),
    }
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    tmp.chmod(0o755)
    try:
        save_file(tensors, tmp / WEIGHTS_FILE, metadata={"format": FORMAT_NAME})
        model.config.to_json_file(tmp / "config.json")
        tokenizer.save_pretrained(tmp)
        (tmp / QUANT_FILE).write_text(json.dumps(meta, indent=1))
        if out_dir.exists():
            old = out_dir.with_name(f".{out_dir.name}.old")
            os.replace(out_dir, old)
            os.replace(tmp, out_dir)
            shutil.rmtree(old)
        else:
            os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return meta


def read_quant_info(path: str | Path) -> dict:
    """anybit.json of a quantized directory, checked to be ours."""
    path = Path(path)
    try:
        info = json.loads((path / QUANT_FILE).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise AnybitError(f"{path} is not a readable anybit directory: {exc}") from exc
    if not isinstance(info, dict) or info.get("format") != FORMAT_NAME:
        raise AnybitError(f"{path / QUANT_FILE} is not an anybit quantization file")
    if info.get("format_version") != FORMAT_VERSION:
        raise AnybitError(f"{path} has format version {info.get('format_version')}, this anybit reads {FORMAT_VERSION}")
    return info


def load_quantized(path: str | Path, dtype: torch.dtype = torch.float32) -> tuple[nn.Module, object, dict]:
    """The model (with QuantLinear layers) and tokenizer stored in `path`, and its anybit.json."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    info = read_quant_info(path)
    try:
        tensors = load_file(path / WEIGHTS_FILE)
    except (OSError, SafetensorError) as exc:
        raise AnybitError(f"corrupt or missing {path / WEIGHTS_FILE}: {exc}") from exc
    try:
        config = AutoConfig.from_pretrained(path)
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as exc:
        raise AnybitError(f"cannot read the model config or tokenizer in {path}: {exc}") from exc
    get_adapter(config.model_type)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)

    try:
        for name, layer_meta in info["layers"].items():
            prefix = f"{name}."
            own = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix) and k != f"{name}.bias"}
            qt = QuantizedTensor.from_tensors(layer_meta, own)
            bias = tensors.get(f"{name}.bias")
            set_submodule(model, name, QuantLinear(qt, None if bias is None else bias.to(dtype)))
            for k in own:
                del tensors[f"{prefix}{k}"]
            tensors.pop(f"{name}.bias", None)
    except (KeyError, ValueError) as exc:
        raise AnybitError(f"corrupt quantized checkpoint {path}: {exc}") from exc

    state = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in tensors.items()}
    for alias, target in info.get("aliases", {}).items():
        if target in state:
            state[alias] = state[target]
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    still_empty = {n for n, p in model.named_parameters() if p.is_meta}
    missing = [m for m in missing if m in still_empty]
    if missing or unexpected:
        raise AnybitError(f"corrupt quantized checkpoint {path}: missing {missing[:3]}, unexpected {unexpected[:3]}")
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    leftover = [n for n, p in model.named_parameters() if p.is_meta]
    if leftover:
        raise AnybitError(f"corrupt quantized checkpoint {path}: no values for {leftover[:3]}")
    model.eval()
    model.requires_grad_(False)
    return model, tokenizer, info


RESIDUAL_FILE = "residuals.safetensors"


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
    fd, tmp = tempfile.mkstemp(prefix=".residuals.", dir=quant_dir)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata={"format": FORMAT_NAME, "residual": json.dumps(meta)})
        os.replace(tmp, quant_dir / RESIDUAL_FILE)
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
        if means[name].shape != (residuals[name].in_features,):
            raise AnybitError(f"corrupt residual file {path}: {name} activation means do not fit its codes")
    if "fit_k" in meta:
        try:
            DecPlan.parse(meta["fit_k"])
        except ValueError as exc:
            raise AnybitError(f"corrupt residual file {path}: fit_k {meta['fit_k']!r}: {exc}") from None
    return residuals, means, meta
