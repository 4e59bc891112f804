"""CLI behaviour: bad input gets a one-line message, a non-zero exit, and leaves nothing behind."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from safetensors import safe_open
from safetensors.torch import save_file

from anybit.cli import main
from anybit.errors import AnybitError


def _run(*args: str):
    return CliRunner().invoke(main, list(args))


def _assert_clean_error(result, needle: str) -> None:
    assert result.exit_code != 0
    assert needle in result.output
    assert "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1


@pytest.mark.parametrize(
    "args,needle",
    [
        (["quantize", "/no/such/model", "--out", "{out}"], "model not found"),
        (["quantize", "{model}", "--method", "nope", "--out", "{out}"], "unknown method 'nope'"),
        (["quantize", "{model}", "--bits", "9", "--out", "{out}"], "bit budget in 1.5-8"),
        (["quantize", "{model}", "--method", "gptq", "--bits", "3.5", "--out", "{out}"], "integer bit width"),
        (["quantize", "{model}", "--method", "gptq", "--group", "48", "--out", "{out}"], "does not divide"),
        (["quantize", "{model}", "--calib", "/no/such.txt", "--out", "{out}"], "dataset not found"),
        (["eval", "/no/such/dir"], "model not found"),
        (["inspect", "{model}"], "not a readable anybit directory"),
    ],
    ids=[
        "missing-model",
        "unknown-method",
        "bits-range",
        "fractional-bits",
        "group",
        "calib",
        "eval-missing",
        "inspect-foreign",
    ],
)
def test_bad_input(args, needle, tiny_llama_dir, tmp_path) -> None:
    out = tmp_path / "out"
    args = [a.format(model=tiny_llama_dir, out=out) for a in args]
    _assert_clean_error(_run(*args), needle)
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")], "temporary output left behind"


def test_unsupported_architecture(tmp_path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert", "architectures": ["BertModel"]}))
    result = _run("eval", str(tmp_path))
    _assert_clean_error(result, "unsupported architecture 'bert'")
    assert "llama" in result.output


def test_corrupt_quantized_dir(tiny_llama_dir, corpus_file, tmp_path) -> None:
    out = tmp_path / "q"
    ok = _run("quantize", str(tiny_llama_dir), "--method", "rtn", "--bits", "4", "--group", "32", "--out", str(out))
    assert ok.exit_code == 0, ok.output
    _assert_clean_error(_run("quantize", str(tiny_llama_dir), "--method", "rtn", "--out", str(out)), "already exists")
    inspected = json.loads(_run("inspect", str(out), "--json").stdout)
    # 4-bit codes, fp16 scale + 4-bit zero per 32 weights, one byte of bit map per (tiny) matrix
    assert inspected["bits_per_weight"] == pytest.approx(4 + 20 / 32, abs=5e-3)
    weights = out / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    _assert_clean_error(_run("eval", str(out), "--dataset", str(corpus_file), "--seqlen", "32"), "corrupt")


@pytest.mark.parametrize("damage", ["fit_k", "codes", "truncated"])
def test_corrupt_residual_file(damage, tiny_llama_dir, corpus_file, tmp_path) -> None:
    out = tmp_path / "q"
    ok = _run("quantize", str(tiny_llama_dir), "--method", "rtn", "--bits", "2", "--group", "32", "--out", str(out),
              "--residual", "--calib", str(corpus_file), "--seqlen", "32", "--nsamples", "2")  # fmt: skip
    assert ok.exit_code == 0, ok.output
    path = out / "residuals.safetensors"
    if damage == "truncated":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    else:
        with safe_open(path, framework="pt") as f:
            metadata, tensors = f.metadata(), {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118
        if damage == "fit_k":
            metadata["residual"] = json.dumps({**json.loads(metadata["residual"]), "fit_k": "mlp=4"})
        else:
            key = next(key for key in tensors if key.endswith("residual_codes"))
            tensors[key] = tensors[key][:, :-1].contiguous()
        save_file(tensors, path, metadata=metadata)
    evaluated = _run("eval", str(out), "--dataset", str(corpus_file), "--seqlen", "32", "--dec", "8")
    _assert_clean_error(evaluated, "corrupt residual file")


def test_console_script_error_exit(tmp_path) -> None:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(
        [sys.executable, "-m", "anybit.cli", "eval", str(tmp_path / "missing")], capture_output=True, text=True, env=env
    )
    assert proc.returncode == 1
    assert proc.stderr.strip().startswith("Error: model not found")
    assert "Traceback" not in proc.stderr


def test_eval_json(tiny_llama_dir, corpus_file) -> None:
    result = _run(
        "eval", str(tiny_llama_dir), "--dataset", str(corpus_file), "--seqlen", "64", "--max-windows", "2", "--json"
    )
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["windows"] == 2 and out["tokens"] == 2 * 63 and out["ppl"] > 1


def test_config_file(tiny_llama_dir, tmp_path) -> None:
    cfg = tmp_path / "q.toml"
    cfg.write_text('method = "rtn"\nbits = 3\ngroup_size = 32\n')
    out = tmp_path / "q"
    result = _run("quantize", str(tiny_llama_dir), "--config", str(cfg), "--bits", "2", "--out", str(out))
    assert result.exit_code == 0, result.output
    info = json.loads((Path(out) / "anybit.json").read_text())
    assert info["config"]["method"] == "rtn" and info["config"]["bits"] == 2 and info["config"]["group_size"] == 32


def test_compare_prints_table(tiny_llama_dir, corpus_file, tmp_path) -> None:
    out = tmp_path / "q"
    result = _run(
        "compare", str(tiny_llama_dir), "--method", "gptq", "--bits", "4", "--group", "32", "--calib", str(corpus_file),
        "--nsamples", "4", "--seqlen", "64", "--dataset", str(corpus_file), "--max-windows", "3", "--out", str(out),
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    lines = result.stdout.strip().splitlines()
    assert lines[0].startswith("wikitext2") is False and "3 windows of 64 tokens" in lines[0]
    fp_row, q_row = lines[-2].split(), lines[-1].split()
    assert fp_row[:3] == ["none", "(fp16)", "16.0000"]
    assert q_row[:3] == ["gptq", "4-bit", "g32"] and float(q_row[3]) == pytest.approx(4 + 20 / 32, abs=5e-3)
    assert (out / "anybit.json").is_file()


def test_generate_is_deterministic_and_streams(tiny_llama_dir, tmp_path) -> None:
    from anybit.generate import generate
    from anybit.model import load_model

    loaded = load_model(str(tiny_llama_dir))
    a = generate(loaded, "The history of", max_new_tokens=12, quiet=True)
    b = generate(loaded, "The history of", max_new_tokens=12, quiet=True)
    assert a == b and len(a) > 0
    result = _run("generate", str(tiny_llama_dir), "--prompt", "The history of", "--max-new-tokens", "12")
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == a.strip()
    _assert_clean_error(_run("generate", str(tiny_llama_dir), "--prompt", "hi", "--chat"), "chat template")


def _quantize_rtn3(model_dir: Path, out: Path) -> Path:
    """A quick 3-bit group-32 RTN directory of the tiny model."""
    result = _run("quantize", str(model_dir), "--method", "rtn", "--bits", "3", "--group", "32", "--out", str(out))
    assert result.exit_code == 0, result.output
    return out


def test_generate_with_dense_cache_matches_packed(tiny_llama_dir, tmp_path) -> None:
    out = _quantize_rtn3(tiny_llama_dir, tmp_path / "q")
    args = ["generate", str(out), "--prompt", "The history of", "--max-new-tokens", "10"]
    packed, cached = _run(*args), _run(*args, "--dense-cache")
    assert packed.exit_code == 0 and cached.exit_code == 0, packed.output + cached.output
    assert packed.stdout == cached.stdout and packed.stdout.strip()


def test_bench_reports_speed_and_smaller_tensors(tiny_llama_dir, tmp_path) -> None:
    out = _quantize_rtn3(tiny_llama_dir, tmp_path / "q")
    common = ["--prompt-tokens", "8", "--new-tokens", "4", "--repeats", "1", "--json"]
    runs = {}
    for name, model in (("fp", tiny_llama_dir), ("q", out)):
        result = _run("bench", str(model), *common)
        assert result.exit_code == 0, result.output
        runs[name] = json.loads(result.stdout)
        assert runs[name]["decode_tokens_per_s"] > 0 and runs[name]["prefill_tokens_per_s"] > 0
    assert runs["q"]["tensor_bytes"] < runs["fp"]["tensor_bytes"]
    _assert_clean_error(_run("bench", str(out), "--new-tokens", "0"), "not in the range x>=1")
    _assert_clean_error(_run("bench", str(out), "--cuda-graph"), "--cuda-graph needs --device cuda")


def test_static_cache_decoding_matches_dynamic_cache(tiny_llama_dir, tmp_path) -> None:
    import torch

    from anybit.bench import StaticDecoder
    from anybit.model import load_model

    model = load_model(str(_quantize_rtn3(tiny_llama_dir, tmp_path / "q"))).model
    prompt = torch.tensor([[5, 17, 42, 7, 99]])
    with torch.inference_mode():
        expected = model.generate(prompt, max_new_tokens=8, do_sample=False)[0, prompt.shape[1] :].tolist()
        decoder = StaticDecoder(model, max_len=16)  # the eager form of what a CUDA graph replays
        for _ in range(2):  # a second prefill starts from an empty cache
            tokens = [decoder.prefill(prompt).item()] + [decoder.step().item() for _ in range(7)]
            assert tokens == expected
    with pytest.raises(AnybitError, match="CUDA device"):
        StaticDecoder(model, max_len=16, graph=True)


def test_dense_cache_survives_moves_and_is_used(tiny_llama_dir, tmp_path) -> None:
    import torch

    from anybit.model import load_model
    from anybit.runtime.qlinear import QuantLinear, dense_weights, quant_linears

    out = _quantize_rtn3(tiny_llama_dir, tmp_path / "q")
    model = load_model(str(out)).model
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.inference_mode():
        packed = model(ids).logits
        with dense_weights(model):
            model.to("cpu")  # generate and bench move the model after the cache is built
            original = QuantLinear.dequantize
            QuantLinear.dequantize = lambda self: (_ for _ in ()).throw(AssertionError("decoded again"))
            try:
                assert all(layer._dense is not None for _, layer in quant_linears(model))
                cached = model(ids).logits
            finally:
                QuantLinear.dequantize = original
    torch.testing.assert_close(cached, packed)


def test_default_group_fits_every_matrix(tiny_llama_dir, tmp_path) -> None:
    """Without --group, a matrix whose inputs 64 does not divide (the tiny MLP's 96) gets a group that does,
    and inspect says so; an explicit --group that does not divide stays an error."""
    out = tmp_path / "q"
    ok = _run("quantize", str(tiny_llama_dir), "--method", "rtn", "--bits", "4", "--out", str(out))
    assert ok.exit_code == 0, ok.output
    info = json.loads((out / "anybit.json").read_text())
    groups = {name.rsplit(".", 1)[-1]: layer["group_size"] for name, layer in info["layers"].items()}
    assert groups["down_proj"] == 48 and groups["q_proj"] == 64 and groups["gate_proj"] == 64
    shown = _run("inspect", str(out))
    assert shown.exit_code == 0, shown.output
    assert "note: the default group 64 does not divide 96 inputs: 2 linear(s) use group 48" in shown.output
    refused = _run("quantize", str(tiny_llama_dir), "--method", "rtn", "--group", "64", "--out", str(tmp_path / "r"))
    _assert_clean_error(refused, "group size 64 does not divide the input dimension 96")


@pytest.mark.parametrize("in_features,group", [(576, 64), (96, 48), (1000, 50), (97, 97), (4096, 64), (130, 65)])
def test_default_group_size(in_features: int, group: int) -> None:
    from anybit.quant.groups import default_group_size

    assert default_group_size(in_features) == group


_TRITON_PROBE = """
import sys
from anybit.cli import _keep_triton_out_without_gpu
_keep_triton_out_without_gpu()
from transformers import LlamaForCausalLM  # pulls torch's compiler stack, which imports triton where it can
from anybit.kernels import triton_available
print(sys.modules.get("triton") is not None, triton_available())
"""


@pytest.mark.parametrize("interpret", ["0", "1"])
def test_the_cli_keeps_triton_out_without_a_gpu(interpret) -> None:
    """`anybit` on a machine without a GPU driver never loads triton (70 MB of the generate/bench footprint);
    TRITON_INTERPRET=1, which runs the Triton kernels on the CPU, keeps it."""
    from anybit.cli import GPU_DEVICE_FILES
    from anybit.kernels import triton_available

    if any(map(os.path.exists, GPU_DEVICE_FILES)):
        pytest.skip("a GPU driver is present: triton stays")
    if not triton_available():
        pytest.skip("triton is not installed")
    env = {**os.environ, "TRITON_INTERPRET": interpret}
    done = subprocess.run([sys.executable, "-c", _TRITON_PROBE], capture_output=True, text=True, env=env, check=True)
    loaded = interpret == "1"
    assert done.stdout.split() == [str(loaded), str(loaded)], done.stdout


def test_plot_draws_perplexity_against_counted_bits(tmp_path) -> None:
    """`anybit plot` reads the lines `anybit eval --json` prints: one series per method, unquantized models as
    lines; bad input is one line, and an existing picture is replaced only with --force."""
    from anybit.report import quality_series, read_results

    lines = [
        {"model": "m", "dataset": "wikitext2", "ppl": 21.9},
        {"model": "q3", "dataset": "wikitext2", "ppl": 30.1, "bits_per_weight": 3.25, "method": "anybit"},
        {"model": "q4", "dataset": "wikitext2", "ppl": 24.2, "bits_per_weight": 4.25, "method": "anybit"},
        {"model": "g4", "dataset": "wikitext2", "ppl": 28.0, "bits_per_weight": 4.3125, "method": "gptq"},
    ]
    results = tmp_path / "results.jsonl"
    results.write_text("\n".join(json.dumps(line) for line in lines) + "\n\n")
    series, references = quality_series(read_results([results]))
    assert series == {"anybit": [(3.25, 30.1), (4.25, 24.2)], "gptq": [(4.3125, 28.0)]}
    assert references == {"m": 21.9}
    out = tmp_path / "quality.png"
    result = _run("plot", str(results), "--out", str(out))
    assert result.exit_code == 0, result.output
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert _run("plot", str(results), "--out", str(out)).exit_code != 0  # exists: refused
    assert _run("plot", str(results), "--out", str(out), "--force").exit_code == 0
    assert not [p for p in tmp_path.iterdir() if p.name not in ("results.jsonl", "quality.png")]  # no temporaries
    broken = tmp_path / "broken.jsonl"
    broken.write_text(json.dumps(lines[0]) + "\n{not json\n")
    empty = tmp_path / "empty.jsonl"
    empty.write_text(json.dumps({"model": "m"}) + "\n")
    for args, needle in (
        ([str(broken)], "broken.jsonl:2 is not a JSON object"),
        ([str(empty)], "no perplexity in"),
        ([str(tmp_path / "missing.jsonl")], "cannot read"),
        ([str(results), "--out", str(tmp_path)], "is a directory"),
    ):
        result = _run("plot", *args, "--out", str(tmp_path / "new.png")) if "--out" not in args else _run("plot", *args)
        assert result.exit_code != 0 and "Traceback" not in result.output, result.output
        assert len(result.output.strip().splitlines()) == 1 and needle in result.output, result.output
    assert not (tmp_path / "new.png").exists()


def _value_other_than_default(option) -> object:
    if option.kind is bool:
        return not option.default if option.default is not None else True
    if option.choices:
        return option.choices[-1] if option.default != option.choices[-1] else option.choices[0]
    return 0.25 if option.kind is float else 1


def test_every_recipe_option_is_refused_by_the_methods_that_do_not_take_it() -> None:
    from anybit.config import RECIPE_OPTIONS, QuantConfig
    from anybit.methods import METHODS

    assert {o.name for o in RECIPE_OPTIONS} >= {"group_size", "act_order", "tau", "clip_min", "refine", "scope"}
    for option in RECIPE_OPTIONS:
        value = _value_other_than_default(option)
        for name, method in METHODS.items():
            if method.takes(option.name):
                continue
            with pytest.raises(AnybitError, match=f"{option.cli_flag} is not an option of method '{name}'"):
                QuantConfig(method=name, **{option.name: value})


def test_options_take_their_methods_defaults_and_bounds() -> None:
    from anybit.config import QuantConfig

    assert QuantConfig(method="anybit").act_order is True and QuantConfig(method="gptq").act_order is False
    assert QuantConfig(method="squeezellm").outliers == 0.0045 and QuantConfig(method="claq").outliers == 0.005
    assert QuantConfig(method="skim").scaling is True and QuantConfig(method="anybit").scope == "model"
    assert QuantConfig(method="rtn").act_order is None  # an option rtn does not take stays unset
    for values, needle in [
        ({"method": "claq", "tau": 0.0}, "--tau must be positive"),
        ({"method": "slim", "clip_min": 1.5}, r"--clip-min must be in \(0, 1\]"),
        ({"method": "anybit", "refine": 9}, "--refine must be in 0-8"),
        ({"method": "gptq", "damp": 1.0}, r"--damp must be in \[0, 1\)"),
        ({"method": "gptq", "scope": "layer"}, "scope must be one of matrix, model"),
    ]:
        with pytest.raises(AnybitError, match=needle):
            QuantConfig(**values)


def test_every_declared_option_is_a_flag_and_a_toml_key(tmp_path) -> None:
    from anybit.config import OPTIONS, QuantConfig

    help_text = CliRunner().invoke(main, ["quantize", "--help"], terminal_width=200).output
    for option in OPTIONS:
        assert option.cli_flag in help_text
    toml = tmp_path / "c.toml"
    toml.write_text('method = "claq"\ntau = 9.5\nsearch_split = true\nbits = 3.5\n')
    config = QuantConfig.from_toml(toml)
    assert (config.tau, config.search_split, config.bits) == (9.5, True, 3.5)
    toml.write_text('method = "gptq"\ntau = 9.5\n')
    with pytest.raises(AnybitError, match="--tau is not an option of method 'gptq'"):
        QuantConfig.from_toml(toml)


def test_an_option_the_method_does_not_take_is_one_line_on_the_command_line(tiny_llama_dir, tmp_path) -> None:
    result = CliRunner().invoke(
        main, ["quantize", str(tiny_llama_dir), "--method", "rtn", "--tau", "3", "--out", str(tmp_path / "q")]
    )
    assert result.exit_code == 1
    assert result.output.strip() == "Error: --tau is not an option of method 'rtn' (methods that take it: claq)"
    assert not (tmp_path / "q").exists()
