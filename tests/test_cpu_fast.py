"""The fast CPU kernel (two-part int8 activations and tables) against the exact product, within the error its two
roundings allow, for every layout it serves, on every code path this CPU can run."""

from pathlib import Path

import pytest
import torch

from anybit.format.qtensor import QuantizedTensor, SparseOutliers
from anybit.kernels import build, coded_input, cpu_columns, cpu_fast
from anybit.quant.uniform import rtn_quantize
from anybit.runtime.qlinear import QuantLinear, set_kernel
from qtensors import codebook_tensor, column_tensor, shared_bitmap

if reason := cpu_fast.unavailable(codebook_tensor(8, 64, 64, (2,))):
    pytest.skip(f"no fast CPU kernel here: {reason}", allow_module_level=True)


def _cpu_has(*flags: str) -> bool:
    try:
        words = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False
    return all(flag in words for flag in flags)


PATHS = ["portable", pytest.param("avx2", marks=pytest.mark.skipif(not _cpu_has("avx2", "fma"), reason="no AVX2"))]


@pytest.fixture(params=["native", *PATHS])
def isa(request, monkeypatch):
    """Each code path the kernel has, compiled for this test (the native build is the CPU's own)."""
    monkeypatch.setenv("ANYBIT_CPU_ISA", request.param)
    cpu_fast.KERNEL.cache_clear()
    yield request.param
    cpu_fast.KERNEL.cache_clear()


def _rounding_bound(prepared: cpu_fast.FastPrepared, x: torch.Tensor) -> torch.Tensor:
    """Per output, the largest |kernel − exact| the roundings allow: Σ|w|·δx + Σ|x|·δw + Σ δx·δw + Σ|x_lo|·|w_lo|,
    with δx the step of each token's low part (max|x| / 127 / 256: half a step of rounding, or a step where
    the low part clamps), δw likewise the step of each codebook's low table (scale / 256), or half the step of
    its int8 table where it has no low part (uniform grids are exact), the last term the product of the two low
    parts that most paths leave out; plus float32 summation slack."""
    qt = prepared.qt
    xs = coded_input(x, qt.perm, qt.col_scale).double()
    dx = (xs.abs().amax(dim=1, keepdim=True) / 127 / 256).expand_as(xs)
    coded = cpu_fast.rounded_weight(prepared).double().abs()
    table_step = prepared.stored_order(prepared.scale).double() * (0.5 if prepared.high_only else 1 / 256)
    dw = torch.zeros_like(coded) if qt.kind == "uniform" else _per_column(prepared, table_step)
    return dx @ coded.t() + xs.abs() @ dw.t() + dx @ dw.t() + _low_product(prepared, x) + _float_slack(prepared, x)


def _low_product(prepared: cpu_fast.FastPrepared, x: torch.Tensor) -> torch.Tensor:
    """Σ|x_lo|·|w_lo|: the product of the two low parts, which the AVX2 path includes and the others leave out."""
    qt = prepared.qt
    low_x = cpu_fast.input_parts(coded_input(x, qt.perm, qt.col_scale).float())[1].double().abs()
    return low_x @ cpu_fast.weight_parts(prepared)[1].double().abs().t()


def _per_column(prepared: cpu_fast.FastPrepared, per_segment: torch.Tensor) -> torch.Tensor:
    return per_segment.view(prepared.qt.shape[0], -1).repeat_interleave(prepared.qt.group_size, dim=1)


def _float_slack(prepared: cpu_fast.FastPrepared, x: torch.Tensor) -> torch.Tensor:
    """Float32 rounding of the kernel's sums: relative to the magnitudes summed, the stored values before
    their offset is taken out included (the AVX2 and portable paths shift them by 128 first)."""
    qt = prepared.qt
    uncentred = cpu_fast.rounded_weight(prepared).double().abs()
    offset, scale = prepared.stored_order(prepared.offset), prepared.stored_order(prepared.scale)
    uncentred += _per_column(prepared, (offset.double().abs() + 128) * scale.double().abs())
    return 1e-5 * (coded_input(x, qt.perm, qt.col_scale).double().abs() @ uncentred.t()) + 1e-6


