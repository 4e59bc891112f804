"""anybit directories in transformers: `from_pretrained`, `pipeline`, `generate` and `save_pretrained`, exactly
as anybit's own loader, with every stored tensor checked."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, pipeline

import anybit  # noqa: F401 - registers the quantizer
from anybit.config import QuantConfig
from anybit.errors import AnybitError
from anybit.model.checkpoint import load_quantized, packed_fingerprint
from anybit.pipeline import quantize_to_dir
from anybit.runtime.qlinear import QuantLinear, quant_linears
from damage import damaged_copy

LINEAR = "model.layers.0.self_attn.q_proj"


def _quantize(source: Path, out: Path, corpus: Path, **options) -> Path:
    options = {"method": "anybit", "bits": 3.25, **options}
    config = QuantConfig(**options, nsamples=2, seqlen=32, calib=str(corpus), calib_dtype="float32")
    quantize_to_dir(str(source), config, out, progress=False)
    return out


@pytest.fixture(scope="module")
def anybit_dir(tmp_path_factory, tiny_llama_dir, corpus_file) -> Path:
    return _quantize(tiny_llama_dir, tmp_path_factory.mktemp("hf") / "q", corpus_file)


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return model(ids).logits


def _ids(vocab: int) -> torch.Tensor:
    return torch.randint(0, vocab, (2, 24), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"method": "gptq", "bits": 4, "act_order": True},
        {"method": "squeezellm", "bits": 3},
        {"method": "vq", "bits": 2.5},
    ],
    ids=["anybit", "gptq-act-order", "squeezellm-outliers", "vector-codebooks"],
)
def test_from_pretrained_computes_what_anybit_loads(tiny_model_dir, corpus_file, tmp_path, options) -> None:
    out = _quantize(tiny_model_dir, tmp_path / "q", corpus_file, **options)
    assert json.loads((out / "config.json").read_text())["quantization_config"]["quant_method"] == "anybit"
    ours, _, info = load_quantized(out)
    theirs = AutoModelForCausalLM.from_pretrained(out)
    assert {n for n, _ in quant_linears(theirs)} == set(info["layers"])  # packed, no dense copy of any of them
    assert packed_fingerprint(theirs) == packed_fingerprint(ours)
    ids = _ids(theirs.config.vocab_size)
    assert torch.equal(_logits(theirs, ids), _logits(ours, ids))


def test_pipeline_and_generate(anybit_dir) -> None:
    ours, tokenizer, _ = load_quantized(anybit_dir)
    prompt = tokenizer("The tower is", return_tensors="pt").input_ids
    expected = ours.generate(prompt, max_new_tokens=6, do_sample=False)
    generator = pipeline("text-generation", model=str(anybit_dir))
    assert isinstance(generator.model.get_submodule(LINEAR), QuantLinear)
    assert torch.equal(generator.model.generate(prompt, max_new_tokens=6, do_sample=False), expected)
    text = generator("The tower is", max_new_tokens=6, do_sample=False)[0]["generated_text"]
    assert text == tokenizer.decode(expected[0], skip_special_tokens=True)


def test_save_pretrained_writes_an_anybit_directory(anybit_dir, tmp_path) -> None:
    model = AutoModelForCausalLM.from_pretrained(anybit_dir)
    model.save_pretrained(tmp_path / "again")
    model.save_pretrained(tmp_path / "again")  # replaces its own output
    reloaded, tokenizer, info = load_quantized(tmp_path / "again")
    original = json.loads((anybit_dir / "anybit.json").read_text())
    assert info["bits_per_weight"] == original["bits_per_weight"]
    assert info["method"] == original["method"] and info["source"] == original["source"]
    assert packed_fingerprint(reloaded) == packed_fingerprint(model)
    ids = _ids(model.config.vocab_size)
    assert torch.equal(_logits(reloaded, ids), _logits(model, ids))
    assert tokenizer("The tower").input_ids  # the source directory's tokenizer came along

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(AnybitError, match="refusing to replace"):
        model.save_pretrained(foreign)
    assert (foreign / "notes.txt").read_text() == "mine"


def _codes_key(directory: Path) -> str:
    with safe_open(directory / "model.safetensors", framework="pt") as f:
        return next(k for k in f.keys() if k.startswith(f"{LINEAR}.codes_"))  # noqa: SIM118


@pytest.mark.parametrize(
    "damage,needle",
    [
        (lambda t, codes: t.update({codes: t[codes][:2]}), "{codes}"),
        (lambda t, codes: t.update({codes: t[codes].to(torch.int32)}), "{codes}"),
        (lambda t, codes: t.pop(f"{LINEAR}.bitmap"), f"{LINEAR}.bitmap: missing"),
        (lambda t, codes: t.pop("model.norm.weight"), "no values for model.norm.weight"),
        (lambda t, codes: t.update({"model.extra": torch.zeros(2)}), "unexpected stored tensors model.extra"),
        (lambda t, codes: t.update({"model.norm.weight": t["model.norm.weight"][:3]}), "model.norm.weight: shape"),
        (
            lambda t, codes: t.update({"model.embed_tokens.weight": t["model.embed_tokens.weight"].float()}),
            "model.embed_tokens.weight: stored as float32",
        ),
        (lambda t, codes: t["model.layers.1.input_layernorm.weight"].fill_(float("nan")), "NaN or infinite"),
    ],
    ids=["codes-rows", "codes-dtype", "bitmap-removed", "norm-removed", "extra", "norm-shape", "embed-f32", "nan"],
)
def test_damaged_directories_are_refused_by_from_pretrained(anybit_dir, tmp_path, damage, needle) -> None:
    codes = _codes_key(anybit_dir)
    out = damaged_copy(anybit_dir, tmp_path / "d", lambda t: damage(t, codes))
    with pytest.raises(AnybitError, match="corrupt") as caught:
        AutoModelForCausalLM.from_pretrained(out)
    assert needle.format(codes=codes) in str(caught.value)


def test_importing_anybit_is_enough_and_stays_light(anybit_dir) -> None:
    """In a fresh interpreter: `import anybit` imports no transformers, and a later from_pretrained loads packed."""
    script = (
        "import sys, anybit\n"
        "assert 'transformers' not in sys.modules and 'torch' not in sys.modules\n"
        "from transformers import AutoModelForCausalLM\n"
        f"model = AutoModelForCausalLM.from_pretrained({str(anybit_dir)!r})\n"
        f"print(type(model.get_submodule({LINEAR!r})).__name__)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "QuantLinear"
