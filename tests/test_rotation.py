"""Input rotations (`--rotate`): the transform, its storage, the layers that apply it, and the driver's rotated
statistics, Fisher diagonals and weights."""

import dataclasses

import pytest
import torch

import anybit.calibrate as calibrate
from anybit.config import QuantConfig
from anybit.data import calibration_windows, load_corpus, tokenize_corpus
from anybit.errors import AnybitError
from anybit.fisher import fisher_diagonal
from anybit.format.gptq import why_not_exportable
from anybit.format.qtensor import QuantizedTensor
from anybit.format.rotation import InputRotation, hadamard, rotation_bits, walsh_hadamard
from anybit.layerwise import layer_rotations
from anybit.model import load_model
from anybit.model.adapters import get_adapter, get_submodule
from anybit.quant.uniform import rtn_quantize
from anybit.runtime.qlinear import QuantLinear
from qtensors import codebook_tensor


@pytest.mark.parametrize("n", [64, 192, 576, 1536])
def test_rotation_is_orthogonal_and_applied_fast(n: int) -> None:
    rotation = InputRotation.random(n, torch.Generator().manual_seed(n))
    R = rotation.matrix(n, torch.float64)
    torch.testing.assert_close(R @ R.t(), torch.eye(n, dtype=torch.float64), atol=1e-6, rtol=0)
    x = torch.randn(7, n)
    torch.testing.assert_close(rotation.apply(x), (x.double() @ R.t()).float(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(rotation.unapply(x), (x.double() @ R).float(), atol=1e-5, rtol=1e-5)
    assert rotation.stored_bits() == rotation_bits(n)


def test_walsh_hadamard_is_the_sylvester_matrix() -> None:
    for b in (1, 2, 8, 64):
        torch.testing.assert_close(walsh_hadamard(torch.eye(b)), hadamard(b))


def _rotated(qt: QuantizedTensor, seed: int = 0) -> QuantizedTensor:
    rotation = InputRotation.random(qt.shape[1], torch.Generator().manual_seed(seed))
    return dataclasses.replace(qt, rotation=rotation)


def test_a_rotated_tensor_decodes_to_the_coded_part_times_r_and_counts_its_bits() -> None:
    plain = codebook_tensor(24, 192, 192, (2, 3))
    qt = _rotated(plain)
    R = qt.rotation.matrix(192)
    torch.testing.assert_close(qt.dequantize(), plain.dequantize() @ R, atol=1e-5, rtol=1e-5)
    assert qt.storage_bits() == plain.storage_bits() + rotation_bits(192)
    back = QuantizedTensor.from_tensors(qt.meta(), qt.to_tensors())
    torch.testing.assert_close(back.dequantize(), qt.dequantize())


@pytest.mark.parametrize(
    "damage,message",
    [
        (lambda t: t.pop("rot_mix"), "rot_mix: missing"),
        (lambda t: t.pop("rot_signs"), "rot_signs: missing"),
        (lambda t: t.update(rot_mix=torch.eye(5)), "does not fit 192 input columns"),
        (lambda t: t.update(rot_mix=torch.eye(3) * 2), "rot_mix: not orthogonal"),
        (lambda t: t.update(rot_mix=torch.full((3, 3), float("nan"))), "rot_mix: holds NaN"),
        (lambda t: t.update(rot_signs=t["rot_signs"][:-1]), "rot_signs: shape"),
        (lambda t: t.update(rot_mix=t["rot_mix"].half()), "rot_mix: stored as float16"),
    ],
)
def test_a_damaged_rotation_is_refused(damage, message: str) -> None:
    qt = _rotated(codebook_tensor(8, 192, 192, (2,)))
    tensors = qt.to_tensors()
    damage(tensors)
    with pytest.raises(ValueError, match=message):
        QuantizedTensor.from_tensors(qt.meta(), tensors)


@pytest.mark.parametrize("kernel", ["fast", "exact", "reference"])
def test_rotated_layers_multiply_the_coded_part_by_the_rotated_input(kernel: str) -> None:
    """The kernels multiply W Rᵀ (the coded part) by R x, exactly as they multiply an unrotated tensor; the
    reference path multiplies the dense weight."""
    for plain in (
        codebook_tensor(40, 576, 576, (2, 3, 4)),
        rtn_quantize(torch.randn(24, 192) * 0.1, 64, torch.full((24, 3), 4, dtype=torch.uint8)),
    ):
        qt = _rotated(plain)
        rotated, coded = QuantLinear(qt), QuantLinear(plain)
        rotated.kernel = coded.kernel = kernel
        for tokens in (1, 5, 20):
            x = torch.randn(tokens, qt.shape[1])
            if kernel == "reference":  # the dense weight W' R, by the input
                torch.testing.assert_close(rotated(x), x @ qt.dequantize().t())
            else:
                torch.testing.assert_close(rotated(x), coded(qt.rotation.apply(x)), atol=0, rtol=0)


def test_the_gptq_layout_refuses_a_rotation() -> None:
    qt = _rotated(rtn_quantize(torch.randn(32, 128) * 0.1, 64, torch.full((32, 2), 4, dtype=torch.uint8)))
    assert "input rotation" in why_not_exportable(qt)


def _windows(loaded, corpus_file, n: int = 2) -> torch.Tensor:
    ids = tokenize_corpus(loaded.tokenizer, load_corpus(str(corpus_file)))
    return calibration_windows(ids, n, 32, 0)


def test_rotated_fisher_is_that_of_the_rotated_weights(tiny_llama_dir, corpus_file) -> None:
    """The driver's Fisher diagonals with rotations equal autograd's on a model whose linears were rotated
    (weights W Rᵀ, inputs R x): G Rᵀ squared is the gradient of W Rᵀ squared."""
    loaded = load_model(str(tiny_llama_dir))
    model, adapter = loaded.model, get_adapter(loaded.model)
    windows = _windows(loaded, corpus_file)

    def rotations(a, layer, index):
        return layer_rotations(a, layer, index, seed=3)

    rotated_fisher = fisher_diagonal(model, adapter, windows, progress=False, rotations=rotations)
    for index, layer in enumerate(adapter.layers(model)):
        for name, rotation in rotations(adapter, layer, index).items():
            linear = get_submodule(layer, name)
            with torch.no_grad():
                linear.weight.copy_(rotation.apply(linear.weight))
            linear.register_forward_pre_hook(lambda _m, inputs, r=rotation: (r.apply(inputs[0]), *inputs[1:]))
    reference = fisher_diagonal(model, adapter, windows, progress=False)
    for key, value in reference.items():
        torch.testing.assert_close(rotated_fisher[key], value, rtol=1e-3, atol=1e-12)


@pytest.mark.parametrize("method,bits", [("anybit", 3.25), ("gptq", 4)])
def test_rotate_quantizes_rotated_layers_within_the_budget(tiny_llama_dir, corpus_file, method, bits) -> None:
    loaded = load_model(str(tiny_llama_dir))
    windows = _windows(loaded, corpus_file, n=4)
    with torch.inference_mode():
        reference = loaded.model(windows[:1]).logits
    fields = {"fisher_nsamples": 2} if method == "anybit" else {"group_size": 32}
    config = QuantConfig(method=method, bits=bits, rotate=True, calib_dtype="float32", nsamples=4, **fields)
    calibrate.quantize_model(loaded.model, config, windows, progress=False)
    linears = [m for m in loaded.model.modules() if isinstance(m, QuantLinear)]
    assert linears and all(m.qtensor.rotation is not None for m in linears)
    if method == "anybit":  # the budget pays for the rotations
        counted = sum(m.qtensor.storage_bits() for m in linears) / sum(m.qtensor.numel for m in linears)
        assert counted <= bits
    with torch.inference_mode():
        logits = loaded.model(windows[:1]).logits
    assert float(torch.nn.functional.cosine_similarity(logits.flatten(), reference.flatten(), dim=0)) > 0.9


def test_rotate_is_refused_by_recipes_that_do_not_take_it() -> None:
    with pytest.raises(AnybitError, match="--rotate is not an option of method 'rtn'"):
        QuantConfig(method="rtn", rotate=True)


def test_rotate_from_the_command_line(tiny_llama_dir, corpus_file, tmp_path) -> None:
    """quantize --rotate writes rotated layers that load, evaluate and generate; a rotated gptq directory is
    refused by the GPTQ export in one line. (The native decoder's rotations: tests/test_native.py.)"""
    from click.testing import CliRunner

    from anybit.cli import main

    def run(*args):
        return CliRunner().invoke(main, [str(a) for a in args])

    calib = ["--calib", corpus_file, "--nsamples", 2, "--seqlen", 32, "--calib-dtype", "float32"]
    out = tmp_path / "rotated"
    result = run("quantize", tiny_llama_dir, "--bits", 3.25, "--fisher-nsamples", 2, "--rotate", *calib, "--out", out)
    assert result.exit_code == 0, result.output
    loaded = load_model(str(out))
    assert all(m.qtensor.rotation is not None for m in loaded.model.modules() if isinstance(m, QuantLinear))
    result = run("eval", out, "--dataset", corpus_file, "--seqlen", 32, "--max-windows", 2)
    assert result.exit_code == 0, result.output
    result = run("generate", out, "--prompt", "The history of", "--max-new-tokens", 4)
    assert result.exit_code == 0, result.output

    gptq = tmp_path / "gptq"
    assert run("quantize", tiny_llama_dir, "--method", "gptq", "--group", 32, "--rotate", *calib, "--out", gptq)
    result = run("export", gptq, "--out", tmp_path / "never")
    assert result.exit_code != 0 and len(result.output.strip().splitlines()) == 1, result.output
    assert "input rotation" in result.output and not (tmp_path / "never").exists()


def test_tuning_keeps_the_rotation(tiny_llama_dir, corpus_file) -> None:
    """--tune-steps trains the codebooks of rotated layers through W' R, and the tuned layers keep R."""
    loaded = load_model(str(tiny_llama_dir))
    windows = _windows(loaded, corpus_file, n=4)
    config = QuantConfig(
        method="anybit", bits=3.25, rotate=True, calib_dtype="float32", nsamples=4, fisher_nsamples=2, tune_steps=2
    )
    report = calibrate.quantize_model(loaded.model, config, windows, progress=False)
    assert report.tuning and all(step.after <= step.before for step in report.tuning if step.kept)
    linears = [m for m in loaded.model.modules() if isinstance(m, QuantLinear)]
    assert linears and all(m.qtensor.rotation is not None for m in linears)
