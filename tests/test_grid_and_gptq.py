import pytest
import torch

from anybit.quant.gptq import HessianAccumulator, gptq_quantize, upper_cholesky_of_inverse
from anybit.quant.grid import dequantize_from_grid, minmax_params, quantize_to_grid
from anybit.quant.uniform import UniformColumnQuantizer, rtn_quantize


def test_minmax_grid_known_values() -> None:
    x = torch.tensor([[0.0, 1.0, 2.0, 3.0], [-1.0, -0.5, 0.0, 0.5]])
    scale, zero = minmax_params(x, 2)
    assert scale.tolist() == [1.0, 0.5]
    assert zero.tolist() == [0.0, 2.0]
    q = quantize_to_grid(x, scale[:, None], zero[:, None], 2)
    assert q.tolist() == [[0, 1, 2, 3], [0, 1, 2, 3]]
    assert torch.equal(dequantize_from_grid(q, scale[:, None], zero[:, None]), x)


def test_rtn_error_within_half_step() -> None:
    W = torch.randn(16, 128)
    for bits in (2, 3, 4, 8):
        qt = rtn_quantize(W, 32, torch.full((16, 4), bits, dtype=torch.uint8))
        step = qt.scales.float().repeat_interleave(32, dim=1)
        assert torch.all((qt.dequantize() - W).abs() <= step / 2 + 1e-6)


def _correlated_inputs(n: int, d: int) -> torch.Tensor:
    mix = torch.randn(d, d) / d**0.5 + torch.eye(d)
    scales = torch.logspace(0, 0.3, d)  # mildly uneven channel scales
    return (torch.randn(n, d) @ mix) * scales


def _output_error(W: torch.Tensor, Q: torch.Tensor, X: torch.Tensor) -> float:
    return float(((X @ (W - Q).t()) ** 2).sum())


@pytest.mark.parametrize("act_order", [False, True], ids=["natural", "act_order"])
@pytest.mark.parametrize("bits,group_size", [(3, 32), (4, 128), (2, 64)])
def test_gptq_beats_rtn_on_layer_output(bits: int, group_size: int, act_order: bool) -> None:
    rows, d = 64, 128
    X = _correlated_inputs(2048, d)
    W = torch.randn(rows, d)
    acc = HessianAccumulator(d)
    for chunk in X.split(256):
        acc.add_batch(chunk)
    bitmap = torch.full((rows, d // group_size), bits, dtype=torch.uint8)
    quantizer = UniformColumnQuantizer(rows, d, group_size, bitmap)
    result = gptq_quantize(W, acc.hessian(), quantizer, act_order=act_order)
    qt = quantizer.to_qtensor((rows, d), perm=result.perm)
    Q = qt.dequantize()
    # the packed tensor decodes to exactly what the solver used
    expected = result.Q if result.perm is None else result.Q[:, torch.argsort(result.perm)]
    assert torch.equal(Q, expected)
    rtn = rtn_quantize(W, group_size, bitmap).dequantize()
    assert _output_error(W, Q, X) < 0.8 * _output_error(W, rtn, X)


def test_upper_cholesky_of_inverse_in_place_gives_the_same_values() -> None:
    torch.manual_seed(0)
    X = torch.randn(300, 200)
    H = X.T @ X + 0.1 * torch.eye(200)
    expected = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    U = upper_cholesky_of_inverse(H)
    assert torch.equal(U, expected)
    assert U.data_ptr() == H.data_ptr()  # no d×d copy: the factor lives in H's memory
    assert torch.allclose(U.T @ U @ (X.T @ X + 0.1 * torch.eye(200)), torch.eye(200), atol=1e-3)


def test_hessian_is_running_mean() -> None:
    X = torch.randn(100, 8)
    acc = HessianAccumulator(8)
    acc.add_batch(X[:30])
    acc.add_batch(X[30:].view(7, 10, 8))
    assert acc.tokens == 100
    torch.testing.assert_close(acc.hessian(), 2 * X.t() @ X / 100)


@pytest.mark.parametrize("d", [8, 200, 577])
def test_hessian_is_symmetric_product_whatever_the_blocks(d: int) -> None:
    X = torch.randn(90, d, dtype=torch.float64).float()
    acc = HessianAccumulator(d)
    acc.add_batch(X[:50])
    acc.add_batch(X[50:])
    H = acc.hessian()
    torch.testing.assert_close(H, 2 * X.t() @ X / 90, rtol=1e-5, atol=1e-4)
    assert torch.equal(H, H.t())


def test_diagonal_accumulator_matches_full() -> None:
    X = torch.randn(300, 16)
    full, diag = HessianAccumulator(16), HessianAccumulator(16, diagonal_only=True)
    for chunk in X.split(64):
        full.add_batch(chunk)
        diag.add_batch(chunk)
    torch.testing.assert_close(diag.diagonal(), full.diagonal())
    with pytest.raises(ValueError, match="only the diagonal"):
        diag.hessian()


def test_symmetric_grid() -> None:
    x = torch.tensor([[-1.0, 0.25, 0.5, 0.75]])
    scale, zero = minmax_params(x, 3, symmetric=True)
    assert zero.tolist() == [4.0] and scale.item() == pytest.approx(2 / 7, rel=1e-3)
    q = quantize_to_grid(x, scale[:, None], zero[:, None], 3)
    assert q.min() >= 0 and q.max() <= 7
    assert torch.allclose(dequantize_from_grid(q, scale[:, None], zero[:, None]), x, atol=float(scale) / 2 + 1e-6)
