"""Native decoding on the CPU: each step (one token, or a prompt's tokens) runs every decoder layer in C
(`kernels/int8_lut.c`, `anybit_decode_step`) on the fast kernel's re-laid matrices, with no Python per layer.

Served: the Llama family (llama, mistral, qwen2, qwen3: RMS norms, rotary embeddings from the model's own
rotary module, grouped-query attention with an optional sliding window over a float16 KV cache, q/k norms,
gated SiLU MLP) when every decoder linear is a `QuantLinear` the fast kernel serves. The head runs there too
when it is a fast `QuantLinear` (`runtime.head`); a dense head multiplies in torch. Dynamic error compensation
(`--dec`, `runtime.dec.compensation`) runs in C too. `native_unavailable` says why a model is not served;
callers then decode eagerly (Hugging Face's loop) after one warning.
"""

from __future__ import annotations

import ctypes
import warnings

import torch
from torch import nn

from anybit.kernels import cpu_fast
from anybit.runtime.head import QuantEmbedding
from anybit.runtime.qlinear import QuantLinear

FAMILIES = ("llama", "mistral", "qwen2", "qwen3")
LINEARS = ("q", "k", "v", "o", "gate", "up", "down")
PATHS = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj",
         "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"}  # fmt: skip
PREFILL_CHUNK = 256  # prompt tokens per native call (bounds its scratch memory)

_P = ctypes.c_void_p
_I = ctypes.c_int64


class _Layer(ctypes.Structure):
    _fields_ = [*((name, cpu_fast.Matrix) for name in LINEARS), ("attn_norm", _P), ("mlp_norm", _P), ("q_norm", _P),
                ("k_norm", _P)]  # fmt: skip


class _Model(ctypes.Structure):
    _fields_ = [
        ("n_layers", _I), ("hidden", _I), ("heads", _I), ("kv_heads", _I), ("head_dim", _I), ("intermediate", _I),
        ("max_len", _I), ("window", _I), ("vocab", _I), ("eps", ctypes.c_float), ("attn_scale", ctypes.c_float),
        ("layers", ctypes.POINTER(_Layer)), ("final_norm", _P), ("head", ctypes.POINTER(cpu_fast.Matrix)), ("cos", _P),
        ("sin", _P), ("k_cache", _P), ("v_cache", _P),
    ]  # fmt: skip


def _declare(lib: ctypes.CDLL) -> None:
    lib.anybit_decode_step.restype = ctypes.c_int
    lib.anybit_decode_step.argtypes = [ctypes.POINTER(_Model), _P, _I, _I, _P, ctypes.c_int]


def declare_attention(lib: ctypes.CDLL) -> ctypes.CDLL:
    """`lib` (a build of the fast kernel) with `anybit_attention`, the decode step's attention alone, declared."""
    lib.anybit_attention.restype = ctypes.c_int
    lib.anybit_attention.argtypes = [_P, _P, _P, _I, _I, _I, _I, _I, _I, _I, ctypes.c_float, _P, ctypes.c_int]
    return lib


def _step_parts() -> ctypes.CDLL:
    """The kernel library with the decode step's parts that tests call alone declared."""
    lib = declare_attention(cpu_fast.KERNEL.library())
    lib.anybit_halves.restype = None
    lib.anybit_halves.argtypes = [_P, _I, _P]
    return lib


def cache_halves(x: torch.Tensor) -> torch.Tensor:
    """Float32 values as the native decoder stores them in its KV cache: float16, rounded to nearest even,
    saturated at ±65504 (for tests)."""
    x = x.float().contiguous()
    out = torch.empty(x.shape, dtype=torch.float16)
    _step_parts().anybit_halves(x.data_ptr(), x.numel(), out.data_ptr())
    return out


def attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, pos: int, window: int = 0) -> torch.Tensor:
    """The native decode step's attention alone (for tests and benchmarks): queries q (tokens, heads, head_dim)
    at positions pos .. pos + tokens - 1 over the cache (kv_heads, max_len, head_dim) up to them (the last
    `window` positions with a sliding window), scaled by head_dim ** -0.5, on torch's threads; the cache is
    held in float16, as the decoder holds it."""
    tokens, heads, head_dim = q.shape
    kv_heads, max_len, _ = k_cache.shape
    q = q.float().contiguous()
    k_cache, v_cache = (t.half().contiguous() for t in (k_cache, v_cache))
    out = torch.empty_like(q)
    status = _step_parts().anybit_attention(
        q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), tokens, pos, heads, kv_heads, head_dim, max_len, window,
        head_dim**-0.5, out.data_ptr(), torch.get_num_threads(),
    )  # fmt: skip
    if status:
        raise MemoryError("the native attention could not allocate its scratch memory")
    return out


