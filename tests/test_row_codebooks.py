import pytest
import torch

from anybit.config import QuantConfig
from anybit.errors import AnybitError
from anybit.quant.row_codebooks import refit_codebooks
from anybit.quant.scaling import layer_loss


def _problem(rows: int = 6, cols: int = 40, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    X = torch.randn(500, cols, generator=gen) @ (torch.eye(cols) + 0.3 * torch.randn(cols, cols, generator=gen))
    H = X.T @ X / 500
    W = torch.randn(rows, cols, generator=gen)
    widths = torch.tensor([1, 2, 3, 2, 3, 1])[:rows]
    books = torch.zeros(rows, 8)
    codes = torch.zeros(rows, cols, dtype=torch.long)
    for i, width in enumerate(widths.tolist()):
        k = 1 << width
        books[i, :k] = torch.linspace(-1.5, 1.5, k)
        codes[i] = torch.arange(cols) % k  # every entry in use
        codes[i] = codes[i][torch.randperm(cols, generator=gen)]
    kept = torch.rand(rows, cols, generator=gen) < 0.1
    return W, H, codes, books.half().float(), widths, kept


def _reconstruct(W, codes, books, kept):
    return torch.where(kept, W, torch.gather(books, 1, codes))


def test_refit_solves_the_least_squares_problem_of_each_row() -> None:
    W, H, codes, books, widths, kept = _problem()
    refit = refit_codebooks(W, H, codes, books, widths, kept)
    root = torch.linalg.cholesky(H.double()).T  # H = rootᵀ root: error of a row = |root r|²
    for i, width in enumerate(widths.tolist()):
        k = 1 << width
        onehot = torch.nn.functional.one_hot(codes[i], k).double() * (~kept[i, :, None]).double()
        target = torch.where(kept[i], torch.zeros_like(W[i]), W[i]).double()
        expected = torch.linalg.lstsq(root @ onehot, (root @ target)[:, None]).solution[:, 0]
        torch.testing.assert_close(refit[i, :k], expected.half().float(), rtol=2e-3, atol=2e-4)
        assert torch.equal(refit[i, k:], books[i, k:])  # entries past the row's width are left alone


def test_refit_never_raises_the_layer_error_and_keeps_unused_entries() -> None:
    W, H, codes, books, widths, kept = _problem(seed=1)
    codes[0] = 0  # width-1 row: entry 1 unused
    refit = refit_codebooks(W, H, codes, books, widths, kept)
    before = float(layer_loss(W, _reconstruct(W, codes, books, kept), H))
    after = float(layer_loss(W, _reconstruct(W, codes, refit, kept), H))
    assert after < 0.9 * before
    assert float(refit[0, 1]) == float(books[0, 1])


def test_refine_is_checked() -> None:
    with pytest.raises(AnybitError, match="--refine is not an option of method 'gptq'"):
        QuantConfig(method="gptq", bits=4, refine=1)
    with pytest.raises(AnybitError, match="--refine"):
        QuantConfig(method="anybit", refine=-1)


@pytest.mark.parametrize("method", ["anybit", "skim"])
def test_refine_end_to_end(tiny_llama_dir, corpus_file, tmp_path, method: str) -> None:
    """A tiny model quantizes with refits through the CLI, and the result loads."""
    from click.testing import CliRunner

    from anybit.cli import main

    out = tmp_path / "q"
    args = ["--calib", str(corpus_file), "--seqlen", "64", "--nsamples", "2", "--bits", "3", "--method", method]
    result = CliRunner().invoke(main, ["quantize", str(tiny_llama_dir), *args, "--refine", "2", "--out", str(out)])
    assert result.exit_code == 0, result.output
    result = CliRunner().invoke(main, ["inspect", str(out)])
    assert result.exit_code == 0, result.output


def test_act_order_feedback_is_the_permuted_problem_solved_in_order() -> None:
    """Rounding in act-order gives, column for column, the codes of the same problem with its columns
    permuted beforehand and rounded left to right (outlier mask included)."""
    from anybit.quant.gptq import act_order_perm
    from anybit.quant.row_codebooks import feedback_codes

    W, H, _, books, widths, kept = _problem(seed=2)
    perm = act_order_perm(H)
    assert not torch.equal(perm, torch.arange(len(perm)))
    codes, _ = feedback_codes(W, H, widths, books, kept, damp=0.01, act_order=True)
    expected, _ = feedback_codes(W[:, perm], H[perm][:, perm], widths, books, kept[:, perm], damp=0.01)
    assert torch.equal(codes[:, perm], expected)


def test_damped_refit_stays_near_the_weights_when_the_inputs_span_few_directions() -> None:
    """4 calibration tokens for 64 columns: H is singular; undamped, the 16 entries fit those few directions
    with values outside the weights' range (how far depends on how the CPU rounds a near-singular solve: over 5×
    on one machine, 1.7× on another), damped they stay in it, and the damped objective still falls."""
    gen = torch.Generator().manual_seed(3)
    X = torch.randn(4, 64, generator=gen)
    H = X.T @ X
    W = torch.randn(8, 64, generator=gen)
    widths = torch.full((8,), 4)
    books = torch.linspace(-2, 2, 16).repeat(8, 1).half().float()
    codes = torch.bucketize(W, (books[0, 1:] + books[0, :-1]) / 2)
    assert float(refit_codebooks(W, H, codes, books, widths).abs().max()) > 1.5 * float(W.abs().max())
    refit = refit_codebooks(W, H, codes, books, widths, damp=0.01)
    assert float(refit.abs().max()) < float(W.abs().max())
    damped_H = H + 0.01 * torch.diagonal(H).mean() * torch.eye(64)
    before = layer_loss(W, torch.gather(books, 1, codes), damped_H)
    assert float(layer_loss(W, torch.gather(refit, 1, codes), damped_H)) < float(before)
