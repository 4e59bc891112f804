"""Vector codebooks: the block error-feedback rounding against a brute-force sequential reference and against
the scalar GPTQ loop, the scale refit against least squares, the Gaussian table against the scalar bound."""

from __future__ import annotations

import torch

from anybit.quant.gptq import gptq_quantize, prepare_hessian
from anybit.quant.row_codebooks import RowCodebookQuantizer
from anybit.quant.vector_codebooks import gaussian_codebook, nearest_entries, refit_row_scales, vector_gptq


def _problem(rows: int, cols: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(4 * cols, cols, generator=g) @ (torch.eye(cols) + 0.4 * torch.randn(cols, cols, generator=g))
    return torch.randn(rows, cols, generator=g), 2 * X.T @ X / X.shape[0]


def _brute_force(W: torch.Tensor, H: torch.Tensor, codebook: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """Each piece's entry chosen by trying every one: the scalar GPTQ steps over the piece's columns, one after
    the other, summing their squared scaled errors; then the chosen entry's errors fed forward column by column."""
    dim = codebook.shape[1]
    W, U, _ = prepare_hessian(W, H, 0.01, False)
    indices = torch.zeros(W.shape[0], W.shape[1] // dim, dtype=torch.int64)
    for r in range(W.shape[0]):
        w = W[r].clone()
        for p in range(W.shape[1] // dim):
            cols = range(p * dim, (p + 1) * dim)

            def errors(k: int, w=w, cols=cols, s=scales[r]) -> torch.Tensor:
                v, out = w.clone(), []
                for i, c in zip(cols, s * codebook[k], strict=True):
                    e = (v[i] - c) / U[i, i]
                    v[i:] -= e * U[i, i:]
                    out.append(e)
                return torch.stack(out)

            losses = [float(errors(k).square().sum()) for k in range(codebook.shape[0])]
            k = min(range(len(losses)), key=losses.__getitem__)
            indices[r, p] = k
            for i, e in zip(cols, errors(k), strict=True):
                w[i:] -= e * U[i, i:]
    return indices


def test_block_rounding_matches_brute_force():
    W, H = _problem(5, 12)
    codebook = gaussian_codebook(16, 2, iters=10)  # pieces of 2, then of 3 columns
    scales = W.square().mean(dim=1).sqrt()
    for book in (codebook, torch.randn(8, 3, generator=torch.Generator().manual_seed(1))):
        indices, chosen, perm = vector_gptq(W, H, book, scales, blocksize=6)
        assert perm is None
        assert torch.equal(indices, _brute_force(W, H, book, scales))
        assert torch.equal(chosen, book[indices].reshape(W.shape))


def test_one_dimensional_pieces_are_scalar_gptq():
    W, H = _problem(6, 16, seed=2)
    grid = torch.linspace(-2, 2, 8)
    _, chosen, perm = vector_gptq(W, H, grid[:, None], torch.ones(6), act_order=True, blocksize=8)
    quantizer = RowCodebookQuantizer(grid.expand(6, 8).contiguous(), None)
    result = gptq_quantize(W, H, quantizer, act_order=True, blocksize=8)
    assert torch.equal(perm, result.perm)
    torch.testing.assert_close(chosen, result.Q)


def test_scale_refit_is_least_squares():
    W, H = _problem(4, 8, seed=3)
    chosen = torch.randn(4, 8, generator=torch.Generator().manual_seed(4))
    L = torch.linalg.cholesky(H)
    got = refit_row_scales(W, chosen, H, torch.ones(4))
    for r in range(4):
        want = torch.linalg.lstsq((chosen[r] @ L)[:, None].double(), (W[r] @ L)[:, None].double()).solution
        torch.testing.assert_close(got[r].double(), want[0, 0], rtol=1e-4, atol=1e-6)


def test_gaussian_table_beats_the_best_scalar_grid():
    """At 2 bits a weight, 256 entries of 4 dimensions code Gaussian samples with less squared error than the
    best scalar 4-level quantizer can (Lloyd-Max: 0.1175 per coordinate), and the table is reproducible."""
    table = gaussian_codebook(256, 4)
    assert torch.equal(table, gaussian_codebook(256, 4))
    samples = torch.randn(50_000, 4, generator=torch.Generator().manual_seed(5))
    picked = table[nearest_entries(samples, torch.ones_like(samples), table)]
    assert float((samples - picked).square().mean()) < 0.1175 * 0.9
    assert table.shape == (256, 4)


def test_nearest_entries_against_every_distance():
    """The weighted and the unweighted (None) searches pick the entry of least (weighted) squared distance."""
    g = torch.Generator().manual_seed(11)
    points, entries = torch.randn(3000, 4, generator=g), torch.randn(700, 4, generator=g)
    weights = torch.rand(3000, 4, generator=g) + 0.1
    distances = (weights[:, None, :] * (points[:, None, :] - entries[None]).square()).sum(dim=2)
    assert torch.equal(nearest_entries(points, weights, entries), distances.argmin(dim=1))
    plain = (points[:, None, :] - entries[None]).square().sum(dim=2).argmin(dim=1)
    assert torch.equal(nearest_entries(points, None, entries), plain)


def test_the_scaled_search_in_chunks_of_rows_is_the_whole_search():
    """The error-feedback rounding's search, a chunk of rows at a time (many chunks at 4096 entries), picks
    what one product over all rows picks."""
    from anybit.quant.vector_codebooks import _nearest_scaled

    g = torch.Generator().manual_seed(12)
    vA, CA, s = (
        torch.randn(300, 4, generator=g),
        torch.randn(4096, 4, generator=g),
        torch.rand(300, 1, generator=g) + 0.5,
    )
    whole = (s.square() * CA.square().sum(dim=1)[None, :] - 2 * s * (vA @ CA.T)).argmin(dim=1)
    assert torch.equal(_nearest_scaled(vA, CA, s), whole)
