"""anybit directories in transformers: `AutoModelForCausalLM.from_pretrained(DIR)` and
`pipeline("text-generation", model=DIR)` load an anybit directory once anybit is imported.

The directory's config.json names `quant_method: "anybit"`; transformers then asks `AnybitQuantizer` to prepare
the model skeleton. Each quantized linear becomes a slot holding empty (meta) buffers of exactly the stored
shapes and dtypes, so transformers' own loader reads the packed tensors from the safetensors files into them
(never a dense weight). After loading, every slot is checked against its layout and replaced by a
`QuantLinear`, and the counted bits are checked against anybit.json, as `anybit.model.checkpoint.load_quantized`
does. `model.save_pretrained(DIR)` writes an anybit directory again.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn
from transformers.quantizers.auto import register_quantization_config, register_quantizer
from transformers.quantizers.base import HfQuantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from anybit.config import cpu_has_native_bfloat16
from anybit.errors import AnybitError
from anybit.format.directory import FORMAT_NAME, FORMAT_VERSION, read_quant_info
from anybit.format.qtensor import all_finite
from anybit.format.shards import tensor_specs, weight_files
from anybit.model.adapters import get_adapter, set_submodule
from anybit.model.checkpoint import (
    STORE_DTYPE,
    check_counted_bits,
    check_layer_fits,
    quant_linear_from_stored,
    save_quantized,
)
from anybit.runtime.qlinear import quant_linears

logger = logging.getLogger(__name__)

# anybit.json fields that describe how a directory was made (kept when the model is saved again)
_PROVENANCE = ("method", "source", "config", "quantize_seconds")


@register_quantization_config(FORMAT_NAME)
class AnybitConfig(QuantizationConfigMixin):
    """config.json's `quantization_config` of an anybit directory (its full description is anybit.json)."""

    def __init__(
        self,
        format_version: int = FORMAT_VERSION,
        method: str | None = None,
        bits_per_weight: float | None = None,
        **kwargs,
    ) -> None:
        self.quant_method = FORMAT_NAME
        self.format_version = format_version
        self.method = method
        self.bits_per_weight = bits_per_weight


class PackedSlot(nn.Module):
    """Stands in for one quantized linear while transformers loads the weights: empty buffers of the stored
    shapes and dtypes for the packed tensors, and the bias if one is stored. Its `weight` is an empty stand-in
    of the linear's weight, marked as initialized so that transformers' weight initialization leaves it alone."""

    def __init__(self, weight: torch.Tensor, specs: dict[str, tuple[tuple[int, ...], torch.dtype]]) -> None:
        super().__init__()
        self.weight = torch.empty_like(weight, device="meta")  # a plain attribute, not a parameter
        self.weight._is_hf_initialized = True
        for name, (shape, dtype) in specs.items():
            if name == "bias":
                self.bias = nn.Parameter(torch.empty(shape, dtype=dtype, device="meta"), requires_grad=False)
            else:
                self.register_buffer(name, torch.empty(shape, dtype=dtype, device="meta"))

    def stored(self) -> dict[str, torch.Tensor]:
        """The loaded tensors by their stored short names."""
        tensors = {name: buffer for name, buffer in self._buffers.items() if buffer is not None}
        if getattr(self, "bias", None) is not None:
            tensors["bias"] = self.bias.detach()
        return tensors


