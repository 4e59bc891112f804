import pytest
import torch

from anybit.alloc.claq import (
    adaptive_precision,
    candidate_highs,
    outlier_order_scores,
    outlier_reservation,
    split_widths,
)
from anybit.config import QuantConfig
from anybit.methods.base import LayerStats
from anybit.methods.claq import CLAQ
from anybit.quant.column_kmeans import ColumnKMeansQuantizer
from anybit.quant.gptq import HessianAccumulator, gptq_quantize


@pytest.mark.parametrize("target,low,high", [(2.1, 2, 4), (2.5, 2, 4), (3.0, 3, 4), (3.25, 3, 4), (4.1, 4, 5)])
def test_adaptive_precision_meets_target(target: float, low: int, high: int) -> None:
    W = torch.randn(64, 400)
    W[:, 7] *= 40  # an outlier-heavy column
    scores = outlier_order_scores(W, tau=5.0)
    bits = adaptive_precision(scores, target)
    assert set(bits.unique().tolist()) <= {low, high}
    assert float(bits.float().mean()) == pytest.approx(target, abs=0.5 / 400 * (high - low))
    if target > low:
        assert bits[7] == high
    assert split_widths(target)[:2] == (low, high)


def test_outlier_reservation_ratios() -> None:
    scores = torch.arange(100)
    reserve = outlier_reservation(scores)
    assert float(reserve.mean()) == pytest.approx(0.005)
    assert torch.all(reserve[90:] == 0.014) and torch.all(reserve[:90] == 0.004)


def _layer(rows=48, cols=64):
    X = torch.randn(1024, cols) @ (torch.eye(cols) + 0.3 * torch.randn(cols, cols) / cols**0.5)
    acc = HessianAccumulator(cols)
    acc.add_batch(X)
    return torch.randn(rows, cols), acc.hessian()


def test_column_codebooks_exact_when_k_covers_column() -> None:
    W = torch.randint(-3, 4, (16, 32)).float() / 4  # 7 distinct values per column
    H = torch.eye(32)
    quantizer = ColumnKMeansQuantizer(16, torch.full((32,), 3))
    result = gptq_quantize(W, H, quantizer)
    qt = quantizer.to_qtensor((16, 32), perm=result.perm)
    assert torch.equal(qt.dequantize(), W)


@pytest.mark.parametrize("act_order", [False, True])
def test_column_kmeans_in_gptq_decodes_and_reserves(act_order: bool) -> None:
    W, H = _layer()
    W[5, 9] = 25.0
    bits = torch.full((64,), 2)
    bits[::4] = 4
    reserve = torch.full((64,), 0.02)
    perm = torch.argsort(torch.diag(H), descending=True) if act_order else None
    quantizer = ColumnKMeansQuantizer(48, bits if perm is None else bits[perm], reserve)
    result = gptq_quantize(W, H, quantizer, act_order=act_order)
    qt = quantizer.to_qtensor((48, 64), perm=result.perm)
    dense = qt.dequantize()
    expected = result.Q if result.perm is None else result.Q[:, torch.argsort(result.perm)]
    assert torch.equal(dense, expected)  # stored = what GPTQ used
    rows, cols = qt.outliers.coordinates()
    assert (5, 9) in set(zip(rows.tolist(), cols.tolist(), strict=True))  # the extreme weight is reserved
    assert abs(float(dense[5, 9]) - 25.0) < 1.0  # at its error-updated value, not at a centroid
    assert qt.outliers.nnz == 64 * 2  # one weight per tail per column (2% of 48 rows, rounded)
    # counted: codes at each column's width, one fp16 codebook per column, 3-bit bit map, perm, outliers
    expected_bits = (
        48 * int(bits.sum())
        + 16 * int((2**bits).sum())
        + 64 * 3 // 8 * 8
        + (16 * 64 if act_order else 0)
        + 8 * 48
        + 32 * qt.outliers.nnz
    )
    assert qt.storage_bits() == expected_bits


def test_split_candidates_start_with_the_papers() -> None:
    assert candidate_highs(2.2) == [4, 3, 5]
    assert candidate_highs(3.25) == [4, 5, 6]
    assert candidate_highs(3.0) == [4]  # a whole target has no high columns to place
    assert candidate_highs(7.5) == [8]


def test_split_search_never_worse_than_the_papers_split() -> None:
    torch.manual_seed(0)
    X = torch.randn(1024, 64) * torch.linspace(0.2, 3.0, 64)
    acc = HessianAccumulator(64)
    acc.add_batch(X)
    W = torch.randn(48, 64)
    W[:, 3] *= 12  # outlier-heavy columns for the high widths
    W[:, 40] *= 8
    H = acc.hessian()

    def output_error(search: bool) -> tuple[float, list[int]]:
        config = QuantConfig(method="claq", bits=2.2, outliers=0.0, tau=3.0, search_split=search)
        qt = CLAQ().quantize(W, LayerStats(acc), config)
        delta = W - qt.dequantize()
        return float(((delta @ H) * delta).sum()), sorted(qt.bitmap.unique().tolist())

    paper, paper_widths = output_error(False)
    searched, searched_widths = output_error(True)
    assert paper_widths == [2, 4]
    assert searched <= paper
    assert searched_widths[0] == 2 and searched_widths[-1] in (3, 4, 5)