def _fast_layer(module: nn.Module) -> bool:
    return isinstance(module, QuantLinear) and module.backend("cpu") == "fast"


def _compensator(module: nn.Module):
    """The dynamic error compensation `runtime.dec.compensation` gave this layer (applied in C), or None."""
    return getattr(module, "compensator", None)


def native_unavailable(model: nn.Module) -> str:
    """Why the native decoder cannot run this model ("" when it can)."""
    config = model.config
    if config.model_type not in FAMILIES:
        return f"the {config.model_type} architecture has no native decoder (served: {', '.join(FAMILIES)})"
    if getattr(config, "hidden_act", "silu") != "silu":
        return f"activation {config.hidden_act} (the native decoder has SiLU)"
    if config.model_type != "mistral" and getattr(config, "use_sliding_window", False):
        return "sliding-window layers mixed with full attention"
    if next(model.parameters()).device.type != "cpu":
        return "the model is not on the CPU"
    for index, layer in enumerate(model.model.layers):
        for name in LINEARS:
            module = layer.get_submodule(PATHS[name])
            if not _fast_layer(module):
                return f"layer {index} {PATHS[name]} is not a quantized linear the fast CPU kernel serves"
            if (module._forward_hooks or module._forward_pre_hooks) and _compensator(module) is None:
                return f"layer {index} {PATHS[name]} has hooks, which run in Python"
    lib = cpu_fast.KERNEL.library()
    return lib if isinstance(lib, str) else ""


