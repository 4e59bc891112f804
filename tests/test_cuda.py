"""The whole pipeline on a CUDA device: every recipe quantizes there, and the fused decode kernel and
DEC kernel agree with the reference path inside a real model. Skipped, with the reason shown, where
no CUDA device is present (CI); run on the GPU machine with `pytest tests/test_cuda.py`."""

import json
import math
from contextlib import nullcontext

import pytest
import torch
from click.testing import CliRunner

from anybit.cli import main

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device: GPU pipeline not tested")

RECIPES = {
    "rtn": ["--bits", "3", "--group", "32"],
    "gptq": ["--bits", "3", "--group", "32"],
    "kmeans": ["--bits", "3"],
    "squeezellm": ["--bits", "3"],
    "claq": ["--bits", "2.5"],
    "slim": ["--bits", "2.5", "--group", "32"],
    "skim": ["--bits", "2.5"],
    "anybit": ["--bits", "3.25"],
}


def _run(*args: str) -> str:
    result = CliRunner().invoke(main, list(args))
    assert result.exit_code == 0, result.output
    return result.stdout


def _calib(corpus_file) -> list[str]:
    return ["--calib", str(corpus_file), "--seqlen", "64", "--nsamples", "4"]


@pytest.mark.parametrize("method", sorted(RECIPES))
def test_every_recipe_quantizes_on_cuda(method, tiny_llama_dir, corpus_file, tmp_path) -> None:
    out = tmp_path / "q"
    _run("quantize", str(tiny_llama_dir), "--method", method, *RECIPES[method], "--device", "cuda",
         "--out", str(out), *_calib(corpus_file))  # fmt: skip
    evals = {}
    for device in ("cpu", "cuda"):
        text = _run("eval", str(out), "--device", device, "--dataset", str(corpus_file), "--seqlen", "64",
                    "--max-windows", "4", "--json")  # fmt: skip
        evals[device] = json.loads(text)["ppl"]
    assert math.isfinite(evals["cuda"]) and evals["cuda"] == pytest.approx(evals["cpu"], rel=1e-3)


def test_decode_kernel_and_dec_kernel_inside_the_model(tiny_llama_dir, corpus_file, tmp_path) -> None:
    from anybit.model import load_model
    from anybit.runtime.dec import Compensator, compensation
    from anybit.runtime.qlinear import quant_linears

    out = tmp_path / "q"
    _run("quantize", str(tiny_llama_dir), "--method", "skim", "--bits", "2.5", "--device", "cuda",
         "--out", str(out), "--residual", *_calib(corpus_file))  # fmt: skip
    model = load_model(str(out)).model.to("cuda")
    layers = dict(quant_linears(model))
    ids = torch.tensor([[5, 17, 42]], device="cuda")  # 3 tokens: the fused kernel serves them
    with torch.inference_mode():
        fused = model(ids).logits
        for layer in layers.values():
            layer.kernel = "reference"
        reference = model(ids).logits
    torch.testing.assert_close(fused, reference, rtol=1e-3, atol=1e-3)

    from anybit.model.checkpoint import load_residuals

    residual = load_residuals(str(out))[0][next(iter(layers))]
    x = torch.randn(3, residual.in_features, device="cuda")
    expected = Compensator(residual, 16, kernel="reference")(x)
    torch.testing.assert_close(Compensator(residual, 16, kernel="triton")(x), expected, rtol=1e-4, atol=1e-5)

    residuals = load_residuals(str(out))[0]
    with torch.inference_mode():
        logits = {}
        for overlap in (False, True):  # compensation on the base product's stream, then on a second one
            with compensation(layers, residuals, 16, overlap=overlap):
                logits[overlap] = model(ids).logits
    torch.testing.assert_close(logits[True], logits[False], rtol=1e-4, atol=1e-4)
    assert not torch.allclose(logits[True], fused, rtol=1e-4, atol=1e-4)  # the compensation was added


def test_cuda_graph_decoding_matches_eager(tiny_llama_dir, corpus_file, tmp_path) -> None:
    from anybit.bench import StaticDecoder
    from anybit.model import load_model
    from anybit.model.checkpoint import load_residuals
    from anybit.runtime.dec import compensation
    from anybit.runtime.qlinear import quant_linears

    out = tmp_path / "q"
    _run("quantize", str(tiny_llama_dir), "--method", "anybit", "--bits", "3.25", "--device", "cuda",
         "--out", str(out), "--residual", *_calib(corpus_file))  # fmt: skip
    model = load_model(str(out)).model.to("cuda")
    prompt = torch.tensor([[5, 17, 42, 7, 99]], device="cuda")
    residuals = load_residuals(str(out))[0]
    with torch.inference_mode():
        for dec in (0, 16):  # the fused kernels alone, then with DEC on its second stream
            with compensation(dict(quant_linears(model)), residuals, dec) if dec else nullcontext():
                runs = []
                for graph in (False, True):
                    decoder = StaticDecoder(model, max_len=24, graph=graph)
                    runs.append([decoder.prefill(prompt).item()] + [decoder.step().item() for _ in range(10)])
            assert runs[0] == runs[1], dec


def test_block_and_end_to_end_tuning_on_cuda(tiny_llama_dir, corpus_file, tmp_path) -> None:
    """`quantize --tune-steps` and `anybit tune --device cuda` run on the GPU; the written model loads on the
    CPU, and the held-out KL before tuning is the CPU run's (the same model judged on either device)."""
    quantized = tmp_path / "q"
    _run("quantize", str(tiny_llama_dir), "--method", "anybit", "--bits", "3.25", "--tune-steps", "4",
         "--device", "cuda", "--out", str(quantized), *_calib(corpus_file))  # fmt: skip
    options = ["--steps", "4", "--nsamples", "8", "--seqlen", "64", "--calib", str(corpus_file)]
    records = {}
    for device in ("cpu", "cuda"):
        tuned = tmp_path / f"t-{device}"
        _run("tune", str(quantized), "--out", str(tuned), "--device", device, *options)
        records[device] = json.loads((tuned / "anybit.json").read_text())["end_to_end_tuning"]
        text = _run("eval", str(tuned), "--dataset", str(corpus_file), "--seqlen", "64", "--max-windows", "4", "--json")
        assert math.isfinite(json.loads(text)["ppl"])
    assert records["cuda"]["device"] == "cuda"
    assert records["cuda"]["before"] == pytest.approx(records["cpu"]["before"], rel=1e-3)
