"""Prefill and decode speed of a (quantized) model: what `anybit bench` measures."""

from __future__ import annotations

import inspect
import statistics
import time
from dataclasses import asdict, dataclass

import torch

from anybit.errors import AnybitError


@dataclass
class SpeedResult:
    device: str
    dtype: str
    prompt_tokens: int
    new_tokens: int
    repeats: int
    prefill_tokens_per_s: float  # median over repeats
    decode_tokens_per_s: float  # median over repeats, one token per forward (batch 1, KV cache)
    decode_ms_per_token: float
    cuda_graph: bool  # decode steps replayed from a CUDA graph (static KV cache)
    decoder: str  # "native" (each step in C, `runtime.native`) or "eager" (Hugging Face's forward)
    prompt_path: str | None  # how the fast CPU kernel multiplied the prompt (`kernels.cpu_fast.prompt_path`)
    tensor_bytes: int  # parameters and buffers the model holds, shared ones once
    kernel_bytes: int  # what the kernels hold besides them (the fast CPU kernel's re-laid codes and tables)
    kv_cache_bytes: int | None  # the native decoder's KV cache (float16, every position); None on other decoders
    peak_gpu_bytes: int | None  # CUDA only: peak allocated during the runs

    def to_dict(self) -> dict:
        return asdict(self)


def prompt_path(model: torch.nn.Module, device: torch.device, tokens: int) -> str | None:
    """How a prompt of `tokens` has its quantized products multiplied by the fast CPU kernel ("tiles",
    "registers" or "rows"; `kernels.cpu_fast.prompt_path`), None when no layer is on that kernel. Vector-coded
    layers multiply their float input row by row whatever the path."""
    from anybit.kernels import cpu_fast
    from anybit.runtime.qlinear import QuantLinear

    if device.type != "cpu" or not any(
        isinstance(m, QuantLinear) and m.backend(device) == "fast" for m in model.modules()
    ):
        return None
    return cpu_fast.prompt_path() if tokens >= cpu_fast.TILE_MIN_TOKENS else "rows"