def _check(qt: QuantizedTensor) -> None:
    for tables in cpu_fast.TABLES:
        _check_tables(cpu_fast.prepare(qt, tables))


def _check_products(prepared, bound, emulate, slack) -> None:
    """The kernel's products of `prepared` within bound(prepared, x) of the exact ones and within
    slack(prepared, x) of emulate(prepared, x): one pass, a full pass of eight, a second, partial pass; prompts:
    one group of 16 tokens, then three, the last partial (on AMX tiles where the CPU has them)."""
    qt = prepared.qt
    for tokens in (1, 3, 8, 13, 16, 37):
        x = torch.randn(tokens, qt.shape[1])
        got = cpu_fast.product(prepared, x).double()
        exact = x.double() @ qt.dequantize().double().t()
        limit = bound(prepared, x)
        assert bool(((got - exact).abs() <= limit).all()), float(((got - exact).abs() - limit).max())
        assert bool(((got - emulate(prepared, x)).abs() <= slack(prepared, x)).all())


def _check_tables(prepared: cpu_fast.FastPrepared) -> None:
    _check_products(prepared, _rounding_bound, cpu_fast.emulate, _float_slack)


def test_row_codebooks_of_every_width(isa: str) -> None:
    torch.manual_seed(1)
    _check(codebook_tensor(48, 192, 192, (1, 2, 3, 4, 5, 6, 7, 8)))


def test_group_codebooks_with_scaling_permutation_and_outliers(isa: str) -> None:
    torch.manual_seed(3)
    rows, cols = 24, 256
    mask = torch.rand(rows, cols) < 0.02
    qt = codebook_tensor(
        rows, cols, 64, (2, 3, 4, 8),
        perm=torch.randperm(cols), col_scale=torch.rand(cols) + 0.5,
        outliers=SparseOutliers.from_mask(torch.randn(rows, cols), mask),
    )  # fmt: skip
    _check(qt)


