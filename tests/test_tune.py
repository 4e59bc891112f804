import json

import pytest
import torch
from click.testing import CliRunner

from anybit.cli import main
from anybit.config import QuantConfig
from anybit.errors import AnybitError
from anybit.layerwise import capture_layer_inputs, run_layer
from anybit.methods import get_method
from anybit.model.adapters import get_adapter, get_submodule, set_submodule
from anybit.model.loading import load_model
from anybit.runtime.qlinear import QuantLinear, quant_linears, set_kernel
from anybit.tune import tune_layer


def _quantized_first_layer(model_dir, method: str, bits: float):
    """The tiny model's first decoder layer with its linears quantized (RTN-style, no statistics needed for
    rtn; gptq/skim get XᵀX from the captured inputs), its inputs and the unquantized layer's outputs."""
    from anybit.calibrate import _collect_stats

    model = load_model(str(model_dir)).model
    adapter = get_adapter(model)
    windows = torch.randint(0, model.config.vocab_size, (16, 128), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        hidden, args, kwargs = capture_layer_inputs(model, adapter, windows, torch.device("cpu"), torch.float32)
        layer = adapter.layers(model)[0]
        quant = get_method(method)
        groups = {"group_size": 0} if quant.takes("group_size") else {}
        config = QuantConfig(method=method, bits=bits, scope="matrix" if method == "skim" else None, **groups)
        stats, target = _collect_stats(layer, adapter, hidden, args, kwargs, quant, config)
        for name in adapter.linear_names:
            W = adapter.weight_of(get_submodule(layer, name)).clone()
            linear = QuantLinear(quant.quantize(W, stats[name], config), None)
            linear.kernel = "exact"
            set_submodule(layer, name, linear)
    return layer, hidden, target, args, kwargs


@pytest.mark.parametrize(("method", "bits", "gain"), [("gptq", 2, 0.9), ("skim", 2.5, 0.995)])
def test_tuning_lowers_the_held_out_error_and_keeps_the_codes(
    tiny_llama_dir, method: str, bits: float, gain: float
) -> None:
    """On a random tiny layer K-means codebooks leave less to tune than a uniform grid's scales."""
    layer, hidden, target, args, kwargs = _quantized_first_layer(tiny_llama_dir, method, bits)
    stored = {name: module.qtensor for name, module in quant_linears(layer)}
    norm_before = layer.input_layernorm.weight.detach().clone()
    result = tune_layer(layer, hidden, target, args, kwargs, steps=30, lr=3e-4)
    assert result.kept and result.after < gain * result.before
    with torch.inference_mode():
        out = run_layer(layer, hidden, args, kwargs)
    check = slice(hidden.shape[0] - 4, None)  # the held-out windows (CHECK_WINDOWS)
    measured = float((out[check] - target[check]).square().sum() / target[check].square().sum())
    assert measured == pytest.approx(result.after, rel=1e-3)  # what is stored is what was judged (fp16 rounding)
    for name, module in quant_linears(layer):
        old, new = stored[name], module.qtensor
        assert all(torch.equal(old.codes[b], new.codes[b]) for b in old.codes)  # codes fixed
        assert torch.equal(old.bitmap, new.bitmap)
        assert new.storage_bits() == old.storage_bits()  # counted bits unchanged
        values = new.codebooks.values() if new.kind == "codebook" else [new.scales]
        assert all(v.dtype == torch.float16 and not v.requires_grad for v in values)
    assert not torch.equal(norm_before, layer.input_layernorm.weight)  # the norms are tuned too
    assert not any(p.requires_grad for p in layer.parameters())


def test_a_layer_that_tuning_does_not_improve_is_left_exactly_as_it_was(tiny_llama_dir) -> None:
    layer, hidden, target, args, kwargs = _quantized_first_layer(tiny_llama_dir, "gptq", 3)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    result = tune_layer(layer, hidden, target, args, kwargs, steps=0, lr=3e-3)
    assert not result.kept and result.after == result.before
    after = layer.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert all(isinstance(m, QuantLinear) for m in (layer.self_attn.q_proj, layer.mlp.down_proj))


def test_tuning_options_are_checked() -> None:
    with pytest.raises(AnybitError, match="no calibration data"):
        QuantConfig(method="rtn", tune_steps=8)
    with pytest.raises(AnybitError, match="at least 2 calibration windows"):
        QuantConfig(method="gptq", nsamples=1, tune_steps=8)
    with pytest.raises(AnybitError, match="--tune-lr"):
        QuantConfig(method="gptq", tune_steps=8, tune_lr=0.0)
    with pytest.raises(AnybitError, match="--tune-steps"):
        QuantConfig(method="gptq", tune_steps=-1)


def test_tuned_quantization_end_to_end(tiny_llama_dir, corpus_file, tmp_path) -> None:
    """`--tune-steps` through the CLI: every layer's tuning is recorded, and the tuned model's perplexity on its
    calibration text is no worse than the untuned one's."""
    args = ["--calib", str(corpus_file), "--seqlen", "64", "--nsamples", "6", "--method", "anybit", "--bits", "2.5"]
    ppl = {}
    for steps in (0, 20):
        out = tmp_path / f"q{steps}"
        cmd = ["quantize", str(tiny_llama_dir), *args, "--tune-steps", str(steps), "--tune-lr", "3e-3"]
        result = CliRunner().invoke(main, [*cmd, "--out", str(out)])
        assert result.exit_code == 0, result.output
        info = json.loads((out / "anybit.json").read_text())
        tuning = info.get("tuning", [])
        assert len(tuning) == (2 if steps else 0)  # the tiny llama has two decoder layers
        assert all(t["after"] <= t["before"] for t in tuning)
        result = CliRunner().invoke(main, ["inspect", str(out)])
        assert result.exit_code == 0, result.output
        assert ("2 of 2 layers kept" in result.output) == bool(steps and all(t["kept"] for t in tuning))
        result = CliRunner().invoke(main, ["eval", str(out), "--dataset", str(corpus_file), "--seqlen", "64"])
        assert result.exit_code == 0, result.output
        ppl[steps] = float(result.output.split("ppl")[1].split()[0].strip(":= "))
    assert ppl[20] < ppl[0] * 1.02


def test_end_to_end_tuning_lowers_the_held_out_kl_and_keeps_the_codes(tiny_llama_dir, tmp_path, corpus_file) -> None:
    """`anybit tune` on a 2-bit RTN model of the tiny Llama: the held-out KL to the source goes down, the
    written model scores what was recorded, and codes and counted bits are those of the input directory."""
    from anybit.data import calibration_windows
    from anybit.pipeline import corpus_ids
    from anybit.tune import _mean_kl

    quantized, tuned = str(tmp_path / "q"), str(tmp_path / "t")
    runner = CliRunner()
    done = runner.invoke(main, ["quantize", str(tiny_llama_dir), "--method", "rtn", "--bits", "2", "--out", quantized])
    assert done.exit_code == 0, done.output
    options = ["--steps", "24", "--lr", "1e-3", "--nsamples", "12", "--seqlen", "64", "--calib", str(corpus_file)]
    done = runner.invoke(main, ["tune", quantized, "--out", tuned, *options])
    assert done.exit_code == 0, done.output
    record = json.loads((tmp_path / "t" / "anybit.json").read_text())["end_to_end_tuning"]
    assert record["kept"] and record["after"] < 0.95 * record["before"], record
    before, after = load_model(quantized), load_model(tuned)
    for loaded in (before, after):
        set_kernel(loaded.model, "reference")  # the products tuning judged with: decoded weights, float32
    windows = calibration_windows(corpus_ids(before, str(corpus_file)), 12, 64, seed=0)[-4:]
    teacher = load_model(str(tiny_llama_dir)).model
    assert _mean_kl(after.model, teacher, windows) == pytest.approx(record["after"], rel=1e-3)  # fp16 stored
    assert _mean_kl(before.model, teacher, windows) == pytest.approx(record["before"], rel=1e-6)
    old, new = dict(quant_linears(before.model)), dict(quant_linears(after.model))
    assert old.keys() == new.keys()
    for name in old:
        assert all(torch.equal(old[name].qtensor.codes[b], new[name].qtensor.codes[b]) for b in old[name].qtensor.codes)
        assert old[name].qtensor.storage_bits() == new[name].qtensor.storage_bits()
    assert torch.equal(before.model.get_input_embeddings().weight, after.model.get_input_embeddings().weight)
    inspected = runner.invoke(main, ["inspect", tuned])
    assert "tuned end to end (24 steps)" in inspected.output
    again = str(tmp_path / "t2")  # a second pass keeps the first one's record
    short = ["--steps", "2", *options[2:]]
    assert runner.invoke(main, ["tune", tuned, "--out", again, *short]).exit_code == 0
    second = json.loads((tmp_path / "t2" / "anybit.json").read_text())["end_to_end_tuning"]
    assert second["steps"] == 2 and second["earlier"] == [record]
    inspected = runner.invoke(main, ["inspect", again]).output
    assert inspected.index("tuned end to end (24 steps)") < inspected.index("tuned end to end (2 steps)")
    refused = runner.invoke(main, ["tune", quantized, "--out", quantized, "--force", *options])
    assert refused.exit_code != 0 and "source model" in refused.output
    assert runner.invoke(main, ["tune", str(tiny_llama_dir), "--out", str(tmp_path / "x")]).exit_code != 0
    if not torch.cuda.is_available():  # a device that is not here: one line, before any work, nothing written
        refused = runner.invoke(main, ["tune", quantized, "--out", str(tmp_path / "y"), "--device", "cuda"])
        assert refused.exit_code != 0 and "CUDA is not available" in refused.output
        assert not (tmp_path / "y").exists()