@register_quantizer(FORMAT_NAME)
class AnybitQuantizer(HfQuantizer):
    """Loads anybit directories into models with `QuantLinear` layers (pre-quantized only)."""

    requires_calibration = True

    def __init__(self, quantization_config: QuantizationConfigMixin, **kwargs) -> None:
        super().__init__(quantization_config, **kwargs)
        self.info: dict | None = None

    def validate_environment(self, *args, **kwargs) -> None:
        if kwargs.get("from_tf") or kwargs.get("from_flax"):
            raise ValueError("anybit directories load from safetensors only")

    def update_dtype(self, dtype: torch.dtype) -> torch.dtype:
        if dtype == torch.bfloat16 and not torch.cuda.is_available() and not cpu_has_native_bfloat16():
            logger.warning("anybit: this CPU has no native bfloat16 (about 80x slower); computing in float32")
            return torch.float32
        return dtype

    def _process_model_before_weight_loading(self, model, checkpoint_files=None, **kwargs):
        if not checkpoint_files:
            raise AnybitError("an anybit directory must be loaded from its local files")
        directory = Path(checkpoint_files[0]).parent
        self.info = read_quant_info(directory)
        get_adapter(model)  # an architecture anybit supports
        specs = tensor_specs(directory, weight_files(directory))
        try:
            for name, layer_meta in self.info["layers"].items():
                check_layer_fits(model, name, layer_meta)
                prefix = f"{name}."
                own = {k.removeprefix(prefix): v for k, v in specs.items() if k.startswith(prefix)}
                set_submodule(model, name, PackedSlot(model.get_submodule(name).weight, own))
            _check_stored_match(model, specs, self.info["aliases"])
        except ValueError as exc:
            raise AnybitError(f"corrupt quantized checkpoint {directory}: {exc}") from exc
        return model

    def _process_model_after_weight_loading(self, model, **kwargs):
        info = self.info
        try:
            for name, layer_meta in info["layers"].items():
                slot = model.get_submodule(name)
                stored = slot.stored()
                if any(t.is_meta for t in stored.values()):
                    raise ValueError(f"{name}: its tensors were not loaded")
                set_submodule(model, name, quant_linear_from_stored(name, layer_meta, stored, model.dtype))
            check_counted_bits(model, info)
            _check_finite(model)
        except ValueError as exc:
            raise AnybitError(f"corrupt quantized checkpoint {model.config.name_or_path}: {exc}") from exc
        provenance = {k: info[k] for k in _PROVENANCE if k in info}
        model.save_pretrained = _AnybitSaver(model, provenance)  # writes anybit's format, not transformers'
        return model

    def is_serializable(self) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return False


def _check_stored_match(model: nn.Module, specs: dict, aliases: dict[str, str]) -> None:
    """Every tensor the prepared model expects is stored with its shape (floats in fp16), and nothing else is;
    a ValueError names the first that is not."""
    expected = model.state_dict(keep_vars=True)
    unexpected = sorted(set(specs) - set(expected))
    if unexpected:
        raise ValueError(f"unexpected stored tensors {', '.join(unexpected[:3])}")
    missing = sorted(set(expected) - set(specs) - set(aliases))
    if missing:
        raise ValueError(f"no values for {', '.join(missing[:3])}")
    for name, (shape, dtype) in specs.items():
        like = expected[name]
        if tuple(like.shape) != shape:
            raise ValueError(f"{name}: shape {shape}, expected {tuple(like.shape)}")
        packed = isinstance(model.get_submodule(name.rpartition(".")[0]), PackedSlot)
        if like.is_floating_point() and not packed and dtype != STORE_DTYPE:
            raise ValueError(f"{name}: stored as {str(dtype).removeprefix('torch.')}, expected float16")


def _check_finite(model: nn.Module) -> None:
    """A ValueError naming the first unquantized floating tensor holding NaN or infinite values."""
    quantized = {f"{name}." for name, _ in quant_linears(model)}
    for name, tensor in model.state_dict().items():
        unquantized = tensor.is_floating_point() and not name.startswith(tuple(quantized))
        if unquantized and not all_finite(tensor):
            raise ValueError(f"{name}: holds NaN or infinite values")


class _AnybitSaver:
    """`model.save_pretrained` of a model loaded from an anybit directory: writes an anybit directory
    (atomically; an existing directory is replaced only when anybit wrote it), with `tokenizer` or, when none
    is given, the tokenizer of the directory the model came from."""

    def __init__(self, model: nn.Module, provenance: dict) -> None:
        self._model = [model]  # a list, so the model does not become a submodule of itself
        self.provenance = provenance

    def __call__(self, save_directory: str | Path, tokenizer=None, is_main_process: bool = True, **kwargs) -> None:
        unsupported = sorted(set(kwargs) - {"safe_serialization", "max_shard_size"})
        if unsupported:
            raise TypeError(f"save_pretrained of an anybit model does not take {', '.join(unsupported)}")
        if not is_main_process:
            return
        model = self._model[0]
        if tokenizer is None:
            tokenizer = _tokenizer_of(model.config.name_or_path)
        save_quantized(model, tokenizer, save_directory, self.provenance, force=True)


def _tokenizer_of(directory: str):
    """The tokenizer stored in `directory`, None where it holds none."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(directory)
    except (OSError, ValueError):
        return None
