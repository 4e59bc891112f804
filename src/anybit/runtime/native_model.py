"""A quantized directory loaded for the native decoder alone, without Hugging Face's modelling code.

Importing transformers' model (or even config) classes pulls in torch.distributed, torch._dynamo and sympy:
about 100 MB of resident memory before any weight, more than the packed decoder linears of a 135M model.
The native decoder (`runtime.native`) needs none of it: it reads the linears, the norms, the embedding and
head, and rotary tables. `load_native` builds a skeleton of plain modules with the parameter names of the
served families' Hugging Face models and fills it through the same checked path as `load_quantized`
(`model.checkpoint.fill_quantized`), so a damaged file is refused alike. The skeleton has no forward pass:
callers that need one (evaluation, the eager loop, a reference kernel) load through transformers instead;
`native_skeleton_unavailable` says when that is needed.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING

import torch
from torch import nn

from anybit.errors import AnybitError
from anybit.runtime.native import FAMILIES

if TYPE_CHECKING:
    from anybit.model.loading import LoadedModel

ROPE_SERVED = ("default",)  # rope types computed here; scaled ones need transformers' rope functions
_QK_NORM_FAMILIES = ("qwen3",)


def read_config(path: Path) -> SimpleNamespace:
    """config.json as attributes (no transformers config class: importing one costs the memory above)."""
    try:
        values = json.loads((path / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise AnybitError(f"cannot read the model config in {path}: {exc}") from exc
    if not isinstance(values, dict):
        raise AnybitError(f"cannot read the model config in {path}: config.json is not a JSON object")
    return SimpleNamespace(**values)


def _rope(config: SimpleNamespace) -> tuple[str | None, float | None]:
    """The rope type and base of a config, in the old (rope_theta, rope_scaling) or new (rope_parameters)
    spelling."""
    params = getattr(config, "rope_parameters", None) or {}
    scaling = getattr(config, "rope_scaling", None) or {}
    if not isinstance(params, dict) or not isinstance(scaling, dict):
        return "unreadable", None
    scaled = {params.get("rope_type"), scaling.get("rope_type") or scaling.get("type")} - {None, "default"}
    theta = params.get("rope_theta", getattr(config, "rope_theta", None))
    return min(scaled) if scaled else "default", theta


def native_skeleton_unavailable(config: SimpleNamespace) -> str:
    """Why `load_native` cannot build this model ("" when it can); such a model loads through transformers."""
    if getattr(config, "model_type", None) not in FAMILIES:
        return f"the {getattr(config, 'model_type', None)} architecture"
    kind, theta = _rope(config)
    if kind not in ROPE_SERVED:
        return f"rope type {kind}"
    if not _positive(theta, (int, float)):
        return "no usable rope_theta in config.json"
    if not _positive(getattr(config, "rms_norm_eps", None), (int, float)):
        return "no usable rms_norm_eps in config.json"
    required = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
    optional = ("num_key_value_heads", "head_dim")
    bad = [key for key in required if not _positive(getattr(config, key, None), int)]
    bad += [
        key for key in optional if getattr(config, key, None) is not None and not _positive(getattr(config, key), int)
    ]
    return f"config.json has no usable {', '.join(bad)}" if bad else ""


def _positive(value: object, kinds: tuple[type, ...] | type) -> bool:
    return isinstance(value, kinds) and not isinstance(value, bool) and value > 0


class RotaryTables(nn.Module):
    """cos and sin of the default rotary embedding, as Hugging Face's rotary modules return them."""

    def __init__(self, head_dim: int, theta: float) -> None:
        super().__init__()
        exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
        self.register_buffer("inv_freq", 1.0 / theta**exponents, persistent=False)

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = position_ids[..., None].float() * self.inv_freq
        angles = torch.cat([freqs, freqs], dim=-1)
        return angles.cos().to(x.dtype), angles.sin().to(x.dtype)


class _Norm(nn.Module):
    def __init__(self, size: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(size))


class _Linear(nn.Linear):
    def reset_parameters(self) -> None:  # values come from the checkpoint (initialising meta tensors imports dynamo)
        pass


class _Embedding(nn.Embedding):
    def reset_parameters(self) -> None:
        pass


def _linear(out_features: int, in_features: int) -> nn.Linear:
    return _Linear(in_features, out_features, bias=False)


class _Attention(nn.Module):
    def __init__(self, config: SimpleNamespace, head_dim: int, qk_norm: bool) -> None:
        super().__init__()
        heads, kv_heads = config.num_attention_heads, getattr(config, "num_key_value_heads", None)
        kv_heads = kv_heads or heads
        self.head_dim, self.scaling = head_dim, head_dim**-0.5
        self.q_proj = _linear(heads * head_dim, config.hidden_size)
        self.k_proj = _linear(kv_heads * head_dim, config.hidden_size)
        self.v_proj = _linear(kv_heads * head_dim, config.hidden_size)
        self.o_proj = _linear(config.hidden_size, heads * head_dim)
        if qk_norm:
            self.q_norm, self.k_norm = _Norm(head_dim), _Norm(head_dim)


