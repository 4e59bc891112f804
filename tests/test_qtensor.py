import pytest
import torch
from safetensors.torch import load_file, save_file

from anybit.format.qtensor import QuantizedTensor, SparseOutliers
from anybit.quant.uniform import rtn_quantize


def _mixed_uniform(shape=(12, 96), group_size=32, axis=0, perm=None, outliers=None):
    lines, line_len = shape if axis == 0 else shape[::-1]
    groups = line_len // group_size
    bitmap = torch.randint(1, 9, (lines, groups), dtype=torch.uint8)
    maxq = (2 ** bitmap.long() - 1).repeat_interleave(group_size, dim=1)
    codes = (torch.rand(lines, line_len) * (maxq + 1)).long().clamp(max=maxq)
    scales = (torch.rand(lines, groups) + 0.01).half().float()
    zeros = (torch.rand(lines, groups) * (2 ** bitmap.float())).long().clamp(max=2 ** bitmap.long() - 1)
    qt = QuantizedTensor.from_uniform(codes, scales, zeros, bitmap, shape, group_size, axis, perm, outliers)
    z = zeros.repeat_interleave(group_size, dim=1)
    s = scales.repeat_interleave(group_size, dim=1)
    dense = (codes - z) * s
    return qt, dense if axis == 0 else dense.t()


def _round_trip(qt: QuantizedTensor, tmp_path) -> QuantizedTensor:
    save_file(qt.to_tensors(), tmp_path / "t.safetensors")
    return QuantizedTensor.from_tensors(qt.meta(), load_file(tmp_path / "t.safetensors"))


@pytest.mark.parametrize("axis,group_size", [(0, 32), (0, 96), (1, 4), (1, 12)])
def test_mixed_width_uniform_decodes_exactly(axis: int, group_size: int, tmp_path) -> None:
    qt, dense = _mixed_uniform(group_size=group_size, axis=axis)
    assert torch.equal(qt.dequantize(), dense)
    back = _round_trip(qt, tmp_path)
    assert torch.equal(back.dequantize(), dense)
    assert back.dequantize().dtype == torch.float32


def test_codebook_with_mixed_widths(tmp_path) -> None:
    rows, cols = 10, 64
    bitmap = torch.randint(1, 5, (rows, 1), dtype=torch.uint8)
    books = torch.randn(rows, 1, 16).half().float()
    codes = (torch.rand(rows, cols) * (2 ** bitmap.float())).long()
    qt = QuantizedTensor.from_codebook(codes, books, bitmap, (rows, cols), cols)
    expected = torch.gather(books[:, 0], 1, codes)
    assert torch.equal(qt.dequantize(), expected)
    assert torch.equal(_round_trip(qt, tmp_path).dequantize(), expected)


def test_perm_and_outliers(tmp_path) -> None:
    W = torch.randn(8, 64)
    perm = torch.randperm(64)
    mask = torch.rand(8, 64) < 0.05
    outliers = SparseOutliers.from_mask(W, mask)
    qt, coded = _mixed_uniform(shape=(8, 64), perm=perm, outliers=outliers)
    expected = torch.empty_like(coded)
    expected[:, perm] = coded
    expected[mask] = W[mask].half().float()
    assert torch.equal(qt.dequantize(), expected)
    assert torch.equal(_round_trip(qt, tmp_path).dequantize(), expected)


def test_storage_bits_match_file_and_formula(tmp_path) -> None:
    W = torch.randn(576, 1536)
    qt = rtn_quantize(W, 64, torch.full((576, 24), 4, dtype=torch.uint8))
    groups = 576 * 24
    # codes 4 bits, fp16 scale and 4-bit zero per group, one byte for the constant bit map
    assert qt.storage_bits() == W.numel() * 4 + groups * (16 + 4) + 8
    assert abs(qt.bits_per_weight() - (4 + 20 / 64)) < 1e-4
    path = tmp_path / "t.safetensors"
    save_file(qt.to_tensors(), path)
    header = path.stat().st_size - qt.storage_bits() // 8
    assert 0 < header < 1024  # the file is the counted bytes plus a small JSON header


def test_layout_errors() -> None:
    with pytest.raises(ValueError, match="does not divide"):
        QuantizedTensor.from_uniform(
            torch.zeros(4, 60), torch.ones(4, 1), torch.zeros(4, 1), torch.full((4, 1), 4), (4, 60), 64
        )


def test_dense_and_sparse_round_trip(tmp_path) -> None:
    from anybit.quant.outliers import outlier_mask

    W = torch.randn(64, 128)
    W[3, 5] = 40.0
    importance = torch.rand(64, 128)
    mask = outlier_mask(W, 0.01, 0.005, importance)
    assert mask[3, 5]
    assert int(mask.sum()) <= round(0.015 * W.numel())
    sparse = SparseOutliers.from_mask(W, mask)
    assert sparse.row_counts.dtype == torch.uint8 and sparse.col_idx.dtype == torch.int16
    qt = rtn_quantize(W, 32, torch.full((64, 4), 3, dtype=torch.uint8))
    qt = QuantizedTensor(**{**qt.__dict__, "outliers": sparse})
    back = _round_trip(qt, tmp_path).dequantize()
    assert torch.equal(back[mask], W[mask].half().float())  # kept weights come back as fp16
    assert torch.equal(back[~mask], rtn_quantize(W, 32, qt.bitmap).dequantize()[~mask])
    # counted: one byte per row count, 16-bit column index and fp16 value per outlier
    assert qt.storage_bits() - rtn_quantize(W, 32, qt.bitmap).storage_bits() == 64 * 8 + sparse.nnz * 32


