"""The C kernel for CPU decode products against the reference path, for the layouts it serves."""

import warnings

import pytest
import torch

from anybit.format.qtensor import QuantizedTensor, SparseOutliers
from anybit.kernels import MAX_BATCH, cpu
from anybit.quant.uniform import rtn_quantize
from anybit.runtime.qlinear import QuantLinear
from qtensors import codebook_tensor

if reason := cpu.unavailable(codebook_tensor(8, 16, 16, (2,))):
    pytest.skip(f"no CPU kernel here: {reason}", allow_module_level=True)


def _check(qt: QuantizedTensor, batch: int) -> None:
    x = torch.randn(batch, qt.shape[1])
    torch.testing.assert_close(cpu.row_matvec(cpu.prepare(qt), x), x @ qt.dequantize().t(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("batch", [1, 3, MAX_BATCH])
def test_row_codebooks_of_every_width(batch: int) -> None:
    torch.manual_seed(batch)
    _check(codebook_tensor(48, 192, 192, (1, 2, 3, 4, 5)), batch)  # the vector path (AVX2: up to 5 bits)
    _check(codebook_tensor(37, 136, 136, (8, 6, 2, 7)), batch)  # wider codebooks: the scalar path


@pytest.mark.parametrize("widths", [(4,), (2, 3, 4, 8)])
def test_per_channel_uniform_grids(widths: tuple[int, ...]) -> None:
    torch.manual_seed(2)
    rows, cols = 40, 256
    bitmap = torch.tensor(widths, dtype=torch.uint8)[torch.randint(0, len(widths), (rows, 1))]
    _check(rtn_quantize(torch.randn(rows, cols) * 0.1, cols, bitmap), 4)


def test_scaling_vector_permutation_and_outliers() -> None:
    torch.manual_seed(3)
    rows, cols = 24, 128
    mask = torch.rand(rows, cols) < 0.02
    qt = codebook_tensor(
        rows, cols, cols, (2, 3, 4),
        perm=torch.randperm(cols), col_scale=torch.rand(cols) + 0.5,
        outliers=SparseOutliers.from_mask(torch.randn(rows, cols), mask),
    )  # fmt: skip
    _check(qt, 2)


def test_same_result_whatever_the_thread_count() -> None:
    torch.manual_seed(4)
    prepared = cpu.prepare(codebook_tensor(301, 512, 512, (2, 3, 4)))
    x = torch.randn(2, 512)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = cpu.row_matvec(prepared, x)
        torch.set_num_threads(2)
        assert torch.equal(cpu.row_matvec(prepared, x), one)
    finally:
        torch.set_num_threads(threads)


def test_quant_linear_uses_it_for_decode_sized_inputs_only() -> None:
    torch.manual_seed(5)
    layer = QuantLinear(codebook_tensor(32, 64, 64, (3, 4)), bias=torch.randn(32))
    for tokens, kernel_used in ((MAX_BATCH + 4, False), (1, True)):
        x = torch.randn(1, tokens, 64)
        layer.kernel = "reference"
        reference = layer(x)
        layer.kernel = "auto"
        torch.testing.assert_close(layer(x), reference, rtol=1e-5, atol=1e-5)
        assert (layer._cpu_prepared is not None) == kernel_used
    grouped = QuantLinear(codebook_tensor(32, 64, 16, (3,)))  # group codebooks: the reference path, silently
    assert cpu.unavailable(grouped.qtensor)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        grouped(torch.randn(1, 64))
    assert grouped._cpu_prepared is None


def test_without_a_compiler_one_warning_then_the_reference_path(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("ANYBIT_CACHE", str(tmp_path))
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    cpu._library.cache_clear()
    try:
        layer = QuantLinear(codebook_tensor(16, 64, 64, (3,)))
        x = torch.randn(1, 64)
        with pytest.warns(UserWarning, match="no CPU kernel .*no C compiler"):
            out = layer(x)
        torch.testing.assert_close(out, x @ layer.dequantize().t())
        assert layer._cpu_prepared is None
        assert not list(tmp_path.glob("kernels/*.so"))  # nothing half-written left behind
    finally:
        cpu._library.cache_clear()