class _Mlp(nn.Module):
    def __init__(self, hidden: int, intermediate: int) -> None:
        super().__init__()
        self.gate_proj = _linear(intermediate, hidden)
        self.up_proj = _linear(intermediate, hidden)
        self.down_proj = _linear(hidden, intermediate)


class _Layer(nn.Module):
    def __init__(self, config: SimpleNamespace, head_dim: int, qk_norm: bool) -> None:
        super().__init__()
        self.self_attn = _Attention(config, head_dim, qk_norm)
        self.mlp = _Mlp(config.hidden_size, config.intermediate_size)
        self.input_layernorm = _Norm(config.hidden_size)
        self.post_attention_layernorm = _Norm(config.hidden_size)


class _Body(nn.Module):
    def __init__(self, config: SimpleNamespace, head_dim: int) -> None:
        super().__init__()
        qk_norm = config.model_type in _QK_NORM_FAMILIES
        self.embed_tokens = _Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(_Layer(config, head_dim, qk_norm) for _ in range(config.num_hidden_layers))
        self.norm = _Norm(config.hidden_size)
        with torch.device("cpu"):  # computed, never stored: real even in a skeleton built on the meta device
            self.rotary_emb = RotaryTables(head_dim, _rope(config)[1])


class NativeSkeleton(nn.Module):
    """The served families' parameters under their Hugging Face names, and no forward pass."""

    def __init__(self, config: SimpleNamespace) -> None:
        super().__init__()
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.config = config
        # what ends a generation, as Hugging Face derives it from config.json (`generate._eos_ids`)
        self.generation_config = SimpleNamespace(eos_token_id=getattr(config, "eos_token_id", None))
        self.model = _Body(config, head_dim)
        self.lm_head = _linear(config.vocab_size, config.hidden_size)

    def get_input_embeddings(self) -> nn.Module:
        return self.model.embed_tokens

    def set_input_embeddings(self, module: nn.Module) -> None:
        self.model.embed_tokens = module

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def set_output_embeddings(self, module: nn.Module) -> None:
        self.lm_head = module

    def tie_weights(self) -> None:
        self.lm_head.weight = self.model.embed_tokens.weight


def load_native(
    path: str | Path, dtype: torch.dtype = torch.float32, head: str = "int8"
) -> tuple[NativeSkeleton, dict]:
    """The quantized directory `path` as a skeleton for the native decoder, and its anybit.json (see
    `native_skeleton_unavailable` for what it serves; an AnybitError otherwise), every stored tensor checked
    as `load_quantized` checks it."""
    path = Path(path)
    config = read_config(path)
    reason = native_skeleton_unavailable(config)
    if reason:
        raise AnybitError(f"{path} cannot be loaded without transformers: {reason}")
    return _filled_skeleton(path, config, dtype, head)


def _filled_skeleton(path: Path, config: SimpleNamespace, dtype: torch.dtype, head: str) -> tuple[NativeSkeleton, dict]:
    from anybit.model.checkpoint import fill_quantized, read_checkpoint

    info, tensors = read_checkpoint(path)
    with torch.device("meta"):
        model = NativeSkeleton(config)
    fill_quantized(model, path, info, tensors, dtype, head)
    return model, info


def load_for_native(
    spec: str, dtype: torch.dtype, head: str, kernel: str, tokenizer: bool = False
) -> LoadedModel | None:
    """`spec` loaded without transformers' model code where it is a quantized directory the native decoder
    serves with `kernel` (`runtime.qlinear.KERNELS`), with its fast tokenizer if asked (transformers'
    tokenizer class, which imports none of it); None otherwise: the caller loads it through transformers."""
    from anybit.model.loading import LoadedModel, resolve_spec
    from anybit.runtime.native import native_unavailable
    from anybit.runtime.qlinear import set_kernel

    kind, path = resolve_spec(spec)
    if kind != "quantized":
        return None
    config = read_config(path)
    if native_skeleton_unavailable(config):
        return None
    if tokenizer and not (path / "tokenizer.json").is_file():
        return None  # a slow tokenizer: AutoTokenizer's choice of class, through transformers
    model, info = _filled_skeleton(path, config, dtype, head)
    set_kernel(model, kernel)
    if native_unavailable(model):
        return None
    return LoadedModel(model, _fast_tokenizer(path) if tokenizer else None, spec, kind, info)


def _fast_tokenizer(path: Path):
    from transformers import PreTrainedTokenizerFast

    from anybit.model.sources import first_line

    try:
        return PreTrainedTokenizerFast.from_pretrained(path)
    except Exception as exc:  # the tokenizers library raises its own kinds for a damaged file
        raise AnybitError(f"cannot read the tokenizer in {path}: {first_line(exc)}") from None
