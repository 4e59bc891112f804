"""The C kernels for CPU products against the reference path, for every layout they serve."""

import warnings

import pytest
import torch

from anybit.format.qtensor import QuantizedTensor, SparseOutliers
from anybit.kernels import MAX_BATCH, cpu, cpu_fast
from anybit.quant.uniform import rtn_quantize
from anybit.runtime.qlinear import QuantLinear, dense_weights
from qtensors import codebook_tensor

if reason := cpu.unavailable(codebook_tensor(8, 16, 16, (2,))):
    pytest.skip(f"no CPU kernel here: {reason}", allow_module_level=True)


def _check(qt: QuantizedTensor, batch: int) -> None:
    """The decode product (batch rows) and the prefill path (more rows than it takes)."""
    prepared = cpu.prepare(qt)
    for tokens, product in ((batch, cpu.matvec), (MAX_BATCH + 5, cpu.matmul)):
        x = torch.randn(tokens, qt.shape[1])
        torch.testing.assert_close(product(prepared, x), x @ qt.dequantize().t(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("batch", [1, 3, MAX_BATCH])
def test_row_codebooks_of_every_width(batch: int) -> None:
    torch.manual_seed(batch)
    _check(codebook_tensor(48, 192, 192, (1, 2, 3, 4, 5)), batch)  # the vector path (AVX2: up to 5 bits)
    _check(codebook_tensor(37, 136, 136, (8, 6, 2, 7)), batch)  # wider codebooks: the scalar path


def test_group_codebooks_with_scaling_permutation_and_outliers() -> None:
    torch.manual_seed(3)
    rows, cols = 24, 128
    mask = torch.rand(rows, cols) < 0.02
    qt = codebook_tensor(
        rows, cols, 32, (2, 3, 4, 8),
        perm=torch.randperm(cols), col_scale=torch.rand(cols) + 0.5,
        outliers=SparseOutliers.from_mask(torch.randn(rows, cols), mask),
    )  # fmt: skip
    _check(qt, 2)


@pytest.mark.parametrize("widths,gs", [((4,), 64), ((2, 3, 4), 64), ((2, 3, 4, 8), 256)])
def test_uniform_grids_per_group_and_per_channel(widths: tuple[int, ...], gs: int) -> None:
    torch.manual_seed(2)
    rows, cols = 40, 256
    bitmap = torch.tensor(widths, dtype=torch.uint8)[torch.randint(0, len(widths), (rows, cols // gs))]
    _check(rtn_quantize(torch.randn(rows, cols) * 0.1, gs, bitmap), 4)


def test_same_result_whatever_the_thread_count() -> None:
    torch.manual_seed(4)
    prepared = cpu.prepare(codebook_tensor(301, 512, 64, (2, 3, 4)))
    x = torch.randn(2, 512)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = cpu.matvec(prepared, x), cpu.matmul(prepared, x)
        torch.set_num_threads(2)
        assert torch.equal(cpu.matvec(prepared, x), one[0])
        assert torch.equal(cpu.matmul(prepared, x), one[1])
    finally:
        torch.set_num_threads(threads)


def test_quant_linear_dispatch() -> None:
    torch.manual_seed(5)
    layer = QuantLinear(codebook_tensor(32, 64, 64, (3, 4)), bias=torch.randn(32))
    for tokens in (1, MAX_BATCH + 4):  # the decode product, then the prefill path
        x = torch.randn(1, tokens, 64)
        layer.kernel = "reference"
        reference = layer(x)
        layer.kernel = "exact"
        torch.testing.assert_close(layer(x), reference, rtol=1e-5, atol=1e-5)
        assert layer.backend("cpu") == "exact" and "exact" in layer._prepared
    # per-column (CLAQ) layouts have no exact kernel (the fast one serves them): asked for "exact", the
    # reference path, silently
    column = QuantLinear(
        QuantizedTensor.from_codebook(
            torch.randint(0, 4, (64, 32)), torch.randn(64, 1, 4).sort(dim=-1).values,
            torch.full((64, 1), 2, dtype=torch.uint8), (32, 64), 32, axis=1,
        )
    )  # fmt: skip
    assert cpu.unavailable(column.qtensor)
    column.kernel = "exact"
    x = torch.randn(1, 64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        torch.testing.assert_close(column(x), x @ column.dequantize().t())
    assert column.backend("cpu") == "reference" and not column._prepared


@pytest.mark.parametrize("compiler,message", [("missing", "no C compiler"), ("failing", "the C compiler failed")])
def test_without_a_working_compiler_one_warning_then_the_reference_path(
    tmp_path, monkeypatch, compiler: str, message: str
) -> None:
    fake = tmp_path / "cc"
    if compiler == "failing":
        fake.write_text("#!/bin/sh\necho 'fatal error: no such header' >&2\nexit 1\n")
        fake.chmod(0o755)
    monkeypatch.setenv("ANYBIT_CACHE", str(tmp_path))
    monkeypatch.setenv("CC", str(fake))
    kernels = (cpu.KERNEL, cpu_fast.KERNEL)
    for kernel in kernels:
        kernel.cache_clear()
    try:
        layer = QuantLinear(codebook_tensor(16, 64, 64, (3,)))
        x = torch.randn(1, 64)
        with pytest.warns(UserWarning, match=f"no CPU kernel \\({message}") as caught:
            out = layer(x)
        assert len([w for w in caught if "no CPU kernel" in str(w.message)]) == 1
        torch.testing.assert_close(out, x @ layer.dequantize().t())
        assert layer.backend("cpu") == "reference" and not layer._prepared
        assert not list(tmp_path.glob("kernels/*"))  # nothing half-written left behind
    finally:
        for kernel in kernels:
            kernel.cache_clear()


def test_evaluation_caches_dense_weights_only_where_no_kernel_serves() -> None:
    torch.manual_seed(6)
    served = QuantLinear(codebook_tensor(32, 64, 64, (3,)))
    column = QuantLinear(  # two segments per column: no CPU kernel serves it
        QuantizedTensor.from_codebook(
            torch.randint(0, 4, (64, 32)), torch.randn(64, 2, 4).sort(dim=-1).values,
            torch.full((64, 2), 2, dtype=torch.uint8), (32, 64), 16, axis=1,
        )
    )  # fmt: skip
    model = torch.nn.Sequential(served, torch.nn.Linear(32, 64), column)
    x = torch.randn(MAX_BATCH + 3, 64)
    expected = model(x)
    with dense_weights(model, skip_kernel_layers=True):
        assert served._dense is None and column._dense is not None
        torch.testing.assert_close(model(x), expected)
    with dense_weights(model):
        assert served._dense is not None
