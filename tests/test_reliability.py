"""Damaged files, unsafe outputs, missing weights and arguments out of range: each one line, a non-zero exit,
nothing deleted that anybit did not write."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from anybit.cli import main
from damage import damaged_copy

LINEAR = "model.layers.0.self_attn.q_proj"


def _run(*args: object):
    return CliRunner().invoke(main, [str(a) for a in args])


def _assert_one_line_error(result, needle: str) -> None:
    assert result.exit_code != 0, result.output
    assert "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1, result.output
    assert needle in result.output, result.output


@pytest.fixture(scope="module")
def quantized(tmp_path_factory, tiny_llama_dir, corpus_file) -> dict[str, Path]:
    """Tiny directories of six layouts: codebooks with outliers, uniform with a permutation, mixed widths,
    group bit maps, input rotations, vector codebooks."""
    root = tmp_path_factory.mktemp("quantized")
    recipes = {
        "squeezellm": ["--method", "squeezellm", "--bits", "3"],
        "gptq": ["--method", "gptq", "--bits", "4", "--group", "32", "--act-order"],
        "skim": ["--method", "skim", "--bits", "3.25"],
        "slim": ["--method", "slim", "--bits", "3", "--group", "32"],
        "rotated": ["--method", "gptq", "--bits", "4", "--group", "32", "--rotate"],
        "vq": ["--method", "vq", "--bits", "2.5", "--fisher-nsamples", "1"],
    }
    dirs = {}
    for name, args in recipes.items():
        out = root / name
        result = _run("quantize", tiny_llama_dir, *args, "--calib", corpus_file, "--nsamples", 2, "--seqlen", 32,
                      "--out", out)  # fmt: skip
        assert result.exit_code == 0, result.output
        dirs[name] = out
    return dirs


DAMAGES = {
    "zero rows": lambda t: t[:0],
    "two rows": lambda t: t[:2],
    "float32": lambda t: t.float(),
    "int32": lambda t: t.to(torch.int32),
}


@pytest.mark.parametrize("damage", list(DAMAGES))
@pytest.mark.parametrize("recipe", ["squeezellm", "gptq", "skim", "slim", "rotated", "vq"])
def test_a_damaged_stored_tensor_never_reaches_a_kernel(quantized, recipe, damage, corpus_file, tmp_path) -> None:
    """Each stored tensor of one linear, damaged: eval and inspect name it in one line."""
    with safe_open(quantized[recipe] / "model.safetensors", framework="pt") as f:
        keys = [k for k in f.keys() if k.startswith(f"{LINEAR}.")]  # noqa: SIM118
    assert len(keys) >= 3
    for key in keys:
        original = load_file(quantized[recipe] / "model.safetensors")[key]
        if DAMAGES[damage](original).shape == original.shape and DAMAGES[damage](original).dtype == original.dtype:
            continue  # a one-element tensor has no second row
        out = damaged_copy(quantized[recipe], tmp_path / key, lambda t, k=key: t.update({k: DAMAGES[damage](t[k])}))
        for command in (["eval", out, "--dataset", corpus_file, "--seqlen", 32, "--max-windows", 1], ["inspect", out]):
            _assert_one_line_error(_run(*command), key)


@pytest.mark.parametrize("key", ["perm", "codebook_3", "outliers_values", "bitmap"])
def test_a_removed_stored_tensor_is_named_or_counted(quantized, key, tmp_path) -> None:
    recipe = "gptq" if key == "perm" else "squeezellm"
    out = damaged_copy(quantized[recipe], tmp_path / "d", lambda t: t.pop(f"{LINEAR}.{key}"))
    # a missing optional tensor (the permutation) shows in the layer's counted bits
    _assert_one_line_error(_run("inspect", out), "corrupt quantized checkpoint")
    _assert_one_line_error(_run("inspect", out), LINEAR)


def _edit_info(directory: Path, edit) -> None:
    info = json.loads((directory / "anybit.json").read_text())
    edit(info)
    (directory / "anybit.json").write_text(json.dumps(info))


@pytest.mark.parametrize(
    "edit,needle",
    [
        (lambda i: i.update(bits_per_weight=2.0), "claims 2.0 bits per weight"),
        (lambda i: i["layers"][LINEAR].update(storage_bits=8), f"{LINEAR}: anybit.json counts 8 bits"),
        (lambda i: i["layers"].pop(LINEAR), f"unexpected stored tensors {LINEAR}."),
        (lambda i: i["layers"][LINEAR].update(shape=[64, 32]), "does not fit the architecture"),
        (lambda i: i["layers"].update({"model.nope": i["layers"][LINEAR]}), "model.nope: the architecture has no"),
        (lambda i: i.update(layers=[]), "field 'layers' is missing or not a dict"),
        (lambda i: i.update(aliases={"lm_head.weight": 3}), "aliases must map names to names"),
        (lambda i: i.pop("method"), "field 'method' is missing"),
        (lambda i: i["layers"][LINEAR].update(kind="lattice"), "bad quantized tensor metadata"),
        (lambda i: i["layers"][LINEAR].update(group_size="64"), "field 'group_size' is missing or not a int"),
        (lambda i: i.update(aliases={"lm_head.weight": "model.norm.weight"}), "alias lm_head.weight"),
        (lambda i: i.update(tuning=[{"before": "x"}]), "tuning entry 0 is not"),
        (lambda i: i.update(tuning={}), "field 'tuning' is not a list"),
        (
            lambda i: i.update(end_to_end_tuning={"steps": True, "before": 1.0, "after": 0.5, "kept": True}),
            "field 'end_to_end_tuning' is not",
        ),
        (
            lambda i: i.update(
                end_to_end_tuning={"steps": 2, "before": 1.0, "after": 0.5, "kept": True, "earlier": [{"steps": 1}]}
            ),
            "field 'end_to_end_tuning' is not",
        ),
    ],
    ids=[
        "bits",
        "layer-bits",
        "layer-removed",
        "shape",
        "foreign-layer",
        "layers-type",
        "aliases",
        "method",
        "kind",
        "group-type",
        "alias-shape",
        "tuning-entry",
        "tuning-type",
        "end-to-end-record",
        "end-to-end-earlier",
    ],
)
def test_damaged_anybit_json_is_refused_at_load(quantized, edit, needle, corpus_file, tmp_path) -> None:
    out = tmp_path / "q"
    shutil.copytree(quantized["squeezellm"], out)
    _edit_info(out, edit)
    for command in (["eval", out, "--dataset", corpus_file, "--seqlen", 32, "--max-windows", 1], ["inspect", out]):
        _assert_one_line_error(_run(*command), needle)


def test_eval_reports_counted_bits_measured_from_the_tensors(quantized, corpus_file) -> None:
    result = _run("eval", quantized["skim"], "--dataset", corpus_file, "--seqlen", 32, "--max-windows", 1, "--json")
    assert result.exit_code == 0, result.output
    inspected = json.loads(_run("inspect", quantized["skim"], "--json").stdout)
    stored = sum(t.numel() * t.element_size() for k, t in load_file(quantized["skim"] / "model.safetensors").items()
                 if any(k.startswith(f"{row['name']}.") and not k.endswith(".bias") for row in inspected["layers"]))  # fmt: skip
    assert json.loads(result.stdout)["bits_per_weight"] == 8 * stored / inspected["quantized_weights"]
    assert inspected["bits_per_weight"] == json.loads(result.stdout)["bits_per_weight"]


def test_unquantized_tensors_are_checked_too(quantized, tmp_path) -> None:
    cases = {
        "model.norm.weight": (lambda t: t[:3], "model.norm.weight: shape (3,)"),
        "model.embed_tokens.weight": (lambda t: t.float(), "model.embed_tokens.weight: stored as float32"),
        "model.layers.1.input_layernorm.weight": (lambda t: t.fill_(float("nan")), "NaN or infinite"),
    }
    for key, (damage, needle) in cases.items():
        out = damaged_copy(quantized["slim"], tmp_path / key, lambda t, k=key, d=damage: t.update({k: d(t[k])}))
        _assert_one_line_error(_run("inspect", out), needle)
    out = damaged_copy(quantized["slim"], tmp_path / "extra", lambda t: t.update({"model.extra": torch.zeros(2)}))
    _assert_one_line_error(_run("inspect", out), "unexpected stored tensors model.extra")


# ---- nothing is deleted that anybit did not write ----------------------------------------------------------
def _quantize(model: Path, out: Path, *extra: object):
    return _run("quantize", model, "--method", "rtn", "--bits", 4, "--group", 32, "--out", out, *extra)


def test_force_never_replaces_a_foreign_directory(tiny_llama_dir, tmp_path) -> None:
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    _assert_one_line_error(_quantize(tiny_llama_dir, foreign, "--force"), "it is not an anybit output")
    assert (foreign / "notes.txt").read_text() == "keep me"


def test_force_never_replaces_the_source(tiny_llama_dir, tmp_path) -> None:
    source = tmp_path / "model"
    shutil.copytree(tiny_llama_dir, source)
    before = sorted(p.name for p in source.iterdir())
    _assert_one_line_error(_quantize(source, source, "--force"), "would replace the source model")
    _assert_one_line_error(_quantize(source / "config.json", tmp_path / "q"), "is a file but not a .gguf")
    _assert_one_line_error(_quantize(source, tmp_path, "--force"), "would replace the source model")
    assert sorted(p.name for p in source.iterdir()) == before


def test_force_replaces_only_an_untouched_anybit_output(tiny_llama_dir, tmp_path) -> None:
    out = tmp_path / "q"
    assert _quantize(tiny_llama_dir, out).exit_code == 0
    assert _quantize(tiny_llama_dir, out, "--force").exit_code == 0  # its own output: replaced
    (out / "my-notes.md").write_text("mine")
    _assert_one_line_error(
        _quantize(tiny_llama_dir, out, "--force"), "it holds my-notes.md, which anybit did not write"
    )
    assert (out / "my-notes.md").read_text() == "mine"
    (out / "my-notes.md").unlink()
    (out / "sub").mkdir()
    _assert_one_line_error(_quantize(tiny_llama_dir, out, "--force"), "it holds sub")


def test_compare_replaces_an_explicit_out_only_with_force(tiny_llama_dir, corpus_file, tmp_path) -> None:
    out = tmp_path / "q"
    assert _quantize(tiny_llama_dir, out).exit_code == 0
    args = ["compare", tiny_llama_dir, "--method", "rtn", "--bits", 4, "--group", 32, "--dataset", corpus_file,
            "--seqlen", 32, "--max-windows", 1, "--out", out]  # fmt: skip
    _assert_one_line_error(_run(*args), "already exists (use --force")
    result = _run(*args, "--force")
    assert result.exit_code == 0, result.output


def test_unwritable_output_is_refused_before_any_work(tiny_llama_dir, tmp_path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    _assert_one_line_error(_quantize(tiny_llama_dir, blocker / "q"), "cannot write to")
    _assert_one_line_error(_quantize(tiny_llama_dir, blocker), "is a file")


def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def test_stale_temporaries_of_killed_writes_are_removed(tiny_llama_dir, tmp_path) -> None:
    stale = tmp_path / f".q.anybit-{_dead_pid()}-abc"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"partial")
    alive = tmp_path / f".q.anybit-{os.getpid()}-def"  # a write still running: left alone
    alive.mkdir()
    unrelated = tmp_path / ".q.backup"
    unrelated.mkdir()
    assert _quantize(tiny_llama_dir, tmp_path / "q").exit_code == 0
    assert not stale.exists() and alive.exists() and unrelated.exists()


def test_a_killed_save_leaves_nothing_behind(tiny_llama_dir, tmp_path) -> None:
    """SIGKILL in the middle of writing: the next run cleans up, the output is whole or absent."""
    script = (
        "import os, signal, sys\n"
        "import anybit.format.shards as shards\n"
        "real = shards.assemble_shard\n"
        "def die(*a, **k):\n"
        "    real(*a, **k)\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
        "shards.assemble_shard = die\n"
        "from anybit.cli import run\n"
        "sys.argv = ['anybit', 'quantize', sys.argv[1], '--method', 'rtn', '--bits', '4', '--group', '32', '--out', sys.argv[2]]\n"
        "run()\n"
    )
    out = tmp_path / "q"
    proc = subprocess.run([sys.executable, "-c", script, str(tiny_llama_dir), str(out)], capture_output=True)
    assert proc.returncode == -9
    assert not out.exists() and [p.name for p in tmp_path.iterdir() if p.name.startswith(".q.anybit-")]
    assert _quantize(tiny_llama_dir, out).exit_code == 0
    assert [p.name for p in tmp_path.iterdir()] == ["q"]


# ---- no weight is invented ---------------------------------------------------------------------------------
def _edited_checkpoint(tiny_llama_dir: Path, dst: Path, edit) -> Path:
    shutil.copytree(tiny_llama_dir, dst)
    for shard in dst.glob("*.safetensors"):
        tensors = load_file(shard)
        edit(tensors)
        save_file(tensors, shard, metadata={"format": "pt"})
    return dst


@pytest.mark.parametrize(
    "edit,needle",
    [
        (lambda t: t.pop(f"{LINEAR}.weight", None), f"no weights for {LINEAR}.weight"),
        (lambda t: t.update({k: v[:3] for k, v in t.items() if k == f"{LINEAR}.weight"}), "wrong shape for"),
        (lambda t: [v.fill_(float("nan")) for k, v in t.items() if k == "model.norm.weight"], "NaN or infinite"),
    ],
    ids=["removed", "shape", "nan"],
)
def test_a_checkpoint_missing_or_damaging_a_weight_is_refused(tiny_llama_dir, edit, needle, tmp_path) -> None:
    source = _edited_checkpoint(tiny_llama_dir, tmp_path / "m", edit)
    _assert_one_line_error(_quantize(source, tmp_path / "q"), needle)
    assert not (tmp_path / "q").exists()


def _with_config(directory: Path, dst: Path, change: dict) -> Path:
    shutil.copytree(directory, dst)
    config = json.loads((dst / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps({**config, **change}))
    return dst


@pytest.mark.parametrize(
    "change",
    [{"num_attention_heads": 0}, {"hidden_size": -64}, {"num_hidden_layers": "two"}, {"rms_norm_eps": None}],
    ids=["zero-heads", "negative-size", "text", "null"],
)
def test_config_values_no_model_can_have_are_one_line(quantized, tiny_llama_dir, change, corpus_file, tmp_path):
    """config.json values transformers cannot build a model from (its checks raise anything from ValueError
    to ZeroDivisionError): one line naming the directory, for a source and for a quantized directory, on
    every command that loads one; nothing written."""
    source = _with_config(tiny_llama_dir, tmp_path / "source", change)
    result = _quantize(source, tmp_path / "q")
    assert result.exit_code != 0 and "Traceback" not in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1 and str(source) in result.output, result.output
    assert not (tmp_path / "q").exists()
    damaged = _with_config(quantized["gptq"], tmp_path / "damaged", change)
    for command in (["eval", damaged, "--dataset", corpus_file, "--seqlen", 32, "--max-windows", 1],
                    ["bench", damaged, "--prompt-tokens", 4, "--new-tokens", 2, "--repeats", 1],
                    ["generate", damaged, "--prompt", "The history", "--max-new-tokens", 2]):  # fmt: skip
        result = _run(*command)
        assert result.exit_code != 0 and "Traceback" not in result.output, (command[0], result.output)
        assert len(result.output.strip().splitlines()) == 1 and str(damaged) in result.output, result.output


def test_damaged_shards_are_refused(tiny_llama_dir, tmp_path) -> None:
    source = tmp_path / "m"
    shutil.copytree(tiny_llama_dir, source)
    shards = sorted(source.glob("*.safetensors"))
    assert len(shards) > 1  # the tiny llama is sharded
    shards[0].write_bytes(shards[0].read_bytes()[:100])
    _assert_one_line_error(_quantize(source, tmp_path / "q"), f"corrupt weights file {shards[0]}")
    shards[0].unlink()
    _assert_one_line_error(_quantize(source, tmp_path / "q"), f"the shard {shards[0].name} named in")


def _gguf_without(src: Path, dst: Path, drop) -> Path:
    """A copy of `src` holding every key-value field and the tensors `drop` does not name."""
    import gguf

    reader = gguf.GGUFReader(src)
    writer = gguf.GGUFWriter(str(dst), "llama")
    for name, field in reader.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture":
            continue
        kind = field.types[0]
        sub = field.types[-1] if kind == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(name, field.contents(), kind, sub_type=sub)
    for tensor in reader.tensors:
        if not drop(tensor.name):
            writer.add_tensor(tensor.name, tensor.data.copy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return dst


def test_gguf_inputs_are_strict(tiny_gguf, tmp_path) -> None:
    from anybit.model.loading import load_model

    assert load_model(str(tiny_gguf)).model.config.num_hidden_layers == 2  # the intact file loads
    empty = _gguf_without(tiny_gguf, tmp_path / "empty.gguf", lambda name: True)
    _assert_one_line_error(_quantize(empty, tmp_path / "q"), "no weights for model.embed_tokens.weight")
    one_less = _gguf_without(tiny_gguf, tmp_path / "less.gguf", lambda name: name == "blk.1.ffn_up.weight")
    _assert_one_line_error(_quantize(one_less, tmp_path / "q"), "no weights for model.layers.1.mlp.up_proj.weight")
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(tiny_gguf.read_bytes()[:300])
    _assert_one_line_error(_quantize(cut, tmp_path / "q"), "corrupt GGUF file")
    assert not (tmp_path / "q").exists()


# ---- arguments out of range ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "args,needle",
    [
        (["eval", "{model}", "--seqlen", "0"], "'--seqlen': 0 is not in the range"),
        (["eval", "{model}", "--seqlen", "-5"], "'--seqlen': -5 is not in the range"),
        (["eval", "{model}", "--max-windows", "0"], "'--max-windows': 0 is not in the range"),
        (["eval", "{model}", "--device", "tpu"], "device must be cpu, cuda or cuda:N, got 'tpu'"),
        (["eval", "{model}", "--device", "cuda:x"], "device must be cpu, cuda or cuda:N"),
        (["generate", "{model}", "--prompt", ""], "the prompt is empty"),
        (["generate", "{model}", "--prompt", "  "], "the prompt is empty"),
        (["generate", "{model}", "--prompt", "hi", "--device", "gpu"], "device must be"),
        (["generate", "{model}", "--prompt", "hi", "--temperature", "-1"], "'--temperature'"),
        (["residual", "{model}", "--nsamples", "0"], "'--nsamples': 0 is not in the range"),
        (["residual", "{model}", "--seqlen", "0"], "'--seqlen': 0 is not in the range"),
        (["quantize", "{model}", "--out", "{out}", "--device", "cuda:zero"], "device must be"),
        (["quantize", "{model}", "--out", "{out}", "--nsamples", "0"], "'--nsamples'"),
        (["quantize", "{model}", "--out", "{out}", "--group", "-1"], "'--group'"),
        (["bench", "{model}", "--repeats", "0"], "'--repeats'"),
    ],
)
def test_arguments_out_of_range(args, needle, tiny_llama_dir, tmp_path) -> None:
    args = [a.format(model=tiny_llama_dir, out=tmp_path / "q") for a in args]
    _assert_one_line_error(_run(*args), needle)
    assert not (tmp_path / "q").exists()


@pytest.mark.parametrize(
    "toml,needle",
    [
        ('bits = "3"', "bits must be float or none, got '3'"),
        ("group_size = 32.5", "group_size must be int or none, got 32.5"),
        ("nsamples = true", "nsamples must be int, got True"),
        ('scaling = "yes"', "scaling must be bool or none"),
        ("method = 3", "method must be str"),
        ("seed = [1]", "seed must be int"),
        ('device = "tpu"', "device must be cpu"),
    ],
)
def test_wrongly_typed_config_values(toml, needle, tiny_llama_dir, tmp_path) -> None:
    config = tmp_path / "c.toml"
    config.write_text(toml + "\n")
    _assert_one_line_error(_run("quantize", tiny_llama_dir, "--config", config, "--out", tmp_path / "q"), needle)


# ---- residuals belong to one quantization ------------------------------------------------------------------
def test_residuals_of_another_quantization_are_refused(tiny_llama_dir, corpus_file, tmp_path) -> None:
    calib = ["--calib", corpus_file, "--seqlen", 32, "--nsamples", 2]
    first, second = tmp_path / "a", tmp_path / "b"
    assert _quantize(tiny_llama_dir, first, "--residual", *calib).exit_code == 0
    result = _run("quantize", tiny_llama_dir, "--method", "rtn", "--bits", 3, "--group", 32, "--out", second)
    assert result.exit_code == 0, result.output
    shutil.copy(first / "residuals.safetensors", second / "residuals.safetensors")  # same shapes, other weights
    evaluate = ["--dataset", corpus_file, "--seqlen", 32, "--max-windows", 1, "--dec", 8]
    assert _run("eval", first, *evaluate).exit_code == 0
    _assert_one_line_error(_run("eval", second, *evaluate), "were not computed for this quantized model")


# ---- the compiled-kernel cache runs only what it built -----------------------------------------------------
def test_a_planted_kernel_library_is_never_loaded(tmp_path, monkeypatch) -> None:
    from anybit.kernels import build, cpu

    monkeypatch.setenv("ANYBIT_CACHE", str(tmp_path))
    compiler = os.environ.get("CC", "cc")
    if not shutil.which(compiler):
        pytest.skip(f"no C compiler ({compiler})")
    target = cpu.KERNEL.library_path(compiler, build.ISA_FLAGS[build.requested_isa()])
    target.parent.mkdir(parents=True)
    target.write_bytes(b"planted")
    cpu.KERNEL.cache_clear()
    try:
        library = cpu.KERNEL.library()
        assert not isinstance(library, str), library
        assert target.read_bytes() != b"planted"  # rebuilt in its place, and its hash recorded
        assert target.with_name(target.name + ".sha256").read_text() == build.digest(target)
        changed = target.with_name("changed")
        changed.write_bytes(target.read_bytes() + b"\0")
        os.replace(changed, target)  # changed after the build (not in place: the loaded copy stays mapped)
        cpu.KERNEL.cache_clear()
        assert not isinstance(cpu.KERNEL.library(), str)
        assert build.built_by_us(target)
    finally:
        cpu.KERNEL.cache_clear()


def test_the_kernel_cache_key_names_the_compiler_and_flags(tmp_path, monkeypatch) -> None:
    from anybit.kernels import build, cpu

    monkeypatch.setenv("ANYBIT_CACHE", str(tmp_path))
    other = tmp_path / "othercc"
    other.write_text("#!/bin/sh\necho 'other compiler 1.0'\n")
    other.chmod(0o755)
    native, avx2 = build.ISA_FLAGS["native"], build.ISA_FLAGS["avx2"]
    paths = {cpu.KERNEL.library_path("cc", native), cpu.KERNEL.library_path("cc", build.PLAIN_FLAGS),
             cpu.KERNEL.library_path("cc", avx2), cpu.KERNEL.library_path(str(other), native)}  # fmt: skip
    assert len(paths) == 4


def test_a_tokenizer_foreign_to_the_model_is_one_line(tiny_llama_dir, corpus_file, tmp_path) -> None:
    from transformers import AutoConfig

    source = tmp_path / "m"
    shutil.copytree(tiny_llama_dir, source)
    config = AutoConfig.from_pretrained(source)
    config.vocab_size = 100  # fewer embedding rows than the tokenizer's ids
    config.save_pretrained(source)
    for shard in source.glob("*.safetensors"):
        tensors = load_file(shard)
        tensors.update({k: v[:100].clone() for k, v in tensors.items() if k == "model.embed_tokens.weight"})
        save_file(tensors, shard, metadata={"format": "pt"})
    result = _run("eval", source, "--dataset", corpus_file, "--seqlen", 32, "--max-windows", 1)
    _assert_one_line_error(result, "tokenizer and model do not belong together")


@pytest.mark.parametrize(
    "edit",
    [
        lambda t, k: t.update({k + ".residual_scales": t[k + ".residual_scales"].float()}),
        lambda t, k: t[k + ".residual_scales"].fill_(float("nan")),
        lambda t, k: t.update({k + ".act_mean_abs": t[k + ".act_mean_abs"].half()}),
        lambda t, k: t.update({k + ".residual_codes": t[k + ".residual_codes"].to(torch.int32)}),
        lambda t, k: t.pop(k + ".act_mean_abs"),
    ],
    ids=["scales-float32", "scales-nan", "means-float16", "codes-int32", "means-missing"],
)
def test_damaged_residuals_are_refused(edit, tiny_llama_dir, corpus_file, tmp_path) -> None:
    out = tmp_path / "q"
    assert (
        _quantize(tiny_llama_dir, out, "--residual", "--calib", corpus_file, "--seqlen", 32, "--nsamples", 2).exit_code
        == 0
    )
    path = out / "residuals.safetensors"
    with safe_open(path, framework="pt") as f:
        metadata = f.metadata()
    tensors = load_file(path)
    edit(tensors, LINEAR)
    save_file(tensors, path, metadata=metadata)
    result = _run("eval", out, "--dataset", corpus_file, "--seqlen", 32, "--max-windows", 1, "--dec", 8)
    _assert_one_line_error(result, "corrupt residual file")


@pytest.mark.parametrize(
    "args,needle",
    [
        (["quantize", "{model}", "--out", "{out}", "--tau", "nan"], "'nan' is not a finite number"),
        (["quantize", "{model}", "--out", "{out}", "--damp", "inf"], "'inf' is not a finite number"),
        (["quantize", "{model}", "--out", "{out}", "--bits", "nan"], "'nan' is not a finite number"),
        (["generate", "{model}", "--prompt", "hi", "--temperature", "nan"], "'nan' is not a finite number"),
    ],
)
def test_numbers_that_are_not_numbers(args, needle, tiny_llama_dir, tmp_path) -> None:
    args = [a.format(model=tiny_llama_dir, out=tmp_path / "q") for a in args]
    _assert_one_line_error(_run(*args), needle)


def test_config_file_numbers_must_be_finite(tiny_llama_dir, tmp_path) -> None:
    config = tmp_path / "c.toml"
    config.write_text("tau = inf\n")
    _assert_one_line_error(
        _run("quantize", tiny_llama_dir, "--config", config, "--out", tmp_path / "q"), "tau must be a finite number"
    )


class _FullFile:
    def write(self, data) -> None:
        import errno

        raise OSError(errno.ENOSPC, "No space left on device")


@pytest.mark.parametrize("where", ["shard", "spill"])
def test_a_full_disk_while_writing_is_one_line_and_leaves_nothing(tiny_llama_dir, tmp_path, monkeypatch, where) -> None:
    """The disk fills while the weights are written (as a shard is assembled, or as a tensor is spilled to
    disk): one line, no output, no temporary, the previous output (here: one anybit wrote before) and the
    source untouched."""
    import errno

    import anybit.format.shards as shards

    out = tmp_path / "q"
    assert _quantize(tiny_llama_dir, out).exit_code == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    source_files = {p.name: p.stat().st_mtime_ns for p in tiny_llama_dir.iterdir()}

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    if where == "shard":
        monkeypatch.setattr(shards, "assemble_shard", full)
    else:
        spill = shards.ShardWriter._spill
        monkeypatch.setattr(shards.ShardWriter, "_spill", lambda self, size: (spill(self, size), _FullFile())[1])
    result = _quantize(tiny_llama_dir, out, "--force")  # after the work: its progress bar, then one line
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert result.output.strip().splitlines()[-1].startswith("Error: cannot write") and "No space left" in result.output
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["q"]
    assert {p.name: p.stat().st_mtime_ns for p in tiny_llama_dir.iterdir()} == source_files


class _FullTemporaryFile:
    def seek(self, *args) -> int:
        return 0

    def write(self, data) -> None:
        import errno

        raise OSError(errno.ENOSPC, "No space left on device")

    def close(self) -> None:
        pass


@pytest.mark.parametrize("where", ["fisher statistics", "allocation spill"])
def test_a_full_temporary_directory_is_one_line_and_leaves_nothing(
    tiny_llama_dir, corpus_file, tmp_path, monkeypatch, where
) -> None:
    """anybit's recipe keeps the Fisher statistics of a large model and the model-wide plan's codebooks in
    temporary files: where the temporary directory has no room, one line naming it, no output, source untouched."""
    import errno

    import anybit.fisher as fisher
    import anybit.memory as memory

    def no_room(*args) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    if where == "fisher statistics":
        monkeypatch.setattr(fisher, "RESIDENT_ACCUMULATOR_BYTES", 0)  # the tiny model's too go to a mapped file
        monkeypatch.setattr(memory.os, "posix_fallocate", no_room)
    else:
        monkeypatch.setattr(memory.tempfile, "TemporaryFile", lambda **kwargs: _FullTemporaryFile())
    source_files = {p.name: p.stat().st_mtime_ns for p in tiny_llama_dir.iterdir()}
    out = tmp_path / "q"
    result = _run("quantize", tiny_llama_dir, "--method", "anybit", "--bits", 3.25, "--calib", corpus_file,
                  "--nsamples", 2, "--seqlen", 32, "--out", out)  # fmt: skip
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    last = result.output.strip().splitlines()[-1]
    assert last.startswith("Error: cannot write") and "No space left" in last and "TMPDIR" in last, last
    assert list(tmp_path.iterdir()) == []
    assert {p.name: p.stat().st_mtime_ns for p in tiny_llama_dir.iterdir()} == source_files


def test_a_failed_swap_keeps_the_previous_output(tmp_path, monkeypatch) -> None:
    from anybit.format import files

    target, new = tmp_path / "q", tmp_path / "new"
    target.mkdir()
    (target / "a").write_text("old")
    new.mkdir()
    real = os.replace

    def failing(src, dst):
        if Path(src) == new:
            raise OSError("rename failed")
        real(src, dst)

    monkeypatch.setattr(files.os, "replace", failing)
    with pytest.raises(OSError):
        files.replace_dir(new, target)
    assert (target / "a").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["new", "q"]


def test_a_damaged_file_list_keeps_the_directory(tiny_llama_dir, tmp_path) -> None:
    out = tmp_path / "q"
    assert _quantize(tiny_llama_dir, out).exit_code == 0
    _edit_info(out, lambda info: info.update(files=[{"x": 1}]))
    _assert_one_line_error(_quantize(tiny_llama_dir, out, "--force"), "damaged list of files")
    assert (out / "model.safetensors").is_file()