def tensor_bytes(model: torch.nn.Module) -> int:
    """Bytes of every parameter and buffer of `model`, tied tensors counted once."""
    seen, total = set(), 0
    for t in [*model.parameters(), *model.buffers()]:
        key = (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), t.numel())
        if key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()
    return total


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _cache_argument(model: torch.nn.Module) -> str:
    """The KV cache argument and output field: "cache" in newer transformers, "past_key_values" before."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


class StaticDecoder:
    """Greedy batch-1 decoding on a static KV cache: each step is one forward on fixed buffers that writes
    the next token in place, the form a CUDA graph can capture. With `graph` (CUDA only) every step
    replays one graph captured at construction."""

    def __init__(self, model: torch.nn.Module, max_len: int, graph: bool = False) -> None:
        from transformers import StaticCache

        param = next(model.parameters())
        if graph and param.device.type != "cuda":
            raise AnybitError("CUDA graphs need the model on a CUDA device")
        self.model = model
        # transformers 5 takes (config, max_cache_len) and sizes the cache lazily; 4.x also batch, device, dtype
        wanted = dict(
            config=model.config, max_cache_len=max_len, max_batch_size=1, device=param.device, dtype=param.dtype
        )
        accepted = inspect.signature(StaticCache.__init__).parameters
        if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in accepted.values()):
            wanted = {key: value for key, value in wanted.items() if key in accepted}
        self.cache = StaticCache(**wanted)
        self.cache_name = _cache_argument(model)
        self.positional = "cache_position" in inspect.signature(model.forward).parameters  # transformers 4.x
        self.token = torch.zeros(1, 1, dtype=torch.long, device=param.device)
        self.position = torch.zeros(1, dtype=torch.long, device=param.device)
        self.graph: torch.cuda.CUDAGraph | None = None
        if graph:
            self._capture()

    def _logits(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        kwargs = {self.cache_name: self.cache, "use_cache": True}
        if self.positional:
            kwargs["cache_position"] = positions
        return self.model(ids, **kwargs).logits

    def prefill(self, ids: torch.Tensor) -> torch.Tensor:
        """Empty the cache, run the prompt (1, n) and hold its greedy next token (returned: the held buffer)."""
        self.cache.reset()
        logits = self._logits(ids, torch.arange(ids.shape[1], device=ids.device))
        self.token.copy_(logits[:, -1:].argmax(dim=-1))
        self.position.fill_(ids.shape[1])
        return self.token

    def _step(self) -> None:
        logits = self._logits(self.token, self.position)
        self.token.copy_(logits[:, -1:].argmax(dim=-1))
        self.position.add_(1)

    def step(self) -> torch.Tensor:
        """Feed the held token, hold the next greedy one (returned: the held buffer, overwritten next step)."""
        if self.graph is None:
            self._step()
        else:
            self.graph.replay()
        return self.token

    def _capture(self) -> None:
        self.prefill(self.token)  # a one-token prompt allocates the cache; prefill() empties it again later
        warmup = torch.cuda.Stream(self.token.device)
        warmup.wait_stream(torch.cuda.current_stream(self.token.device))
        with torch.cuda.stream(warmup):  # compile and autotune kernels, allocate their buffers
            for _ in range(2):
                self._step()
        torch.cuda.current_stream(self.token.device).wait_stream(warmup)
        self.graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(self.graph):
                self._step()
        except RuntimeError as exc:  # e.g. a host sync inside the model's forward (transformers version dependent)
            first_line = (str(exc).strip() or type(exc).__name__).splitlines()[0]
            raise AnybitError(
                f"the decode step cannot be captured in a CUDA graph ({first_line}); run without --cuda-graph"
            ) from exc


def kernel_bytes(model: torch.nn.Module) -> int:
    """Bytes the kernels' prepared copies hold (the fast CPU kernel's re-laid codes and tables)."""
    from anybit.runtime.qlinear import quant_linears

    total = 0
    for _, layer in quant_linears(model, runtime=True):
        prepared = layer._prepared.get("fast")
        total += prepared.nbytes() if prepared is not None else 0
    return total


@torch.inference_mode()
def decode_speed(
    model: torch.nn.Module,
    prompt_tokens: int = 128,
    new_tokens: int = 32,
    repeats: int = 3,
    device: str = "cpu",
    seed: int = 0,
    cuda_graph: bool = False,
    decoder: str = "native",
) -> SpeedResult:
    """Time one prefill of `prompt_tokens` random tokens, then `new_tokens` greedy decode steps; with
    `cuda_graph`, on a static KV cache with every decode step replayed from one CUDA graph; with
    `decoder="native"` on the CPU, each step in C where the model is served (else eagerly, after a warning).

    A first untimed run warms up kernels and caches; the figures are medians over `repeats` runs.
    """
    if prompt_tokens < 1 or new_tokens < 1 or repeats < 1:
        raise AnybitError("--prompt-tokens, --new-tokens and --repeats must be positive")
    model = model.to(device)
    dev = torch.device(device)
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (1, prompt_tokens), generator=torch.Generator().manual_seed(seed)).to(dev)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    native = None
    if decoder == "native" and dev.type == "cpu" and not cuda_graph:
        from anybit.runtime.native import greedy_token, native_or_warn

        native = native_or_warn(model, prompt_tokens + new_tokens + 1)
    if native is not None:

        def run_prefill() -> object:
            native.reset()
            return native.forward(ids[0])

        def run_decode(logits: object) -> None:
            for _ in range(new_tokens):
                logits = native.forward(torch.tensor([greedy_token(logits)]))

    elif cuda_graph:
        static = StaticDecoder(model, prompt_tokens + new_tokens + 1, graph=True)

        def run_prefill() -> object:
            return static.prefill(ids)

        def run_decode(_prefilled: object) -> None:
            for _ in range(new_tokens):
                static.step()

    else:
        cache_name = _cache_argument(model)

        def run_prefill() -> object:
            return model(ids, use_cache=True)

        def run_decode(out: object) -> None:
            past, token = getattr(out, cache_name), out.logits[:, -1:].argmax(dim=-1)
            for _ in range(new_tokens):
                out = model(token, use_cache=True, **{cache_name: past})
                past, token = getattr(out, cache_name), out.logits[:, -1:].argmax(dim=-1)

    prefill, decode = [], []
    for run in range(repeats + 1):
        _sync(dev)
        start = time.perf_counter()
        prefilled = run_prefill()
        _sync(dev)
        mid = time.perf_counter()
        run_decode(prefilled)
        _sync(dev)
        end = time.perf_counter()
        if run:  # run 0 is the warm-up
            prefill.append(mid - start)
            decode.append(end - mid)
    decode_s = statistics.median(decode)
    return SpeedResult(
        device=str(dev),
        dtype=str(next(model.parameters()).dtype).removeprefix("torch."),
        prompt_tokens=prompt_tokens,
        new_tokens=new_tokens,
        repeats=repeats,
        prefill_tokens_per_s=prompt_tokens / statistics.median(prefill),
        decode_tokens_per_s=new_tokens / decode_s,
        decode_ms_per_token=1000 * decode_s / new_tokens,
        cuda_graph=cuda_graph,
        decoder="native" if native is not None else "eager",
        prompt_path=prompt_path(model, dev, prompt_tokens),
        tensor_bytes=tensor_bytes(model),
        kernel_bytes=kernel_bytes(model),
        kv_cache_bytes=None if native is None else native.cache_bytes(),
        peak_gpu_bytes=torch.cuda.max_memory_allocated(dev) if dev.type == "cuda" else None,
    )
