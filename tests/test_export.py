"""GPTQ with one width per linear from a model-wide budget (`--scope model`), and export to the GPTQ checkpoint
layout, read back by a reader written here from the layout's description (AutoGPTQ's packing: 32/b codes per
int32 word along the input dimension, low bits first; 3-bit codes span three words; zeros stored minus one),
not from the exporter."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from anybit.cli import main
from anybit.config import QuantConfig
from anybit.format.gptq import gptq_tensors
from anybit.methods import get_method
from anybit.model.checkpoint import load_quantized
from anybit.quant.gptq import gptq_quantize
from anybit.quant.uniform import UniformColumnQuantizer, rtn_quantize
from anybit.runtime.qlinear import quant_linears

LINEAR = "model.layers.0.self_attn.q_proj"


def _run(*args: object):
    return CliRunner().invoke(main, [str(a) for a in args])


# ---- an independent GPTQ reader ---------------------------------------------------------------------------
def _unpack_3bit(words: torch.Tensor) -> torch.Tensor:
    """(3k, m) int32 words -> (32k, m): AutoGPTQ's 3-bit scheme, three words per 32 codes."""
    w = words.to(torch.int64) & 0xFFFFFFFF
    out = []
    for block in range(w.shape[0] // 3):
        w0, w1, w2 = w[3 * block], w[3 * block + 1], w[3 * block + 2]
        vals = [(w0 >> (3 * j)) & 7 for j in range(10)]
        vals.append(((w0 >> 30) & 3) | ((w1 & 1) << 2))
        vals += [(w1 >> (3 * j + 1)) & 7 for j in range(10)]
        vals.append(((w1 >> 31) & 1) | ((w2 & 3) << 1))
        vals += [(w2 >> (3 * j + 2)) & 7 for j in range(10)]
        out += vals
    return torch.stack(out)


def _unpack(words: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes packed along dim 0 of int32 words, as AutoGPTQ reads them."""
    if bits == 3:
        return _unpack_3bit(words)
    per_word = 32 // bits
    w = words.to(torch.int64) & 0xFFFFFFFF
    shifts = torch.arange(per_word) * bits
    return ((w[:, None, :] >> shifts[None, :, None]) & ((1 << bits) - 1)).reshape(-1, words.shape[1])


def read_gptq_weight(tensors: dict[str, torch.Tensor], bits: int, v2: bool = False) -> torch.Tensor:
    """The float32 (out, in) weight of one exported linear: scales[g] * (q - (qzeros[g] + 1)), v2 without the + 1."""
    q = _unpack(tensors["qweight"], bits)  # (in, out)
    zeros = _unpack(tensors["qzeros"].t(), bits).t() + (0 if v2 else 1)  # (groups, out)
    g_idx = tensors["g_idx"].long()
    scales = tensors["scales"].float()
    return (scales[g_idx] * (q - zeros[g_idx]).float()).t()


# ---- the exporter's tensors, one matrix at a time ----------------------------------------------------------
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("layout", ["group", "act-order", "per-channel", "sym"])
def test_exported_tensors_read_back_exactly(bits: int, layout: str) -> None:
    W = torch.randn(96, 128)
    gs = 128 if layout == "per-channel" else 32
    bitmap = torch.full((96, 128 // gs), bits, dtype=torch.uint8)
    if layout == "act-order":
        X = torch.randn(512, 128) * torch.linspace(0.1, 3, 128)
        quantizer = UniformColumnQuantizer(96, 128, gs, bitmap)
        result = gptq_quantize(W, X.t() @ X, quantizer, act_order=True)
        qt = quantizer.to_qtensor((96, 128), perm=result.perm)
        assert qt.perm is not None
    else:
        qt = rtn_quantize(W, gs, bitmap, symmetric=layout == "sym")
    tensors, width, group = gptq_tensors(qt)
    assert (width, group) == (bits, gs)
    assert tensors["qweight"].dtype == tensors["qzeros"].dtype == tensors["g_idx"].dtype == torch.int32
    assert tuple(tensors["qweight"].shape) == (128 * bits // 32, 96)
    assert tuple(tensors["qzeros"].shape) == (128 // gs, 96 * bits // 32)
    assert tensors["scales"].dtype == torch.float16 and tuple(tensors["scales"].shape) == (128 // gs, 96)
    assert torch.equal(read_gptq_weight(tensors, bits), qt.dequantize())
    v2, _, _ = gptq_tensors(qt, "gptq_v2")
    assert torch.equal(read_gptq_weight(v2, bits, v2=True), qt.dequantize())


def test_layouts_the_gptq_format_cannot_hold_are_refused() -> None:
    W = torch.randn(64, 64)
    mixed = torch.tensor([[2, 3]], dtype=torch.uint8).expand(64, 2)
    with pytest.raises(ValueError, match="different widths"):
        gptq_tensors(rtn_quantize(W, 32, mixed))
    positive = rtn_quantize(W.abs() + 0.5, 32, torch.full((64, 2), 4, dtype=torch.uint8))  # zero points 0
    with pytest.raises(ValueError, match="zero point 0"):  # v1 stores zero - 1
        gptq_tensors(positive)
    tensors, _, _ = gptq_tensors(positive, "gptq_v2")
    assert torch.equal(read_gptq_weight(tensors, 4, v2=True), positive.dequantize())


# ---- end to end ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def model_scope_dir(tmp_path_factory, tiny_llama_dir, corpus_file) -> Path:
    out = tmp_path_factory.mktemp("export") / "q"
    result = _run("quantize", tiny_llama_dir, "--method", "gptq", "--bits", 3.5, "--scope", "model", "--group", 32,
                  "--act-order", "--calib", corpus_file, "--nsamples", 4, "--seqlen", 64, "--calib-dtype", "float32",
                  "--out", out)  # fmt: skip
    assert result.exit_code == 0, result.output
    return out


def test_model_scope_gives_each_linear_one_width_within_the_budget(model_scope_dir) -> None:
    info = json.loads((model_scope_dir / "anybit.json").read_text())
    assert info["bits_per_weight"] <= 3.5
    assert info["bits_per_weight"] > 3.5 - 0.5  # the budget is spent, not left unused
    model, _, _ = load_quantized(model_scope_dir)
    widths = {name: module.qtensor.widths for name, module in quant_linears(model)}
    assert all(len(w) == 1 and w[0] in get_method("gptq").MODEL_WIDTHS for w in widths.values())
    assert len({w[0] for w in widths.values()}) > 1, widths


def test_a_budget_below_the_narrowest_widths_fails_before_any_work(tiny_llama_dir, corpus_file, tmp_path) -> None:
    result = _run("quantize", tiny_llama_dir, "--method", "gptq", "--bits", 2.2, "--scope", "model", "--group", 32,
                  "--calib", corpus_file, "--nsamples", 2, "--seqlen", 32, "--out", tmp_path / "q")  # fmt: skip
    assert result.exit_code != 0 and len(result.output.strip().splitlines()) == 1, result.output
    assert "below the model's minimum" in result.output
    assert not (tmp_path / "q").exists()


def test_export_holds_exactly_anybits_weights(model_scope_dir, tmp_path) -> None:
    out = tmp_path / "gptq"
    result = _run("export", model_scope_dir, "--format", "gptq", "--out", out)
    assert result.exit_code == 0, result.output
    qconfig = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qconfig["quant_method"] == "gptq" and qconfig["desc_act"]
    v2 = qconfig["checkpoint_format"] == "gptq_v2"  # only where a group has zero point 0 (next test)
    stored = load_file(out / "model.safetensors")
    model, _, _ = load_quantized(model_scope_dir)
    for name, module in quant_linears(model):
        bits, group = qconfig["bits"], qconfig["group_size"]
        for pattern, override in qconfig.get("dynamic", {}).items():
            assert pattern.startswith("+:")
            if re.match(pattern[2:], name):
                bits, group = override["bits"], override["group_size"]
        assert [bits] == module.qtensor.widths and group == module.qtensor.group_size
        tensors = {k.removeprefix(f"{name}."): v for k, v in stored.items() if k.startswith(f"{name}.")}
        assert torch.equal(read_gptq_weight(tensors, bits, v2), module.dequantize()), name
    assert stored["model.embed_tokens.weight"].dtype == torch.float16
    assert "lm_head.weight" not in stored  # tied to the embedding, as in the source


def test_zero_points_of_0_are_exported_exactly_in_the_v2_convention(tiny_llama_dir, tmp_path) -> None:
    """v1 stores zero - 1, so a group whose zero point is 0 (all its weights >= 0) needs gptq_v2: the export
    says so and switches, keeping the weights exact."""
    from transformers import AutoModelForCausalLM

    source = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    with torch.no_grad():
        source.get_submodule(LINEAR).weight.abs_()
    source.save_pretrained(tmp_path / "positive")
    shutil.copy(tiny_llama_dir / "tokenizer.json", tmp_path / "positive")
    shutil.copy(tiny_llama_dir / "tokenizer_config.json", tmp_path / "positive")
    quantized = tmp_path / "q"
    assert (
        _run(
            "quantize", tmp_path / "positive", "--method", "rtn", "--bits", 4, "--group", 32, "--out", quantized
        ).exit_code
        == 0
    )
    result = _run("export", quantized, "--format", "gptq", "--out", tmp_path / "gptq")
    assert result.exit_code == 0, result.output
    assert "gptq_v2" in result.output and "zero point 0" in result.output
    qconfig = json.loads((tmp_path / "gptq" / "config.json").read_text())["quantization_config"]
    assert qconfig["checkpoint_format"] == "gptq_v2"
    stored = load_file(tmp_path / "gptq" / "model.safetensors")
    model, _, _ = load_quantized(quantized)
    tensors = {k.removeprefix(f"{LINEAR}."): v for k, v in stored.items() if k.startswith(f"{LINEAR}.")}
    assert torch.equal(read_gptq_weight(tensors, 4, v2=True), model.get_submodule(LINEAR).dequantize())


def test_export_refusals_are_one_line_and_touch_nothing(model_scope_dir, tiny_llama_dir, corpus_file, tmp_path) -> None:
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "notes.txt").write_text("mine")
    result = _run("export", model_scope_dir, "--out", existing)
    assert result.exit_code != 0 and "already exists" in result.output
    assert (existing / "notes.txt").read_text() == "mine"

    codebooks = tmp_path / "kmeans"
    config = ["--method", "kmeans", "--bits", 3, "--calib", corpus_file, "--nsamples", 2, "--seqlen", 32]
    assert _run("quantize", tiny_llama_dir, *config, "--out", codebooks).exit_code == 0
    result = _run("export", codebooks, "--out", tmp_path / "never")
    assert result.exit_code != 0 and len(result.output.strip().splitlines()) == 1, result.output
    assert "holds codebooks" in result.output
    assert not (tmp_path / "never").exists() and not list(tmp_path.glob(".never*"))


def test_model_scope_is_accepted_only_where_an_allocation_exists() -> None:
    QuantConfig(method="gptq", bits=3.5, scope="model")
    with pytest.raises(Exception, match="integer bit width"):
        QuantConfig(method="gptq", bits=3.5)
    with pytest.raises(Exception, match="--scope is not an option of method 'rtn'"):
        QuantConfig(method="rtn", bits=4, scope="model")