class NativeDecoder:
    """Batch-1 decoding of a served model (see `native_unavailable`) on a KV cache of `max_len` positions; `lib`:
    another build of the kernel with the same structures (benchmarks compare two), else anybit's."""

    def __init__(self, model: nn.Module, max_len: int, lib: ctypes.CDLL | None = None) -> None:
        reason = native_unavailable(model)
        if reason:
            raise ValueError(reason)
        config, self.model = model.config, model
        self.max_len = max_len
        self._lib = lib or cpu_fast.KERNEL.library()  # loaded: native_unavailable checked it
        _declare(self._lib)
        # every tensor, prepared matrix or compensation the C structures point into: a layer may drop its prepared
        # view (moved, or asked for other tables) while this decoder still multiplies with it
        self._keep: list[object] = []
        layers = model.model.layers
        attention = layers[0].self_attn
        self.head_dim = attention.head_dim
        heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.k_cache = torch.zeros(len(layers), kv_heads, max_len, self.head_dim, dtype=torch.float16)
        self.v_cache = torch.zeros_like(self.k_cache)
        cos, sin = self._rotary_tables(max_len)
        self._layers = (_Layer * len(layers))(*(self._layer(layer) for layer in layers))
        head = model.get_output_embeddings()
        self._head = self._matrix(head) if _fast_layer(head) else None
        self._embed_rows = self._c_lookup(model.get_input_embeddings(), head)
        self.vocab = config.vocab_size
        window = getattr(config, "sliding_window", None) if config.model_type == "mistral" else None
        self._model = _Model(
            n_layers=len(layers), hidden=config.hidden_size, heads=heads, kv_heads=kv_heads, head_dim=self.head_dim,
            intermediate=layers[0].mlp.down_proj.in_features, max_len=max_len, window=window or 0,
            vocab=self.vocab, eps=config.rms_norm_eps, attn_scale=attention.scaling, layers=self._layers,
            final_norm=self._float(model.model.norm.weight),
            head=ctypes.pointer(self._head) if self._head is not None else None,
            cos=self._hold(cos), sin=self._hold(sin), k_cache=self.k_cache.data_ptr(), v_cache=self.v_cache.data_ptr(),
        )  # fmt: skip
        self.position = 0

    def _hold(self, tensor: torch.Tensor) -> int:
        tensor = tensor.contiguous()
        self._keep.append(tensor)
        return tensor.data_ptr()

    def _float(self, tensor: torch.Tensor | None) -> int | None:
        return None if tensor is None else self._hold(tensor.detach().float())

    def _c_lookup(self, embed: nn.Module, head: nn.Module) -> cpu_fast.FastPrepared | None:
        """The head's re-laid copy when the embedding is the same 8-bit matrix, unscaled: lookups then decode
        its rows in C (a handful of torch operations per token otherwise)."""
        if self._head is None or not isinstance(embed, QuantEmbedding) or embed.scale is not None:
            return None
        mine, theirs = embed.qtensor, head.qtensor
        if mine.widths != [8] or theirs.widths != [8] or mine.codes[8].data_ptr() != theirs.codes[8].data_ptr():
            return None
        return head.prepared("fast")

    def _rotary_tables(self, max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin (max_len, head_dim) from the model's own rotary module (its scaling included)."""
        rotary = self.model.model.rotary_emb
        probe = torch.zeros(1, 1, self.head_dim)
        cos, sin = rotary(probe, torch.arange(max_len)[None, :])
        return cos[0].float(), sin[0].float()

    def _matrix(self, layer: QuantLinear) -> cpu_fast.Matrix:
        bias = None if layer.bias is None else layer.bias.detach().float().contiguous()
        if bias is not None:
            self._keep.append(bias)
        comp = _compensator(layer)
        dec = None
        if comp is not None:
            dec = cpu_fast.Compensation(
                codes=comp.residual.codes.contiguous(), scales=comp.residual.scales.float().contiguous(),
                k_chunk=comp.k_chunk, weight=None if comp.weight is None else comp.weight.float().contiguous(),
                fixed=None if comp.fixed is None else comp.fixed.to(torch.int64).contiguous(),
            )  # fmt: skip
            self._keep.append(dec)
        prepared = layer.prepared("fast")
        self._keep.append(prepared)
        return prepared.matrix(bias, dec, rotate=True)  # the decoder hands the layer's input as is

    def _layer(self, layer: nn.Module) -> _Layer:
        attention = layer.self_attn
        norms = {
            "attn_norm": self._float(layer.input_layernorm.weight),
            "mlp_norm": self._float(layer.post_attention_layernorm.weight),
            "q_norm": self._float(getattr(getattr(attention, "q_norm", None), "weight", None)),
            "k_norm": self._float(getattr(getattr(attention, "k_norm", None), "weight", None)),
        }
        return _Layer(**{name: self._matrix(layer.get_submodule(PATHS[name])) for name in LINEARS}, **norms)

    def cache_bytes(self) -> int:
        """Bytes of the KV cache (float16, all `max_len` positions)."""
        return sum(t.numel() * t.element_size() for t in (self.k_cache, self.v_cache))

    def reset(self) -> None:
        """Start a new sequence (the cache is overwritten as it fills)."""
        self.position = 0

    @torch.inference_mode()
    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """Feed token ids (1-D, or (1, n)) at the next positions; the last one's logits, float32 (vocab,)."""
        ids = ids.reshape(-1)
        if self.position + ids.numel() > self.max_len:
            raise ValueError(f"the sequence would pass the cache's {self.max_len} positions")
        embed = self.model.get_input_embeddings()
        width = self.vocab if self._head is not None else self.model.config.hidden_size
        out = torch.empty(width, dtype=torch.float32)
        for start in range(0, ids.numel(), PREFILL_CHUNK):
            chunk = ids[start : start + PREFILL_CHUNK]
            if self._embed_rows is not None:
                x = cpu_fast.rows(self._embed_rows, chunk)
            else:
                x = embed(chunk[None, :])[0].float().contiguous()
            status = self._lib.anybit_decode_step(
                ctypes.byref(self._model), x.data_ptr(), chunk.numel(), self.position, out.data_ptr(),
                torch.get_num_threads(),
            )  # fmt: skip
            if status:
                raise MemoryError("the native decoder could not allocate its scratch memory")
            self.position += chunk.numel()
        if self._head is None:  # a dense head: the C step left the final normed hidden state
            head = self.model.get_output_embeddings()
            out = head(out.to(head.weight.dtype)).float()
        return out


def greedy_token(logits: torch.Tensor) -> int:
    """The most likely next token of float32 CPU logits (numpy's argmax: torch's takes about 80 µs over 49,152
    logits, 1 % of a native decode step)."""
    return int(logits.numpy().argmax())


def native_or_warn(model: nn.Module, max_len: int) -> NativeDecoder | None:
    """A native decoder for `model`, or None after one warning saying why the eager loop decodes instead."""
    reason = native_unavailable(model)
    if reason:
        warnings.warn(f"anybit: decoding on the eager path ({reason})", stacklevel=2)
        return None
    return NativeDecoder(model, max_len)