@pytest.mark.parametrize("widths,gs", [((4,), 64), ((1, 2, 3, 4), 64), ((5, 6, 7, 8), 128), ((3,), 256)])
def test_uniform_grids_per_group_and_per_channel(isa: str, widths: tuple[int, ...], gs: int) -> None:
    torch.manual_seed(2)
    rows, cols = 40, 256
    bitmap = torch.tensor(widths, dtype=torch.uint8)[torch.randint(0, len(widths), (rows, cols // gs))]
    _check(rtn_quantize(torch.randn(rows, cols) * 0.1, gs, bitmap))


def test_a_shared_bit_map_multiplies_in_runs_of_one_width(isa: str) -> None:
    """Where every row has the same mixed widths (SliM-LLM), the kernel takes the column groups in runs of one
    width: its codes, scales, tables and column order follow, and the products stay within the bound."""
    torch.manual_seed(8)
    rows, cols = 26, 512
    mask = torch.rand(rows, cols) < 0.02
    extras = dict(perm=torch.randperm(cols), col_scale=torch.rand(cols) + 0.5)
    cases = [
        rtn_quantize(torch.randn(rows, cols) * 0.1, 64, shared_bitmap(rows, cols // 64, (2, 3, 4))),
        codebook_tensor(rows, cols, 64, (2, 3, 4, 8), shared=True, **extras),
        codebook_tensor(
            rows, cols, 128, (3, 5), shared=True, outliers=SparseOutliers.from_mask(torch.randn(rows, cols), mask)
        ),
    ]
    for qt in cases:
        prepared = cpu_fast.prepare(qt)
        assert prepared.group_order is not None
        laid = prepared.bits.view(rows, -1)
        assert bool((laid[:, 1:] >= laid[:, :-1]).all())
        assert torch.equal(prepared.stored_order(prepared.bits), qt.bitmap.reshape(-1))
        _check(qt)


def test_uniform_grids_are_exact_up_to_the_activations() -> None:
    """Integer codes need no table: with activations already on their grid, the product is exact."""
    torch.manual_seed(7)
    qt = rtn_quantize(torch.randn(16, 128) * 0.1, 64, torch.full((16, 2), 8, dtype=torch.uint8))
    x = (torch.randint(-127 * 256, 127 * 256, (2, 128)) / 256).float()
    x[:, 0] = 127  # each token's largest magnitude is 127: steps of exactly 1 and 1/256
    prepared = cpu_fast.prepare(qt)
    error = (cpu_fast.product(prepared, x).double() - x.double() @ qt.dequantize().double().t()).abs()
    assert bool((error <= _float_slack(prepared, x)).all())


def test_rows_of_an_8bit_matrix_decode_as_the_kernel_multiplies(isa: str) -> None:
    torch.manual_seed(5)
    uniform = cpu_fast.prepare(rtn_quantize(torch.randn(30, 128), 64, torch.full((30, 2), 8, dtype=torch.uint8)))
    books = cpu_fast.prepare(codebook_tensor(30, 128, 64, (8,)))
    ids = torch.tensor([0, 29, 7, 7])
    for prepared in (uniform, books):  # the same values up to float32 rounding
        torch.testing.assert_close(cpu_fast.rows(prepared, ids), cpu_fast.rounded_weight(prepared)[ids])
    assert torch.equal(cpu_fast.rows(uniform, ids), uniform.qt.dequantize()[ids])  # uniform grids: exact
    with pytest.raises(IndexError, match="row ids must lie in"):
        cpu_fast.rows(uniform, torch.tensor([30]))
    with pytest.raises(ValueError, match="decodes 8-bit matrices"):
        cpu_fast.rows(cpu_fast.prepare(codebook_tensor(8, 64, 64, (3,))), torch.tensor([0]))


def test_code_path_reports_the_build(isa: str) -> None:
    path = cpu_fast.code_path()
    if isa == "native":
        assert path == ("avx512" if _cpu_has("avx512bw", "avx512vbmi", "avx512_vnni") else path)
    else:
        assert path == isa


def test_an_unknown_isa_is_one_line(monkeypatch) -> None:
    monkeypatch.setenv("ANYBIT_CPU_ISA", "sse9")
    with pytest.raises(build.AnybitError, match="ANYBIT_CPU_ISA='sse9' is not one of"):
        cpu_fast.code_path()


def test_same_result_whatever_the_thread_count() -> None:
    torch.manual_seed(4)
    prepared = cpu_fast.prepare(codebook_tensor(301, 512, 64, (2, 3, 4)))
    x = torch.randn(11, 512)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = cpu_fast.product(prepared, x)
        torch.set_num_threads(2)
        assert torch.equal(cpu_fast.product(prepared, x), one)
    finally:
        torch.set_num_threads(threads)


def test_paired_rows_give_what_single_rows_give(isa: str) -> None:
    """One token multiplies two rows of the same widths at a time; two tokens on the row path take rows one by
    one, with the same sums: the results are equal, bit for bit."""
    torch.manual_seed(6)
    cases = [
        codebook_tensor(49, 192, 192, (1, 3, 5, 8)),  # an odd row left over; pairs across two widths do not pair
        codebook_tensor(30, 256, 64, (2, 3)),  # group codebooks: rows pair only where every segment's width agrees
        rtn_quantize(torch.randn(41, 256) * 0.1, 64, torch.full((41, 4), 4, dtype=torch.uint8)),
        rtn_quantize(torch.randn(41, 512) * 0.1, 64, shared_bitmap(41, 8, (2, 3, 4))),  # runs of one width
    ]
    for qt in cases:
        prepared = cpu_fast.prepare(qt)
        x = torch.randn(1, qt.shape[1])
        try:
            assert cpu_fast.prompt_path("rows") == "rows"
            assert torch.equal(cpu_fast.product(prepared, x), cpu_fast.product(prepared, x.repeat(2, 1))[:1])
        finally:
            cpu_fast.prompt_path("tiles")


def _block_path_cases() -> list[QuantizedTensor]:
    torch.manual_seed(5)
    return [
        codebook_tensor(45, 576, 576, (1, 2, 3, 4, 5, 6, 7, 8)),
        codebook_tensor(30, 256, 64, (2, 3, 8), perm=torch.randperm(256), col_scale=torch.rand(256) + 0.5),
        rtn_quantize(torch.randn(33, 192) * 0.1, 64, torch.randint(1, 9, (33, 3), dtype=torch.uint8)),
        codebook_tensor(20, 384, 64, (2, 4), shared=True, perm=torch.randperm(384)),
    ]


def test_few_tokens_take_blocks_of_rows_where_they_pay() -> None:
    """On AVX-512, 4-15 tokens of one-block segments and 8-15 of longer ones multiply in few-token blocks; one
    token and the paths turned off take rows."""
    if cpu_fast.code_path() != "avx512":
        pytest.skip("few-token blocks are an AVX-512 path")
    codebook, _, grid = (cpu_fast.prepare(qt) for qt in _block_path_cases()[:3])  # per-row codebooks; g64 grids
    assert [cpu_fast.token_path(grid, t) for t in (1, 3, 4, 15)] == ["rows", "rows", "few", "few"]
    assert [cpu_fast.token_path(codebook, t) for t in (4, 7, 8, 15)] == ["rows", "rows", "few", "few"]
    assert cpu_fast.token_path(grid, 16) in ("registers", "tiles")
    try:
        assert cpu_fast.prompt_path("rows") == "rows"
        assert cpu_fast.token_path(grid, 8) == "rows"
    finally:
        cpu_fast.prompt_path("tiles")


def _check_block_path(path: str) -> None:
    """Prompts and few tokens in blocks of rows on `path` against the row path: per-row and group codebooks,
    grids, partial blocks of rows (45, 30, 33) and of tokens (29; few tokens: 3 and 11 in passes of 8), more
    tokens than one decoding of the rows serves (300)."""
    try:
        for qt in _block_path_cases():
            prepared = cpu_fast.prepare(qt)
            for tokens in (2, 3, 8, 11, 15, 16, 29, 64, 300):
                x = torch.randn(tokens, qt.shape[1])
                x[tokens // 2] *= 40  # one token of a much larger step than the others
                assert cpu_fast.prompt_path(path) == path
                blocks = cpu_fast.product(prepared, x).double()
                assert cpu_fast.prompt_path("rows") == "rows"
                rows = cpu_fast.product(prepared, x).double()
                assert bool(((blocks - rows).abs() <= 2 * _float_slack(prepared, x)).all())
    finally:
        cpu_fast.prompt_path("tiles")


def test_prompts_on_registers_match_the_row_path(isa: str) -> None:
    if cpu_fast.code_path() == "portable":
        pytest.skip("the portable build multiplies prompts row by row")
    _check_block_path("registers")


@pytest.mark.skipif(not _cpu_has("amx_tile", "amx_int8"), reason="no AMX tiles on this CPU")
def test_prompts_on_tiles_match_the_row_path() -> None:
    if cpu_fast.prompt_path("tiles") != "tiles":  # the CPU has them, but an older Linux does not hand them out
        pytest.skip("the system does not let this process use the AMX tiles")
    _check_block_path("tiles")


def test_prompt_paths_can_be_chosen(isa: str) -> None:
    """Each choice holds within what the build allows (blocks of rows on AVX-512 and AVX2, tiles only on
    AVX-512), and the default (tiles where allowed) comes back."""
    default = cpu_fast.prompt_path()
    path = cpu_fast.code_path()
    try:
        assert cpu_fast.prompt_path("rows") == "rows"
        assert cpu_fast.prompt_path("registers") == ("rows" if path == "portable" else "registers")
        assert cpu_fast.prompt_path("tiles") == default
        assert default in {"avx512": ("tiles", "registers"), "avx2": ("registers",)}.get(path, ("rows",))
        with pytest.raises(ValueError, match="is not one of rows, registers, tiles"):
            cpu_fast.prompt_path("gpu")
    finally:
        cpu_fast.prompt_path("tiles")


def test_relaid_codes_take_the_stored_bytes() -> None:
    qt = codebook_tensor(64, 576, 576, (2, 3, 4))
    prepared = cpu_fast.prepare(qt)
    assert prepared.codes.numel() == sum(c.numel() for c in qt.codes.values())


def test_relaying_in_chunks_gives_the_same_layout(isa: str, monkeypatch) -> None:
    torch.manual_seed(4)
    qt = codebook_tensor(48, 576, 64, (2, 3, 5, 8))
    whole = cpu_fast.prepare(qt)
    monkeypatch.setattr(cpu_fast, "RELAY_BYTES", 100)  # a few segments per chunk, or one where they are larger
    chunked = cpu_fast.prepare(qt)
    assert torch.equal(chunked.codes, whole.codes)
    assert torch.equal(chunked.tables, whole.tables)


def test_quant_linear_picks_fast_then_exact_then_reference() -> None:
    torch.manual_seed(5)
    layer = QuantLinear(codebook_tensor(32, 128, 64, (3, 4)), bias=torch.randn(32))
    x = torch.randn(1, 5, 128)
    assert layer.backend("cpu") == "fast"
    fast = layer(x)
    layer.kernel = "exact"
    assert layer.backend("cpu") == "exact"
    torch.testing.assert_close(layer(x), x @ layer.dequantize().t() + layer.bias, rtol=1e-5, atol=1e-5)
    bound = _rounding_bound(layer._prepared["fast"], x[0])
    assert bool(((fast - layer(x))[0].abs() <= bound).all())
    narrow = QuantLinear(codebook_tensor(16, 64, 32, (3,)))  # 32-column groups: the exact kernel serves
    assert "multiple of 64" in cpu_fast.unavailable(narrow.qtensor)
    assert narrow.backend("cpu") == "exact"
    model = torch.nn.Sequential(layer, narrow)
    set_kernel(model, "reference")
    assert layer.backend("cpu") == narrow.backend("cpu") == "reference"
    with pytest.raises(ValueError, match="kernel must be one of"):
        set_kernel(model, "fastest")


def test_the_tables_asked_for_are_the_tables_multiplied() -> None:
    """int8 tables (the default) leave the low parts out, on every code path; asking a model for the other kind
    prepares its layers again."""
    torch.manual_seed(8)
    layer = QuantLinear(codebook_tensor(16, 128, 128, (3, 4)))
    layer.kernel = "fast"
    x = torch.randn(1, 128)
    assert layer.prepared("fast").high_only
    assert not bool(cpu_fast.weight_parts(layer.prepared("fast"))[1].abs().sum() > 0)
    set_kernel(layer, "fast", "int16")
    assert not layer.prepared("fast").high_only
    parts = cpu_fast.weight_parts(layer.prepared("fast"))
    torch.testing.assert_close(layer(x), cpu_fast.emulate(layer.prepared("fast"), x).float(), rtol=1e-5, atol=1e-5)
    assert bool(parts[1].abs().sum() > 0)  # two parts: the low ones count
    with pytest.raises(ValueError, match="tables must be one of"):
        set_kernel(layer, "fast", "int4")


def _column_bound(prepared: cpu_columns.ColumnPrepared, x: torch.Tensor) -> torch.Tensor:
    """Per output, the largest |kernel − exact| a per-column matrix's two roundings allow: Σ|w|·δx + Σ|x|·δw +
    Σ δx·δw, δx = s / (2 σ_j) the rounding of each token's x'_j = x_j σ_j / s, δw = σ_j / 2 that of a codebook's
    entries (uniform grids are exact); plus float32 summation slack."""
    xs = coded_input(x, prepared.perm, prepared.col_scale).double()
    _, s = cpu_columns.rounded_input(prepared, x)
    step = prepared.step.double()
    dx = s.double() / (2 * step[None, :])
    weight = cpu_columns.kernel_weight(prepared).abs()
    dw = torch.zeros_like(weight) if prepared.qt.kind == "uniform" else (step / 2)[None, :].expand_as(weight)
    return dx @ weight.t() + xs.abs() @ dw.t() + dx @ dw.t() + _column_slack(prepared, x)


def _column_slack(prepared: cpu_columns.ColumnPrepared, x: torch.Tensor) -> torch.Tensor:
    xs = coded_input(x, prepared.perm, prepared.col_scale).double()
    return 1e-5 * (xs.abs() @ cpu_columns.kernel_weight(prepared).abs().t()) + 1e-6


def _check_columns(qt: QuantizedTensor) -> None:
    prepared = cpu_fast.prepare(qt)
    assert isinstance(prepared, cpu_columns.ColumnPrepared)
    _check_products(prepared, _column_bound, cpu_columns.emulate, _column_slack)


@pytest.mark.parametrize("widths", [(1,), (2,), (3,), (4,), (5,), (6,), (7,), (8,), (2, 3, 4, 8)])
def test_per_column_codebooks_of_every_width(isa: str, widths: tuple[int, ...]) -> None:
    """CLAQ's layout: one codebook per column; 70 rows (a partial block of 32), mixed widths in a random order
    (the kernel lays them in runs of one width), with permutation, scaling vector and outliers."""
    torch.manual_seed(9)
    rows, cols = 70, 96
    mask = torch.rand(rows, cols) < 0.02
    extras = dict(perm=torch.randperm(cols), col_scale=torch.rand(cols) + 0.5)
    _check_columns(column_tensor(rows, cols, widths, **extras))
    _check_columns(column_tensor(rows, cols, widths, outliers=SparseOutliers.from_mask(torch.randn(rows, cols), mask)))


def test_per_column_uniform_grids_are_exact_up_to_the_activations(isa: str) -> None:
    torch.manual_seed(10)
    qt = column_tensor(64, 128, (2, 3, 4, 8), kind="uniform")
    _check_columns(qt)
    x = torch.randn(2, 128)
    prepared = cpu_fast.prepare(qt)
    torch.testing.assert_close(
        cpu_columns.kernel_weight(prepared), qt.dequantize().double()[:, prepared.perm], rtol=1e-6, atol=1e-7
    )
    xq, _ = cpu_columns.rounded_input(prepared, x)
    assert bool((xq.abs().amax(dim=1) == cpu_columns.INPUT_MAX).all())  # each token's largest at full scale


def test_per_column_codes_are_relaid_into_the_stored_bytes_and_every_path_agrees(isa: str) -> None:
    """The re-laid codes take the stored bytes (rows padded to blocks of 32), and every code path computes the
    same sums in the same order: the same floats."""
    torch.manual_seed(11)
    qt = column_tensor(64, 96, (2, 3, 4, 5))
    prepared = cpu_fast.prepare(qt)
    assert prepared.codes.numel() == sum(c.numel() for c in qt.codes.values())
    x = torch.randn(5, 96)
    got = cpu_fast.product(prepared, x)
    cpu_fast.KERNEL.cache_clear()
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("ANYBIT_CPU_ISA", "portable")
        assert torch.equal(cpu_fast.product(cpu_fast.prepare(qt), x), got)
    cpu_fast.KERNEL.cache_clear()


def test_per_column_layouts_the_kernel_does_not_take_are_named() -> None:
    codes, books = torch.randint(0, 4, (64, 32)), torch.randn(64, 2, 4)
    halves = QuantizedTensor.from_codebook(codes, books, torch.full((64, 2), 2, dtype=torch.uint8), (32, 64), 16, 1)
    assert "one segment per column" in cpu_fast.unavailable(halves)
    odd = column_tensor(32, 63, (2,))
    assert "odd number of columns" in cpu_fast.unavailable(odd)
    layer = QuantLinear(odd)
    assert layer.backend("cpu") == "reference"


def test_per_column_rows_split_over_threads_as_on_one() -> None:
    """Blocks of 32 rows go to the threads whole, and each thread adds the outliers of the rows it wrote."""
    torch.manual_seed(12)
    rows, cols = 200, 64
    mask = torch.rand(rows, cols) < 0.05
    qt = column_tensor(rows, cols, (3, 4), outliers=SparseOutliers.from_mask(torch.randn(rows, cols), mask))
    prepared = cpu_fast.prepare(qt)
    x = torch.randn(2, cols)
    threads = torch.get_num_threads()
    try:
        results = []
        for n in (1, 2, 3, 5):
            torch.set_num_threads(n)
            results.append(cpu_fast.product(prepared, x))
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(r, results[0]) for r in results)
    torch.testing.assert_close(results[0].double(), cpu_columns.emulate(prepared, x), rtol=1e-5, atol=1e-5)
