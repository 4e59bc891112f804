"""The vector-codebook layout (`format.vector`) and its recipe (`--method vq`): decoding against the layout's
definition, exact storage counts, every damaged stored tensor named, the fixed tables checked, and the recipe end
to end on a tiny model (budget met, saved and loaded bit-exactly, tuned, refused where it cannot run)."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from click.testing import CliRunner

from anybit.cli import main
from anybit.config import QuantConfig
from anybit.format.rotation import InputRotation
from anybit.format.vector import VectorTensor, coded_tensor_from_stored
from anybit.format.vector_tables import INDEX_BITS, TABLE_FILE, TABLE_SHA256, vector_table
from anybit.methods.vector import PIECE, WIDTHS, layout_of, stored_bits
from anybit.model.checkpoint import load_quantized
from anybit.quant.vector_codebooks import nearest_entries
from anybit.runtime.qlinear import QuantLinear, quant_linears
from damage import damaged_copy


def _run(*args: object):
    return CliRunner().invoke(main, [str(a) for a in args])


def _vector_tensor(
    rows: int = 6, cols: int = 32, index_bits: int = 9, perm: bool = True, rotate: bool = True, dim: int = PIECE
):
    g = torch.Generator().manual_seed(index_bits)
    codes = torch.randint(0, 1 << index_bits, (rows, cols // dim), generator=g)
    scales = torch.rand(rows, generator=g) + 0.5
    order = torch.randperm(cols, generator=g) if perm else None
    qt = VectorTensor.from_codes(codes, scales, (rows, cols), dim, index_bits, order)
    if rotate:
        qt = VectorTensor(**{**qt.__dict__, "rotation": InputRotation.random(cols, g)})
    return qt, codes, scales.half().float(), order


@pytest.mark.parametrize("dim,index_bits", [(4, 4), (4, 8), (4, 9), (4, 11), (2, 7), (2, 11)])
def test_decoding_follows_the_layout_definition(dim: int, index_bits: int) -> None:
    qt, codes, scales, perm = _vector_tensor(index_bits=index_bits, dim=dim)
    table = vector_table(dim, index_bits).float()
    coded = torch.zeros(qt.shape)  # W' in the coded column order, piece by piece
    for r in range(qt.shape[0]):
        for p in range(qt.shape[1] // dim):
            coded[r, p * dim : (p + 1) * dim] = scales[r] * table[codes[r, p]]
    rotated = torch.zeros(qt.shape)
    rotated[:, perm] = coded  # W'[:, perm] is the coded matrix
    expected = rotated @ qt.rotation.matrix(qt.shape[1])  # W = W' R
    torch.testing.assert_close(qt.dequantize(), expected, atol=1e-5, rtol=1e-5)
    assert torch.equal(qt.unpacked_codes(), codes)


@pytest.mark.parametrize("perm,rotate", [(False, False), (True, False), (True, True)])
def test_stored_tensors_round_trip_and_are_counted_exactly(perm: bool, rotate: bool) -> None:
    qt, *_ = _vector_tensor(rows=5, cols=40, index_bits=10, perm=perm, rotate=rotate)
    again = coded_tensor_from_stored(json.loads(json.dumps(qt.meta())), qt.to_tensors())
    assert isinstance(again, VectorTensor)
    assert torch.equal(again.dequantize(), qt.dequantize())
    stored = sum(t.numel() * t.element_size() for t in qt.to_tensors().values()) * 8
    config = QuantConfig(method="vq", act_order=perm, rotate=rotate)
    assert qt.storage_bits() == stored == stored_bits(qt.shape, 10, config)
    assert qt.nominal_bits() == 2.5


def _damages(t: torch.Tensor) -> dict[str, torch.Tensor | None]:
    out = {"missing": None, "cut": t[:-1], "float32": t.float(), "int32": t.to(torch.int32)}
    return {k: v for k, v in out.items() if v is None or v.dtype != t.dtype or v.shape != t.shape}


def test_every_damaged_stored_tensor_is_named() -> None:
    qt, *_ = _vector_tensor()
    stored = qt.to_tensors()
    tried = 0
    for key, tensor in stored.items():
        for damage, value in _damages(tensor).items():
            if value is None and key == "perm":
                continue  # optional: only the directory's bit count reveals it gone (tests/test_reliability.py)
            damaged = {k: v for k, v in stored.items() if k != key}
            if value is not None:
                damaged[key] = value
            named = "rot_mix" if key == "rot_signs" and damage == "cut" else key
            with pytest.raises(ValueError, match=f"^({named}|{key}): "):
                VectorTensor.from_tensors(qt.meta(), damaged)
            tried += 1
    assert tried >= 3 * len(stored)
    bad = {
        "scales": stored["scales"].clone().fill_(float("nan")),
        "perm": torch.zeros_like(stored["perm"]),
        "rot_mix": 2 * stored["rot_mix"],
    }
    for key, value in bad.items():
        with pytest.raises(ValueError, match=f"^{key}: "):
            VectorTensor.from_tensors(qt.meta(), {**stored, key: value})
    with pytest.raises(ValueError, match="unexpected stored tensors codes_9"):
        VectorTensor.from_tensors(qt.meta(), {**stored, "codes_9": stored["codes"]})


@pytest.mark.parametrize(
    "edit",
    [{"index_bits": 13}, {"index_bits": "ten"}, {"group_size": 3}, {"group_size": 5}, {"axis": 1}, {"shape": [6]}],
)
def test_bad_metadata_is_refused(edit: dict) -> None:
    qt, *_ = _vector_tensor()
    with pytest.raises(ValueError):
        coded_tensor_from_stored({**qt.meta(), **edit}, qt.to_tensors())


@pytest.mark.parametrize("dim", sorted(INDEX_BITS))
def test_the_shipped_tables_are_the_checked_ones(dim: int) -> None:
    import hashlib

    assert hashlib.sha256(TABLE_FILE.read_bytes()).hexdigest() == TABLE_SHA256
    samples = torch.randn(20000, dim, generator=torch.Generator().manual_seed(7))  # not the fitting samples
    distortion = []
    for k in INDEX_BITS[dim]:
        table = vector_table(dim, k)
        assert table.dtype == torch.float16 and table.shape == (1 << k, dim)
        assert bool(torch.isfinite(table).all()) and torch.unique(table, dim=0).shape[0] == 1 << k
        coded = table.float()[nearest_entries(samples, torch.ones_like(samples), table.float())]
        distortion.append(float((samples - coded).square().mean()))
        # K-means centroids: E|x|² = E|Q(x)|² + E|x − Q(x)|² (up to sampling and fp16 rounding)
        energy = float(coded.square().mean()) + distortion[-1]
        assert energy == pytest.approx(float(samples.square().mean()), rel=0.02)
    # each added index bit (1/d bit per weight) lowers the distortion by about 2^(-2/d)
    ratios = torch.tensor(distortion[1:]) / torch.tensor(distortion[:-1]) / 2 ** (-2 / dim)
    assert bool((ratios < 1.2).all()) and bool((ratios > 0.85).all()), ratios


@pytest.mark.parametrize("index_bits", [5, 11])
def test_kernel_code_streams_follow_their_definition(index_bits: int) -> None:
    """Each row's codes as one little-endian stream of k-bit fields, read back bit by bit."""
    from anybit.kernels.cpu_vector import bit_streams

    qt, codes, *_ = _vector_tensor(rows=5, cols=76, index_bits=index_bits)  # 19 codes: rows end mid-byte
    stream, row_bytes = bit_streams(qt)
    assert row_bytes == -(-19 * index_bits // 8) and stream.numel() == 5 * row_bytes + 8
    for r in range(5):
        row = stream[r * row_bytes : (r + 1) * row_bytes].tolist()
        bits = [(row[i // 8] >> (i % 8)) & 1 for i in range(8 * row_bytes)]
        for p in range(19):
            assert sum(bits[p * index_bits + i] << i for i in range(index_bits)) == int(codes[r, p])


@pytest.mark.parametrize("batch", [1, 3, 8, 20, 70])  # 70: the decoded matrix and one GEMM
@pytest.mark.parametrize("isa", ["native", "avx2", "portable"])
@pytest.mark.parametrize("backend", ["fast", "exact"])
@pytest.mark.parametrize("dim,index_bits", [(4, 5), (4, 11), (2, 7), (2, 11)])  # tables spread over slots, and not
def test_cpu_kernel_matches_the_reference(
    batch: int, isa: str, backend: str, dim: int, index_bits: int, monkeypatch
) -> None:
    from anybit.kernels import cpu_vector

    monkeypatch.setenv("ANYBIT_CPU_ISA", isa)
    # 19 or 38 pieces: the unrolled loops and their tails
    qt, *_ = _vector_tensor(rows=37, cols=76, index_bits=index_bits, dim=dim)
    layer, reference = QuantLinear(qt), QuantLinear(qt)
    layer.kernel, reference.kernel = backend, "reference"
    assert not cpu_vector.unavailable(qt) and layer.backend("cpu") == backend
    x = torch.randn(batch, 76)
    expected = reference(x)
    # the same products summed in another order, and the rotation applied to x instead of to W: float32
    # rounding, a few ulps of the sum of the products' magnitudes (the rotation adds a few steps)
    coded = dataclasses.replace(qt, rotation=None).dequantize()  # W' = W Rᵀ
    bound = 1e-5 * (qt.rotated_input(x).abs() @ coded.abs().T) + 1e-7
    assert bool(((layer(x) - expected).abs() <= bound).all())


# ---- the recipe, end to end on a tiny model -----------------------------------------------------------------
@pytest.fixture(scope="module")
def vq_dir(tiny_llama_dir, corpus_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("vq") / "q"
    calib = ["--calib", corpus_file, "--nsamples", 4, "--seqlen", 32, "--calib-dtype", "float32"]
    result = _run("quantize", tiny_llama_dir, "--method", "vq", "--bits", 2.5, "--fisher-nsamples", 2, *calib,
                  "--out", out)  # fmt: skip
    assert result.exit_code == 0, result.output
    return out


def test_vq_meets_its_budget_in_counted_bits(vq_dir) -> None:
    info = json.loads((vq_dir / "anybit.json").read_text())
    assert info["method"] == "vq" and info["config"]["rotate"] and info["config"]["act_order"]
    assert 2.5 - 0.3 < info["bits_per_weight"] <= 2.5
    model, _, _ = load_quantized(vq_dir)
    layers = dict(quant_linears(model))
    assert all(isinstance(m.qtensor, VectorTensor) and m.qtensor.rotation is not None for m in layers.values())
    bits = sum(m.qtensor.storage_bits() for m in layers.values()) / sum(m.qtensor.numel for m in layers.values())
    assert bits == pytest.approx(info["bits_per_weight"])


def test_vq_directory_reloads_exactly_and_runs(vq_dir, tiny_llama_dir, corpus_file) -> None:
    model, _, _ = load_quantized(vq_dir)
    again, _, _ = load_quantized(vq_dir)
    ids = torch.arange(1, 17)[None, :]
    with torch.inference_mode():
        assert torch.equal(model(ids).logits, again(ids).logits)
    assert all(layer.backend("cpu") == "fast" for _, layer in quant_linears(model))
    for command in (["eval", vq_dir, "--dataset", corpus_file, "--seqlen", 32, "--max-windows", 2],
                    ["inspect", vq_dir]):  # fmt: skip
        result = _run(*command)
        assert result.exit_code == 0, result.output


def test_vq_directory_decodes_natively(vq_dir) -> None:
    """`generate` and `bench` run a vq directory on the native decoder, loaded without transformers' model
    code; the text is the eager loop's."""
    prompt = ["--prompt", "The history of", "--max-new-tokens", 8]
    native, eager = _run("generate", vq_dir, *prompt), _run("generate", vq_dir, *prompt, "--decoder", "eager")
    assert native.exit_code == eager.exit_code == 0, native.output + eager.output
    assert "eager path" not in native.output and native.stdout == eager.stdout and native.stdout.strip()
    bench = _run("bench", vq_dir, "--json", "--prompt-tokens", 8, "--new-tokens", 4, "--repeats", 1)
    assert bench.exit_code == 0, bench.output
    result = json.loads(bench.stdout.strip().splitlines()[-1])
    assert (result["decoder"], result["loader"], result["kernel"]) == ("native", "native", "auto")
    assert result["kernel_bytes"] > 0


def test_vq_layout_metadata_out_of_range_is_refused(vq_dir, tmp_path) -> None:
    """(Damaged stored tensors of a vq directory: tests/test_reliability.py, with every other layout.)"""
    name = "model.layers.0.self_attn.q_proj"
    info = json.loads((vq_dir / "anybit.json").read_text())
    info["layers"][name]["index_bits"] = 12
    bad_meta = tmp_path / "bad_meta"
    damaged_copy(vq_dir, bad_meta, lambda tensors: None)
    (bad_meta / "anybit.json").write_text(json.dumps(info))
    result = _run("eval", bad_meta, "--max-windows", 1)
    assert result.exit_code != 0 and name in result.output, result.output


def test_vq_scales_tune_with_the_codes_fixed(tiny_llama_dir, corpus_file, tmp_path) -> None:
    out = tmp_path / "tuned"
    calib = ["--calib", corpus_file, "--nsamples", 4, "--seqlen", 32, "--calib-dtype", "float32"]
    result = _run("quantize", tiny_llama_dir, "--method", "vq", "--bits", 2.25, "--fisher-nsamples", 2,
                  "--tune-steps", 4, *calib, "--out", out)  # fmt: skip
    assert result.exit_code == 0, result.output
    info = json.loads((out / "anybit.json").read_text())
    assert info["bits_per_weight"] <= 2.25 and len(info["tuning"]) == 2


def test_vq_refusals_come_before_any_work(tiny_llama_dir, corpus_file, tmp_path) -> None:
    calib = ["--calib", corpus_file, "--nsamples", 2, "--seqlen", 32]
    result = _run("quantize", tiny_llama_dir, "--method", "vq", "--bits", 0.9, *calib, "--out", tmp_path / "a")
    assert result.exit_code != 0 and "bit budget in 1-5.5" in result.output, result.output
    result = _run("quantize", tiny_llama_dir, "--method", "vq", "--bits", 1.0, *calib, "--out", tmp_path / "b")
    assert result.exit_code != 0 and "below the model's minimum" in result.output, result.output
    result = _run("quantize", tiny_llama_dir, "--method", "vq", "--group", 64, *calib, "--out", tmp_path / "c")
    assert result.exit_code != 0 and "not an option of method 'vq'" in result.output, result.output
    assert not any(tmp_path.iterdir())


def test_vq_refuses_inputs_that_do_not_cut_into_pieces() -> None:
    from anybit.methods import get_method

    assert "pieces of 4" in get_method("vq").shape_problem((8, 30))
    assert not get_method("vq").shape_problem((8, 32))


def test_vq_without_rotation_or_act_order(tiny_llama_dir, corpus_file) -> None:
    import anybit.calibrate as calibrate
    from anybit.data import calibration_windows, load_corpus, tokenize_corpus
    from anybit.model import load_model

    loaded = load_model(str(tiny_llama_dir))
    ids = tokenize_corpus(loaded.tokenizer, load_corpus(str(corpus_file)))
    windows = calibration_windows(ids, 4, 32, seed=0)
    config = QuantConfig(method="vq", bits=2.75, rotate=False, act_order=False, nsamples=4, fisher_nsamples=2,
                         calib_dtype="float32")  # fmt: skip
    calibrate.quantize_model(loaded.model, config, windows, progress=False)
    linears = [m for m in loaded.model.modules() if isinstance(m, QuantLinear)]
    assert all(m.qtensor.rotation is None and m.qtensor.perm is None for m in linears)
    assert sum(m.qtensor.storage_bits() for m in linears) <= 2.75 * sum(m.qtensor.numel for m in linears)


def test_vq_error_table_falls_with_width_and_counts_what_is_stored() -> None:
    from anybit.methods import get_method
    from anybit.methods.base import LayerStats
    from anybit.quant.gptq import HessianAccumulator

    g = torch.Generator().manual_seed(3)
    W = torch.randn(40, 64, generator=g)
    acc = HessianAccumulator(64)
    acc.add_batch(torch.randn(256, 64, generator=g))
    config = QuantConfig(method="vq", bits=2.5, rotate=False)
    table = get_method("vq").row_table(W, LayerStats(acc), config)
    assert table.widths == list(WIDTHS) and table.errors.shape == (1, len(WIDTHS))
    assert bool((table.errors[0, 1:] < table.errors[0, :-1]).all())
    for width, cost in zip(WIDTHS, table.costs[0].tolist(), strict=True):
        dim, k = layout_of(width)
        codes = torch.zeros(40, 64 // dim, dtype=torch.int64)
        qt = VectorTensor.from_codes(codes, torch.ones(40), (40, 64), dim, k, torch.arange(64))
        assert cost == qt.storage_bits() == stored_bits((40, 64), width, config)
        assert 8 * qt.codes.numel() == 40 * 64 * width // PIECE  # a width counts index bits per 4 weights


def test_a_damaged_table_file_is_refused(monkeypatch, tmp_path) -> None:
    import anybit.format.vector_tables as tables
    from anybit.errors import AnybitError

    damaged = tmp_path / "tables.safetensors"
    data = bytearray(TABLE_FILE.read_bytes())
    data[-1] ^= 1
    damaged.write_bytes(bytes(data))
    monkeypatch.setattr(tables, "TABLE_FILE", damaged)
    tables._all_tables.cache_clear()
    try:
        with pytest.raises(AnybitError, match="damaged"):
            vector_table(PIECE, 10)
    finally:
        tables._all_tables.cache_clear()