def test_group_bitmap_is_stored_once_per_group(tmp_path) -> None:
    W = torch.randn(32, 256)
    per_group = torch.tensor([2, 3, 4, 3], dtype=torch.uint8)
    qt = rtn_quantize(W, 64, per_group[None, :].expand(32, 4))
    tensors = qt.to_tensors()
    assert "bitmap_groups" in tensors and tensors["bitmap_groups"].numel() == 3  # 4 widths × 3 bits, padded
    back = _round_trip(qt, tmp_path)
    assert torch.equal(back.bitmap, qt.bitmap)
    assert torch.equal(back.dequantize(), qt.dequantize())


# ---- every stored tensor is checked against its layout when read back ---------------------------------------
def _full_codebook_tensor() -> QuantizedTensor:
    """Mixed widths, a permutation, a scaling vector and outliers: every optional stored tensor present."""
    rows, cols, group = 8, 64, 32
    bitmap = torch.randint(1, 5, (rows, cols // group), dtype=torch.uint8)
    books = torch.randn(rows, cols // group, 16)
    codes = (torch.rand(rows, cols) * (2 ** bitmap.float()).repeat_interleave(group, dim=1)).long()
    outliers = SparseOutliers.from_mask(torch.randn(rows, cols), torch.rand(rows, cols) < 0.1)
    col_scale = torch.rand(cols) + 0.5
    return QuantizedTensor.from_codebook(
        codes, books, bitmap, (rows, cols), group, perm=torch.randperm(cols), outliers=outliers, col_scale=col_scale
    )


def _layouts() -> dict[str, QuantizedTensor]:
    torch.manual_seed(3)
    uniform, _ = _mixed_uniform(shape=(12, 96), perm=torch.randperm(96))
    shared = torch.randint(1, 9, (1, 3), dtype=torch.uint8).expand(12, 3)  # one width per group: bitmap_groups
    grouped = QuantizedTensor.from_uniform(
        torch.zeros(12, 96, dtype=torch.long),
        torch.rand(12, 3),
        torch.zeros(12, 3, dtype=torch.long),
        shared,
        (12, 96),
        32,
    )
    constant = QuantizedTensor.from_codebook(
        torch.randint(0, 8, (6, 64)), torch.randn(6, 1, 8), torch.full((6, 1), 3, dtype=torch.uint8), (6, 64), 64
    )
    return {"codebook": _full_codebook_tensor(), "uniform": uniform, "grouped": grouped, "constant": constant}


# optional tensors whose absence only the directory's per-layer bit count reveals (tests/test_reliability.py)
OPTIONAL = ("perm", "col_scale")


def _damages(key: str, t: torch.Tensor) -> dict[str, torch.Tensor | None]:
    """Ways a stored tensor can be damaged: gone, cut, stored as another dtype."""
    out = {"missing": None, "zero rows": t[:0], "two rows": t[:2], "float32": t.float(), "int32": t.to(torch.int32)}
    if key in OPTIONAL:
        del out["missing"]
    return {k: v for k, v in out.items() if v is None or v.dtype != t.dtype or v.shape != t.shape}


@pytest.mark.parametrize("layout", ["codebook", "uniform", "grouped", "constant"])
def test_every_damaged_stored_tensor_is_named(layout: str) -> None:
    qt = _layouts()[layout]
    stored = qt.to_tensors()
    QuantizedTensor.from_tensors(qt.meta(), stored)  # intact: accepted
    tried = 0
    for key, tensor in stored.items():
        for damage, value in _damages(key, tensor).items():
            damaged = {k: v for k, v in stored.items() if k != key}
            if value is not None:
                damaged[key] = value
            named = "bitmap" if key == "bitmap_groups" and value is None else key  # either form may be missing
            with pytest.raises(ValueError, match=f"^{named}: ") as caught:
                QuantizedTensor.from_tensors(qt.meta(), damaged)
            assert caught.value is not None, (key, damage)
            tried += 1
    assert tried >= 4 * len(stored) - 3  # a one-element tensor cannot be cut to two rows; optional ones not removed


@pytest.mark.parametrize(
    "key,edit,message",
    [
        ("perm", lambda t: torch.cat([t[:1], t[:-1]]), "not a permutation"),
        ("outliers_col_idx", lambda t: t.clone().fill_(64), "column outside"),
        ("outliers_row_counts", lambda t: t.clone().fill_(0), "add up to 0"),
        ("col_scale", lambda t: t.clone().fill_(0), "holds zeros"),
        ("codebook_1", lambda t: t.clone().fill_(float("nan")), "NaN"),
        ("outliers_values", lambda t: t.clone().fill_(float("inf")), "NaN or infinite"),
    ],
)
def test_stored_values_out_of_range_are_named(key, edit, message) -> None:
    torch.manual_seed(4)
    qt = _full_codebook_tensor()
    stored = qt.to_tensors()
    if key not in stored:  # codebook_1 needs a 1-bit segment
        key = next(k for k in stored if k.startswith("codebook_"))
    stored[key] = edit(stored[key])
    with pytest.raises(ValueError, match=f"^{key}: .*{message}"):
        QuantizedTensor.from_tensors(qt.meta(), stored)


def test_unexpected_and_conflicting_tensors_are_refused() -> None:
    qt = _layouts()["uniform"]
    with pytest.raises(ValueError, match="unexpected stored tensors codebook_9"):
        QuantizedTensor.from_tensors(qt.meta(), {**qt.to_tensors(), "codebook_9": torch.zeros(2, dtype=torch.float16)})
    constant = _layouts()["constant"].to_tensors()
    with pytest.raises(ValueError, match="bitmap: width 9"):
        QuantizedTensor.from_tensors(
            _layouts()["constant"].meta(), {**constant, "bitmap": torch.tensor([9], dtype=torch.uint8)}
        )
