"""The fused Triton decode kernel against the reference path, for every layout it serves.

On a machine without CUDA the kernels run in Triton's interpreter (TRITON_INTERPRET=1, set before the
kernel module is imported): the results are checked, not the speed.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    assert os.environ.get("TRITON_INTERPRET") == "1", "conftest sets this before triton can be imported"
pytest.importorskip("triton", reason="triton is not installed (pip install 'anybit[cuda]'): no kernel tests")

from anybit.format.qtensor import QuantizedTensor, SparseOutliers
from anybit.kernels.lut_gemv import MAX_BATCH, lut_matmul, lut_matvec, prepare, unsupported_reason
from anybit.quant.uniform import rtn_quantize
from anybit.runtime.qlinear import QuantLinear
from qtensors import codebook_tensor

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _check(qt: QuantizedTensor, batch: int) -> None:
    """The decode kernel (batch rows) and the prefill path (more rows than the decode kernel takes)."""
    qt_dev = QuantizedTensor.from_tensors(qt.meta(), {k: v.to(DEVICE) for k, v in qt.to_tensors().items()})
    prepared = prepare(qt_dev)
    for tokens, product in ((batch, lut_matvec), (MAX_BATCH + 5, lut_matmul)):
        x = torch.randn(tokens, qt.shape[1], device=DEVICE)
        expected = x @ qt_dev.dequantize().t()
        torch.testing.assert_close(product(prepared, x), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("batch", [1, 3, 8])
def test_mixed_width_row_codebooks(batch: int) -> None:
    torch.manual_seed(batch)
    _check(codebook_tensor(48, 192, 192, (1, 2, 3, 4, 5)), batch)
    _check(codebook_tensor(37, 136, 136, (8, 2, 6)), batch)  # rows and columns off every block size


def test_group_codebooks_with_scaling_permutation_and_outliers() -> None:
    torch.manual_seed(1)
    rows, cols = 24, 128
    dense = torch.randn(rows, cols)
    mask = torch.rand(rows, cols) < 0.02
    qt = codebook_tensor(
        rows, cols, 32, (2, 3, 8),
        perm=torch.randperm(cols), col_scale=torch.rand(cols) + 0.5, outliers=SparseOutliers.from_mask(dense, mask),
    )  # fmt: skip
    _check(qt, 2)


@pytest.mark.parametrize("widths,gs", [((4,), 64), ((2, 3, 4), 64), ((2, 3, 4), 200)])
def test_uniform_groups(widths: tuple[int, ...], gs: int) -> None:
    """Uniform grids per group, and per row (one segment per row: the row kernel) with mixed widths."""
    torch.manual_seed(2)
    rows, cols = 40, 200 if gs == 200 else 256
    bitmap = torch.tensor(widths, dtype=torch.uint8)[torch.randint(0, len(widths), (rows, cols // gs))]
    _check(rtn_quantize(torch.randn(rows, cols), gs, bitmap), 4)


def test_quant_linear_dispatch_and_fallback() -> None:
    torch.manual_seed(3)
    qt = codebook_tensor(32, 64, 64, (3,))
    layer = QuantLinear(qt, bias=torch.randn(32)).to(DEVICE)
    for tokens in (1, 12):  # the decode kernel, then the prefill path
        x = torch.randn(2, tokens, 64, device=DEVICE)
        layer.kernel = "reference"
        reference = layer(x)
        layer.kernel = "triton"
        torch.testing.assert_close(layer(x), reference, rtol=1e-4, atol=1e-4)
    # per-column (CLAQ) layouts have no kernel: one warning, then the reference path
    column_qt = QuantizedTensor.from_codebook(
        torch.randint(0, 4, (64, 32)), torch.randn(64, 1, 4).sort(dim=-1).values,
        torch.full((64, 1), 2, dtype=torch.uint8), (32, 64), 32, axis=1,
    )  # fmt: skip
    assert unsupported_reason(column_qt)
    column = QuantLinear(column_qt).to(DEVICE)
    column.kernel = "triton"
    with pytest.warns(UserWarning, match="no fused kernel"):
        out = column(x)
    torch.testing.assert_close(out, x @ column_qt.dequantize().to(DEVICE).t())


def test_dec_kernel_matches_reference_compensation() -> None:
    from anybit.runtime.dec import Compensator, quantize_residual

    torch.manual_seed(5)
    residual = quantize_residual(torch.randn(77, 1500) * 0.01)  # odd output count, partial last chunk
    x = torch.randn(3, 1500, device=DEVICE)
    reference = Compensator(residual, 16, kernel="reference")(x)
    torch.testing.assert_close(Compensator(residual, 16, kernel="triton")(x), reference, rtol=1e-5, atol=1e-6)
