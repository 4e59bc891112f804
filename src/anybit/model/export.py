"""Export of an anybit directory to the GPTQ checkpoint layout that vLLM, SGLang, GPTQModel and transformers load.

Every quantized linear must be a uniform grid of one width (rtn, gptq, `gptq --scope model`); its integers and
fp16 scales move over unchanged, so the exported weights are exactly anybit's. Linears whose width or group
differs from the most common one are named in `quantization_config.dynamic` (GPTQModel's per-module
overrides, `+:` regular expressions). The directory appears atomically and never replaces an existing one.
"""

from __future__ import annotations

import copy
import re
import shutil
from collections import Counter
from contextlib import closing
from pathlib import Path

import torch
from safetensors import SafetensorError

from anybit import __version__
from anybit.errors import AnybitError
from anybit.format.files import check_writable_dir, make_temp_dir, remove_stale_temporaries, replace_dir
from anybit.format.gptq import ZERO_OFFSETS, gptq_tensors, has_zero_point_zero, why_not_exportable
from anybit.format.shards import ShardWriter
from anybit.model.checkpoint import STORE_DTYPE, load_quantized, tied_aliases
from anybit.runtime.qlinear import quant_linears

FORMATS = tuple(ZERO_OFFSETS)  # gptq (v1), gptq_v2


def export_gptq(quant_dir: str | Path, out_dir: str | Path, checkpoint_format: str = "gptq") -> dict:
    """Write the GPTQ form (`checkpoint_format` gptq or gptq_v2) of the anybit directory `quant_dir` to `out_dir`;
    returns its quantization_config. "gptq" becomes "gptq_v2" where a group has zero point 0, which v1
    cannot store (the config's checkpoint_format says which was written)."""
    out = Path(out_dir).expanduser()
    if out.exists() or out.is_symlink():
        raise AnybitError(f"output {out} already exists; anybit export never replaces a directory")
    remove_stale_temporaries(out)
    check_writable_dir(out.parent)
    model, tokenizer, info = load_quantized(quant_dir)
    linears = dict(quant_linears(model))
    for name, module in linears.items():
        problem = why_not_exportable(module.qtensor)
        if problem:
            raise AnybitError(f"cannot export {name} to GPTQ: {problem}")
    if checkpoint_format == "gptq" and any(has_zero_point_zero(m.qtensor) for m in linears.values()):
        checkpoint_format = "gptq_v2"
    tmp = make_temp_dir(out)
    try:
        layouts = _write_weights(model, linears, tmp, checkpoint_format)
        quant_config = gptq_config(layouts, sym=bool(info["config"].get("sym")), checkpoint_format=checkpoint_format)
        config = copy.deepcopy(model.config)
        config.quantization_config = quant_config
        config.dtype = STORE_DTYPE
        config.to_json_file(tmp / "config.json")
        tokenizer.save_pretrained(tmp)
        replace_dir(tmp, out)
    except ValueError as exc:  # a tensor the layout cannot hold (found while packing)
        shutil.rmtree(tmp, ignore_errors=True)
        raise AnybitError(f"cannot export {quant_dir} to GPTQ: {exc}") from None
    except (OSError, SafetensorError) as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise AnybitError(f"cannot write {out}: {getattr(exc, 'strerror', None) or exc}") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return quant_config


def _write_weights(
    model: torch.nn.Module, linears: dict, directory: Path, checkpoint_format: str
) -> dict[str, tuple[int, int, bool]]:
    """Write every tensor in GPTQ's names; returns each linear's (width, group size, act-order)."""
    with closing(ShardWriter(directory, {"format": "pt"})) as writer:
        return _write_gptq_tensors(model, linears, writer, checkpoint_format)


def _write_gptq_tensors(
    model: torch.nn.Module, linears: dict, writer: ShardWriter, checkpoint_format: str
) -> dict[str, tuple[int, int, bool]]:
    layouts = {}
    for name, module in linears.items():
        tensors, bits, group = gptq_tensors(module.qtensor, checkpoint_format)
        per_channel = group == module.in_features
        layouts[name] = (bits, -1 if per_channel else group, module.qtensor.perm is not None)
        for key, tensor in tensors.items():
            writer.add(f"{name}.{key}", tensor)
        if module.bias is not None:
            writer.add(f"{name}.bias", module.bias.detach().to(STORE_DTYPE))
    packed = tuple(f"{name}." for name in linears)
    aliases = tied_aliases(model)
    for name, tensor in model.state_dict().items():
        if name.startswith(packed) or name in aliases:
            continue
        writer.add(name, tensor.to(STORE_DTYPE) if tensor.is_floating_point() else tensor)
    writer.finish()
    return layouts


def gptq_config(layouts: dict[str, tuple[int, int, bool]], sym: bool, checkpoint_format: str = "gptq") -> dict:
    """config.json's `quantization_config`: the most common width and group (by linear count) as the defaults,
    every other linear as a `dynamic` override."""
    bits, group = Counter((b, g) for b, g, _ in layouts.values()).most_common(1)[0][0]
    dynamic = {
        f"+:^{re.escape(name)}$": {"bits": b, "group_size": g}
        for name, (b, g, _) in layouts.items()
        if (b, g) != (bits, group)
    }
    config = {
        "quant_method": "gptq",
        "checkpoint_format": checkpoint_format,
        "bits": bits,
        "group_size": group,
        "desc_act": any(act_order for _, _, act_order in layouts.values()),
        "sym": sym,
        "pack_dtype": "int32",
        "lm_head": False,
        "meta": {"quantizer": [f"anybit:{__version__}"]},
    }
    if dynamic:
        config["dynamic"] = dynamic
    return config
