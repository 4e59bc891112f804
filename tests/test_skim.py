import dataclasses
import itertools

import pytest
import torch

from anybit.alloc.skim import allocation_budget, error_table, greedy_allocation, row_cost_bits
from anybit.config import QuantConfig
from anybit.methods.base import LayerStats
from anybit.methods.skim import SKIM
from anybit.quant.gptq import HessianAccumulator


def _convex_table(rows: int, widths: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Errors that halve (or better) with each width: convex and decreasing; costs grow with width."""
    base = torch.rand(rows, 1) * 10 + 1
    decay = torch.rand(rows, 1) * 0.4 + 0.1
    errors = base * decay ** torch.arange(widths)[None, :]
    costs = torch.tensor([[row_cost_bits(16, b) for b in range(1, widths + 1)]] * rows, dtype=torch.float64)
    return errors, costs


@pytest.mark.parametrize("seed", range(5))
def test_greedy_is_optimal_on_small_convex_cases(seed: int) -> None:
    torch.manual_seed(seed)
    rows, widths = 4, 4
    errors, costs = _convex_table(rows, widths)
    budget = float(costs[:, 0].sum()) + float(torch.rand(1)) * float((costs[:, -1] - costs[:, 0]).sum())
    choice = greedy_allocation(errors, costs, budget)
    spent = float(costs[torch.arange(rows), choice].sum())
    assert spent <= budget
    got = float(errors[torch.arange(rows), choice].sum())
    best = min(
        float(sum(errors[r, c] for r, c in enumerate(combo)))
        for combo in itertools.product(range(widths), repeat=rows)
        if sum(float(costs[r, c]) for r, c in enumerate(combo)) <= budget
    )
    # greedy over convex hulls is optimal up to the one segment that did not fit
    largest_step = float((errors[:, :-1] - errors[:, 1:]).max())
    assert got <= best + largest_step
    assert got >= best - 1e-9


def test_greedy_exact_when_budget_lands_on_a_hull_point() -> None:
    torch.manual_seed(0)
    errors, costs = _convex_table(6, 5)
    everything = float(costs[:, -1].sum())
    assert greedy_allocation(errors, costs, everything).tolist() == [4] * 6
    assert greedy_allocation(errors, costs, float(costs[:, 0].sum())).tolist() == [0] * 6
    with pytest.raises(ValueError, match="below the cheapest"):
        greedy_allocation(errors, costs, float(costs[:, 0].sum()) - 1)


def _sequential_greedy(errors: torch.Tensor, costs: torch.Tensor, budget: float) -> list[int]:
    """The allocation written out one row and one segment at a time, as its docstring says: each row's lower
    hull, all hull segments by error decrease per bit, each taken if it is its row's next and still fits."""
    rows, count = errors.shape
    err, cost = errors.double().tolist(), costs.double().expand_as(errors).tolist()
    segments = []
    for r in range(rows):
        hull = [0]
        for j in range(1, count):
            if err[r][j] >= err[r][hull[-1]]:
                continue
            while len(hull) >= 2:
                a, b = hull[-2], hull[-1]
                if (err[r][b] - err[r][a]) * (cost[r][j] - cost[r][a]) < (err[r][j] - err[r][a]) * (
                    cost[r][b] - cost[r][a]
                ):
                    break
                hull.pop()
            hull.append(j)
        segments += [(r, a, b, cost[r][b] - cost[r][a], err[r][a] - err[r][b]) for a, b in itertools.pairwise(hull)]
    choice, spent = [0] * rows, sum(cost[r][0] for r in range(rows))
    slopes = torch.tensor([gain for *_, gain in segments], dtype=torch.float64) / torch.tensor(
        [c for *_, c, _ in segments], dtype=torch.float64
    )
    for s in torch.sort(slopes, descending=True, stable=True).indices.tolist() if segments else []:
        r, a, b, c, _ = segments[s]
        if choice[r] == a and spent + c <= budget:
            choice[r], spent = b, spent + c
    return choice


@pytest.mark.parametrize("kind", ["convex", "noisy", "ties", "uneven costs"])
def test_greedy_takes_the_segments_the_sequential_walk_takes(kind: str) -> None:
    """The vectorized allocation is the sequential one, row for row, on convex, non-convex and tied tables."""
    torch.manual_seed(0)
    for _ in range(150):
        rows, count = int(torch.randint(1, 40, ())), int(torch.randint(1, 7, ()))
        errors, costs = _convex_table(rows, count)
        if kind == "noisy":
            errors = torch.rand(rows, count).double()
        elif kind == "ties":
            errors = torch.randint(0, 4, (rows, count)).double()
        elif kind == "uneven costs":
            costs = torch.cumsum(torch.randint(1, 9, (rows, count)), 1).double()
        low, high = float(costs[:, 0].sum()), float(costs[:, -1].sum())
        budget = low + float(torch.rand(())) * (high - low) * 1.1
        assert greedy_allocation(errors, costs, budget).tolist() == _sequential_greedy(errors, costs, budget)


def test_model_plan_spills_each_matrix_codebooks() -> None:
    """With a spill file, the tables' and the plan's codebooks live there, and the plan is the in-memory one."""
    from anybit.alloc.skim import allocate_model
    from anybit.memory import Spilled, SpillFile
    from anybit.methods.anybit import AnyBit

    W, acc = _correlated_layer()
    config = QuantConfig(method="anybit", bits=3.0, weighting="activation", refine=0)
    table = AnyBit().row_table(W, LayerStats(acc), config)
    kept = allocate_model({"m": table}, 3.0)["m"]
    with SpillFile() as spill:
        spilled_table = table.spilled(spill)
        assert all(isinstance(c, Spilled) for c in spilled_table.centroids)
        plan = allocate_model({"m": spilled_table}, 3.0, spill)["m"]
        assert isinstance(plan.books, Spilled)
        assert torch.equal(plan.widths, kept.widths) and torch.equal(plan.codebooks(), kept.codebooks())


@pytest.mark.parametrize("target", [2.25, 2.5, 3.2, 4.25])
def test_skim_meets_fractional_budget(target: float) -> None:
    torch.manual_seed(0)
    rows, cols = 96, 576
    X = torch.randn(2048, cols) * torch.rand(cols) * 3
    acc = HessianAccumulator(cols)
    acc.add_batch(X)
    W = torch.randn(rows, cols) * (torch.rand(rows, 1) + 0.2)
    qt = SKIM().quantize(W, LayerStats(acc), QuantConfig(method="skim", bits=target))
    assert qt.bits_per_weight() <= target
    assert qt.bits_per_weight() == pytest.approx(target, abs=0.01)
    assert len(qt.widths) > 1  # mixed widths across rows


def test_error_table_falls_with_width() -> None:
    torch.manual_seed(0)
    W = torch.randn(8, 128)
    H = torch.eye(128)
    table = error_table(W, H, None, [1, 2, 3, 4])
    assert torch.all(table.errors[:, 1:] < table.errors[:, :-1])
    assert allocation_budget(8, 128, 3.0) == 3.0 * 8 * 128 - 24


def test_error_table_in_row_chunks_is_the_same(monkeypatch) -> None:
    """Rows are clustered a chunk at a time (bounded memory on large matrices) with the same codebooks and codes;
    the errors differ only by the rounding of products of another shape."""
    import anybit.alloc.skim as skim_module

    W = torch.randn(40, 48)
    X = torch.randn(200, 48)
    H, weights = X.T @ X, torch.rand(40, 48)
    kept = torch.rand(40, 48) < 0.02
    whole = error_table(W, H, weights, [1, 2, 3, 6], kept=kept)
    monkeypatch.setattr(skim_module, "ERROR_TABLE_CHUNK_ELEMENTS", 7 * 48)  # 7 rows at a time: a short last chunk
    chunked = error_table(W, H, weights, [1, 2, 3, 6], kept=kept)
    torch.testing.assert_close(whole.errors, chunked.errors, rtol=1e-5, atol=0)
    for a, b in zip(whole.codes + whole.centroids, chunked.codes + chunked.centroids, strict=True):
        assert torch.equal(a, b)


def test_scaling_never_raises_the_layer_objective(tmp_path) -> None:
    from safetensors.torch import load_file, save_file

    from anybit.format.qtensor import QuantizedTensor
    from anybit.quant.scaling import layer_loss

    torch.manual_seed(1)
    rows, cols = 64, 256
    X = torch.randn(2048, cols) * (torch.rand(cols) * 2 + 0.1)
    X[:, :4] *= 10
    acc = HessianAccumulator(cols)
    acc.add_batch(X)
    W = torch.randn(rows, cols)
    H = acc.hessian()
    plain = SKIM().quantize(W, LayerStats(acc), QuantConfig(method="skim", bits=3.0, scaling=False))
    scaled = SKIM().quantize(W, LayerStats(acc), QuantConfig(method="skim", bits=3.0, scaling=True))
    assert layer_loss(W, scaled.dequantize(), H) <= layer_loss(W, plain.dequantize(), H)
    assert scaled.bits_per_weight() <= 3.0 and plain.bits_per_weight() <= 3.0
    if scaled.col_scale is not None:  # the factors are stored (fp16, counted) and divided back out
        assert scaled.storage_bits() == dataclasses.replace(scaled, col_scale=None).storage_bits() + 16 * cols
        save_file(scaled.to_tensors(), tmp_path / "s.safetensors")
        back = QuantizedTensor.from_tensors(scaled.meta(), load_file(tmp_path / "s.safetensors"))
        assert torch.equal(back.dequantize(), scaled.dequantize())


def test_trained_scaling_lowers_the_layer_loss_with_labels_fixed() -> None:
    """Columns of very different activation scale: one factor per column moves the shared centroids to where
    the loss is, and never raises it above the unscaled start (alpha = 1)."""
    from anybit.quant.scaling import closed_form_centroids, layer_loss, train_scaling

    torch.manual_seed(0)
    rows, cols, k = 16, 64, 4
    W = torch.randn(rows, cols)
    X = torch.randn(4096, cols) * torch.logspace(-1, 1, cols)
    H = X.t() @ X / X.shape[0]
    weights = H.diagonal()[None, :].expand(rows, cols).contiguous()
    labels = W.argsort(dim=1).argsort(dim=1) * k // cols  # four equal-count clusters per row

    def loss(alpha: torch.Tensor) -> float:
        C = closed_form_centroids(W * alpha, labels, weights / alpha.square(), k)
        return float(layer_loss(W, torch.gather(C, 1, labels) / alpha, H))

    trained = train_scaling(W, H, labels, weights, k)
    assert loss(trained) < 0.9 * loss(torch.ones(cols))  # measured: 1035 against 1304


@pytest.mark.parametrize("weighting", ["activation", "fisher"])
def test_model_scope_spends_one_budget(tiny_llama_dir, corpus_file, tmp_path, weighting: str) -> None:
    from anybit.model import load_model
    from anybit.pipeline import quantize_to_dir

    target = 3.0
    config = QuantConfig(
        method="skim",
        bits=target,
        scope="model",
        weighting=weighting,
        scaling=False,  # a rejected scaling vector would leave its reserved bits unspent
        nsamples=4,
        seqlen=64,
        calib=str(corpus_file),
    )
    original = load_model(str(tiny_llama_dir))
    reference = {k: v.clone() for k, v in original.model.state_dict().items()}
    outcome = quantize_to_dir(str(tiny_llama_dir), config, tmp_path / "q", loaded=original, progress=False)
    # one widening step of a 64-column row costs up to 0.035 bits/weight of this 61k-weight model
    assert target - 0.02 <= outcome.bits_per_weight <= target
    per_matrix = [
        layer["storage_bits"] / (layer["shape"][0] * layer["shape"][1]) for layer in outcome.meta["layers"].values()
    ]
    assert max(per_matrix) - min(per_matrix) > 0.25, "one model-wide budget should spread bits unevenly"
    # the statistics pass leaves the unquantized parts exactly as they were
    after = original.model.state_dict()
    torch.testing.assert_close(after["model.norm.weight"], reference["model.norm.weight"].half().float())


def test_model_scope_rejected_where_unsupported() -> None:
    from anybit.errors import AnybitError

    with pytest.raises(AnybitError, match="--scope is not an option of method 'kmeans'"):
        QuantConfig(method="kmeans", bits=3, scope="model")


def _correlated_layer(rows: int = 64, cols: int = 256):
    torch.manual_seed(2)
    mix = torch.randn(cols, cols) / cols**0.5 + torch.eye(cols)
    X = torch.randn(4096, cols) @ mix  # correlated inputs: where error feedback pays off
    acc = HessianAccumulator(cols)
    acc.add_batch(X)
    return torch.randn(rows, cols), acc


def test_anybit_error_feedback_lowers_the_layer_objective() -> None:
    from anybit.methods.anybit import AnyBit
    from anybit.quant.scaling import layer_loss

    W, acc = _correlated_layer()
    H = acc.hessian()
    config = QuantConfig(method="anybit", bits=3.0, scope="matrix", weighting="activation")
    plain = SKIM().quantize(W, LayerStats(acc), QuantConfig(method="skim", bits=3.0, scaling=False))
    fed = AnyBit().quantize(W, LayerStats(acc), config)
    assert fed.bits_per_weight() <= 3.0
    assert float(layer_loss(W, fed.dequantize(), H)) < 0.9 * float(layer_loss(W, plain.dequantize(), H))


@pytest.mark.parametrize("method", ["anybit", "skim"])
def test_refine_lowers_the_layer_objective(method: str) -> None:
    from anybit.methods import get_method
    from anybit.quant.scaling import layer_loss

    W, acc = _correlated_layer()
    H = acc.hessian()
    losses = []
    for refine in (0, 2):
        config = QuantConfig(
            method=method, bits=3.0, scope="matrix", weighting="activation", scaling=False, refine=refine
        )
        qt = get_method(method).quantize(W, LayerStats(acc), config)
        assert qt.bits_per_weight() <= 3.0
        losses.append(float(layer_loss(W, qt.dequantize(), H)))
    assert losses[1] < 0.99 * losses[0]  # 2-3 % lower on this layer


def test_skim_outliers_are_exact_and_counted() -> None:
    W, acc = _correlated_layer()
    W[3, 7] = 40.0
    qt = SKIM().quantize(W, LayerStats(acc), QuantConfig(method="skim", bits=3.0, outliers=0.01, scaling=False))
    assert qt.outliers is not None and qt.outliers.nnz == round(0.01 * W.numel())
    assert qt.bits_per_weight() <= 3.0
    assert float(qt.dequantize()[3, 7]) == 40.0


def test_inspect_plot_draws_the_bit_map(tiny_llama_dir, corpus_file, tmp_path) -> None:
    from click.testing import CliRunner

    from anybit.cli import main

    out = tmp_path / "q"
    run = CliRunner().invoke
    args = ["--calib", str(corpus_file), "--seqlen", "64", "--nsamples", "2"]
    result = run(main, ["quantize", str(tiny_llama_dir), "--method", "skim", "--bits", "3", "--out", str(out), *args])
    assert result.exit_code == 0, result.output
    png = tmp_path / "map.png"
    result = run(main, ["inspect", str(out), "--plot", str(png)])
    assert result.exit_code == 0, result.output
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    mine = tmp_path / "notes.png"
    mine.write_text("keep me")
    result = run(main, ["inspect", str(out), "--plot", str(mine)])
    assert result.exit_code != 0 and "pass --force" in result.output and mine.read_text() == "keep me"
    assert run(main, ["inspect", str(out), "--plot", str(mine), "--force"]).exit_code == 0
    assert mine.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_planned_rows_keep_the_codebooks_their_errors_were_measured_with() -> None:
    """The model-wide plan hands each row the codebook of its chosen width from the error table, and the
    second pass quantizes onto exactly those codebooks (no refit)."""
    from anybit.alloc.skim import allocate_model
    from anybit.methods.anybit import AnyBit

    W, acc = _correlated_layer()
    config = QuantConfig(method="anybit", bits=3.0, weighting="activation", refine=0)
    method = AnyBit()
    table = method.row_table(W, LayerStats(acc), config)
    plan = allocate_model({"m": table}, 3.0)["m"]
    assert len(set(plan.widths.tolist())) > 1  # mixed widths, so the rows come from several tables
    for row in range(W.shape[0]):
        i = table.widths.index(int(plan.widths[row]))
        torch.testing.assert_close(plan.codebooks()[row, : 1 << table.widths[i]], table.centroids[i][row].float())
    # codebooks a refit would never produce: the quantized rows must take their values from them all the same
    moved = dataclasses.replace(plan, books=(plan.codebooks() * 1.01 + 0.001).half())
    stats = LayerStats(acc)
    stats.plan = moved
    stored = method.quantize(W, stats, config).dequantize()
    for row in range(W.shape[0]):
        entries = moved.codebooks()[row, : 1 << int(moved.widths[row])]
        assert torch.isin(stored[row], entries).all()
