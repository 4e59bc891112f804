"""Dynamic error compensation: residual format, channel selection, the compensated product, and the CLI."""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner

from anybit.cli import main
from anybit.model.adapters import ADAPTERS
from anybit.quant.uniform import rtn_quantize
from anybit.runtime.dec import (
    LEVELS,
    CalibrationStats,
    Compensator,
    DecPlan,
    chunk_budgets,
    compensation,
    fit_correction,
    quantize_residual,
    select_channels,
    static_channels,
)
from anybit.runtime.qlinear import QuantLinear


class ExactResidual:
    """An unquantized residual with the `Residual` reading interface."""

    def __init__(self, R: torch.Tensor) -> None:
        self.R = R.float()
        self.out_features = R.shape[0]

    def rows(self, channels: torch.Tensor) -> torch.Tensor:
        return self.R[:, channels].t()


@pytest.mark.parametrize("shape", [(96, 64), (33, 40)])
def test_residual_round_trip_and_error_bound(shape) -> None:
    R = torch.randn(shape) * torch.rand(shape[0], 1)
    res = quantize_residual(R)
    assert res.codes.shape == (shape[1], (shape[0] + 1) // 2) and res.codes.dtype == torch.uint8
    dense = res.dense()
    assert dense.shape == R.shape
    idx = torch.tensor([5, 0, 17])
    torch.testing.assert_close(res.rows(idx), dense[:, idx].t(), rtol=0, atol=0)
    # the scale search includes max|r|/7, whose rounding error is at most half a step per weight
    step = R.abs().amax(dim=1) / LEVELS
    row_mse = (dense - R).square().mean(dim=1)
    assert torch.all(row_mse <= (step / 2).square() * 1.01)
    assert res.storage_bits() == (shape[1] * ((shape[0] + 1) // 2) + 2 * shape[0]) * 8
    # k_chunk 1024 on fewer than 1024 inputs keeps every channel: a token reads all the codes
    assert (
        res.fetch_bytes(1024) == res.codes.numel()
        and res.fetch_bytes(16) == (16 * shape[1] // 1024) * res.codes.shape[1]
    )


def test_chunked_top_k_selection() -> None:
    assert chunk_budgets(1536, 8) == [(0, 1024, 8), (1024, 512, 4)]
    assert chunk_budgets(576, 4) == [(0, 576, 2)]
    x = torch.randn(5, 1536)
    idx = select_channels(x, 8)
    assert idx.shape == (5, 12)
    for row, chosen in zip(x, idx, strict=True):
        first = set(row[:1024].abs().argsort(descending=True)[:8].tolist())
        second = {i + 1024 for i in row[1024:].abs().argsort(descending=True)[:4].tolist()}
        assert set(chosen.tolist()) == first | second
    means = torch.arange(1536.0)
    assert set(static_channels(means, 8).tolist()) == set(range(1016, 1024)) | set(range(1532, 1536))


def test_contribution_score_weighs_channels_by_residual_norm() -> None:
    x = torch.tensor([[3.0, 2.0, 1.0, 0.5]])
    assert set(select_channels(x, 512).tolist()[0]) == {0, 1}  # |x| alone (512 per 1024: 2 of 4)
    norms = torch.tensor([0.1, 1.0, 4.0, 1.0])  # contributions 0.3, 2, 4, 0.5
    assert set(select_channels(x, 512, norms).tolist()[0]) == {1, 2}
    R = torch.randn(6, 4) * norms
    res = quantize_residual(R)
    torch.testing.assert_close(res.row_norms(), res.dense().norm(dim=0))
    assert set(static_channels(x[0], 512, norms).tolist()) == {1, 2}


def _quantized_linear(W: torch.Tensor) -> QuantLinear:
    bitmap = torch.full((W.shape[0], 1), 3, dtype=torch.uint8)
    return QuantLinear(rtn_quantize(W, W.shape[1], bitmap))


def test_compensation_equals_dense_masked_product() -> None:
    W = torch.randn(48, 1100)
    layer = _quantized_linear(W)
    res = quantize_residual(W - layer.dequantize())
    x = torch.randn(2, 3, 1100)
    idx = select_channels(x.reshape(-1, 1100), 16)
    mask = torch.zeros(6, 1100).scatter_(1, idx, 1.0).reshape(2, 3, 1100)
    expected = layer(x) + (x * mask) @ res.dense().t()
    torch.testing.assert_close(layer(x) + Compensator(res, 16)(x), expected, rtol=1e-5, atol=1e-5)
    fixed = static_channels(torch.rand(1100), 16)
    static_mask = torch.zeros(1100).index_fill_(0, fixed, 1.0)
    torch.testing.assert_close(
        Compensator(res, 16, fixed)(x), (x * static_mask) @ res.dense().t(), rtol=1e-5, atol=1e-5
    )


def test_dec_plan_text_and_layer_types() -> None:
    assert DecPlan.parse("8").ks == (8, 8, 8, 8) and str(DecPlan.parse(" 8 ")) == "8"
    assert DecPlan.parse(8).to_json() == 8
    named = DecPlan.parse("qkv=4,down=16")
    assert named.ks == (4, 0, 0, 16) and str(named) == "qkv=4,o=0,gu=0,down=16" == named.to_json()
    assert DecPlan.parse("8,down=16").ks == (8, 8, 8, 16) == DecPlan.parse(str(DecPlan.parse("8,down=16"))).ks
    for bad, message in [("0", "one of them > 0"), ("-2,o=4", ">= 0"), ("attn=4", "unknown layer type"),
                         ("qkv=four", "not an integer"), ("", "not an integer")]:  # fmt: skip
        with pytest.raises(ValueError, match=message):
            DecPlan.parse(bad)
    assert all(len(adapter.groups) == 4 for adapter in ADAPTERS.values())  # the four types, in order
    names = ["model.layers.0.self_attn.k_proj", "model.layers.3.self_attn.o_proj", "model.layers.3.mlp.up_proj",
             "model.layers.11.mlp.down_proj"]  # fmt: skip
    assert list(DecPlan.parse("1,o=2,gu=3,down=4").for_layers(names, ADAPTERS["llama"]).values()) == [1, 2, 3, 4]
    residuals = {name: quantize_residual(torch.randn(10, 2048)) for name in names}  # 5 bytes per row
    # rows kept: 2 chunks of 1024 per layer, k_chunk each; o_proj at 0 reads nothing
    assert DecPlan.parse("1,o=0,gu=3,down=4").fetch_bytes(residuals, ADAPTERS["llama"]) == 2 * (1 + 3 + 4) * 5
    with pytest.raises(ValueError, match="layer type"):
        DecPlan.parse("8").for_layers(["lm_head"], ADAPTERS["llama"])


def test_compensation_per_layer_k_chunk() -> None:
    torch.manual_seed(0)
    layers = {name: _quantized_linear(torch.randn(24, 64)) for name in ("a", "b", "c")}
    residuals = {name: quantize_residual(torch.randn(24, 64)) for name in layers}
    x = torch.randn(5, 64)
    plain = {name: layer(x) for name, layer in layers.items()}
    with compensation(layers, residuals, {"a": 0, "b": 128, "c": 512}):
        out = {name: layer(x) for name, layer in layers.items()}
    torch.testing.assert_close(out["a"], plain["a"])  # k_chunk 0: left alone
    for name, k in [("b", 128), ("c", 512)]:
        torch.testing.assert_close(out[name], plain[name] + Compensator(residuals[name], k)(x))
    with compensation(layers, residuals, {"a": 0, "b": 128, "c": 512}, overlap=False):
        assert all(torch.equal(layer(x), out[name]) for name, layer in layers.items())
    with pytest.raises(ValueError, match="exactly"), compensation(layers, residuals, {"a": 8}):
        pass


def test_all_channels_with_exact_residual_restore_the_layer() -> None:
    W = torch.randn(40, 64)
    layer = _quantized_linear(W)
    layer.kernel = "exact"  # the stored values: the residual is exact against them
    x = torch.randn(7, 64)
    out = layer(x) + Compensator(ExactResidual(W - layer.dequantize()), k_chunk=1024)(x)
    torch.testing.assert_close(out, F.linear(x, W), rtol=1e-4, atol=1e-4)


def _correlated_inputs(n: int, d: int, noise_seed: int) -> torch.Tensor:
    """Tokens of unequal channel scales, mixed by one fixed random matrix (so channels correlate)."""
    mix = torch.eye(d) + 0.3 * torch.randn(d, d, generator=torch.Generator().manual_seed(0))
    noise = torch.randn(n, d, generator=torch.Generator().manual_seed(noise_seed))
    return (noise * torch.linspace(0.2, 3, d)) @ mix


def _selected(x: torch.Tensor, k_chunk: int) -> torch.Tensor:
    idx = select_channels(x, k_chunk)
    return torch.zeros_like(x).scatter_(1, idx, x.gather(1, idx))


def test_correction_statistics_and_fit() -> None:
    d, out = 64, 24
    R = 0.1 * torch.randn(out, d)
    layers = {"q": torch.nn.Linear(d, 8), "k": torch.nn.Linear(d, 8), "down": torch.nn.Linear(d, 8)}
    stats = CalibrationStats(layers, k_chunks=128)  # 8 of 64 channels per token
    x = _correlated_inputs(300, d, noise_seed=1)
    layers["q"](x), layers["k"](x)  # the same tensor: computed once, counted for both
    layers["down"](x[:100]), layers["down"](x[100:])  # accumulated over calls
    stats.remove()
    z = _selected(x, 128)
    for name in layers:
        torch.testing.assert_close(stats.sums[name]["A"].float(), x.t() @ z, rtol=1e-4, atol=1e-3)
        torch.testing.assert_close(stats.sums[name]["G"].float(), z.t() @ z, rtol=1e-4, atol=1e-3)
        torch.testing.assert_close(stats.sums[name]["D"].float(), x.square().sum(0), rtol=1e-4, atol=1e-3)
        torch.testing.assert_close(stats.mean_abs()[name], x.abs().mean(0))
    C = stats.fit("q", R, ridge=0.01).dense()

    def left(M: torch.Tensor, x: torch.Tensor) -> float:  # share of the layer error R x the correction leaves
        error = x @ R.t()
        return ((error - _selected(x, 128) @ M.t()).square().sum() / error.square().sum()).item()

    held_out = _correlated_inputs(2000, d, noise_seed=7)
    assert left(C, x) < left(R, x) and left(C, held_out) < left(R, held_out)
    # every channel selected: the fit is the residual itself, whatever the ridge
    A = G = x.t() @ x
    torch.testing.assert_close(fit_correction(R, A, G, x.square().sum(0), ridge=0.5), R, rtol=1e-4, atol=1e-4)
    # a channel never selected keeps its residual
    A, G = A.clone(), G.clone()
    A[:, 3] = G[:, 3] = G[3, :] = 0
    torch.testing.assert_close(fit_correction(R, A, G, x.square().sum(0), ridge=0.1)[:, 3], R[:, 3])


def test_dec_cli_end_to_end(tiny_llama_dir, corpus_file, tmp_path) -> None:
    run = CliRunner().invoke
    out = tmp_path / "q"
    common = ["--dataset", str(corpus_file), "--seqlen", "64", "--max-windows", "4", "--json"]
    result = run(main, ["eval", str(out), "--dec", "8", *common])
    assert result.exit_code != 0
    result = run(main, ["quantize", str(tiny_llama_dir), "--method", "rtn", "--bits", "2", "--group", "32",
                        "--out", str(out), "--residual", "--calib", str(corpus_file), "--seqlen", "64",
                        "--nsamples", "2"])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "wrote residuals" in result.output and (out / "residuals.safetensors").is_file()

    def ppl(*extra: str) -> float:
        result = run(main, ["eval", str(out), *common, *extra])
        assert result.exit_code == 0, result.output
        return json.loads(result.stdout)["ppl"]

    fp = json.loads(run(main, ["eval", str(tiny_llama_dir), *common]).stdout)["ppl"]
    plain, every = ppl(), ppl("--dec", "1024")
    # all channels with a 4-bit residual: close to the unquantized model, much closer than without DEC
    assert abs(every - fp) < 0.2 * abs(plain - fp)
    assert ppl("--dec", "1024") == every  # deterministic
    static = ppl("--dec", "256", "--dec-static")
    assert static != plain
    contribution, ppl_plain_256 = ppl("--dec", "256", "--dec-score", "contribution"), ppl("--dec", "256")
    assert contribution != ppl_plain_256 and abs(contribution - fp) < abs(plain - fp)
    bench = run(main, ["bench", str(out), "--dec", "8", "--prompt-tokens", "8", "--new-tokens", "2", "--json"])
    assert bench.exit_code == 0 and json.loads(bench.stdout)["dec"] == 8, bench.output
    bad = run(main, ["eval", str(tiny_llama_dir), "--dec", "8", *common])
    assert bad.exit_code != 0 and "quantized directory" in bad.output
    result = run(main, ["residual", str(out), "--fit", "256", "--calib", str(corpus_file), "--seqlen", "64",
                        "--nsamples", "2"])  # fmt: skip
    assert result.exit_code == 0 and "fitted for --dec 256" in result.output, result.output
    fitted = ppl("--dec", "256")
    assert math.isfinite(fitted) and fitted != ppl_plain_256
    with pytest.warns(UserWarning, match="fitted for dynamic --dec 256"):
        ppl("--dec", "8")


def test_dec_cli_per_layer_type_plans(tiny_llama_dir, corpus_file, tmp_path) -> None:
    run = CliRunner().invoke
    out = tmp_path / "q"
    common = ["--dataset", str(corpus_file), "--seqlen", "64", "--max-windows", "4", "--json"]
    result = run(main, ["quantize", str(tiny_llama_dir), "--method", "rtn", "--bits", "2", "--group", "32",
                        "--out", str(out), "--residual", "--calib", str(corpus_file), "--seqlen", "64",
                        "--nsamples", "2"])  # fmt: skip
    assert result.exit_code == 0, result.output

    def evaluate(*extra: str) -> dict:
        result = run(main, ["eval", str(out), *common, *extra])
        assert result.exit_code == 0, result.output
        return json.loads(result.stdout)

    plain, every = evaluate()["ppl"], evaluate("--dec", "1024")["ppl"]
    assert evaluate("--dec", "1024,down=1024")["ppl"] == every  # a plan naming the default is the default
    down_only = evaluate("--dec", "down=1024")
    assert down_only["dec"] == "qkv=0,o=0,gu=0,down=1024"
    assert len({plain, down_only["ppl"], every}) == 3
    bad = run(main, ["eval", str(out), *common, "--dec", "mlp=4"])
    assert bad.exit_code == 2 and "unknown layer type 'mlp'" in bad.output
    result = run(main, ["residual", str(out), "--fit", "256,down=512", "--calib", str(corpus_file), "--seqlen",
                        "64", "--nsamples", "2"])  # fmt: skip
    assert result.exit_code == 0 and "fitted for --dec qkv=256,o=256,gu=256,down=512" in result.output, result.output
    assert math.isfinite(evaluate("--dec", "256,down=512")["ppl"])
    with pytest.warns(UserWarning, match="not --dec 256"):
        evaluate("--dec", "256")
