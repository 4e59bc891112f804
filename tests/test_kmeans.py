import itertools

import pytest
import torch

from anybit.quant.kmeans import assign, fit_codebook, fit_codebooks, optimal_kmeans_1d, reconstruct, weighted_error


def _brute_force(x: torch.Tensor, w: torch.Tensor, k: int) -> float:
    """Best contiguous partition of the sorted values into k clusters, by enumeration."""
    order = torch.argsort(x)
    xs, ws = x[order].double(), w[order].double()
    n, best = xs.numel(), float("inf")
    for cuts in itertools.combinations(range(1, n), k - 1):
        bounds = (0, *cuts, n)
        total = 0.0
        for a, b in itertools.pairwise(bounds):
            c = (ws[a:b] * xs[a:b]).sum() / ws[a:b].sum()
            total += float((ws[a:b] * (xs[a:b] - c) ** 2).sum())
        best = min(best, total)
    return best


@pytest.mark.parametrize("n,k", [(6, 2), (8, 3), (9, 4), (7, 7)])
def test_exact_solver_matches_brute_force(n: int, k: int) -> None:
    x, w = torch.randn(n), torch.rand(n) + 0.1
    _, cost = optimal_kmeans_1d(x, w, k)
    assert cost == pytest.approx(_brute_force(x, w, k), rel=1e-9, abs=1e-12)


def test_assign_is_nearest_centroid() -> None:
    x = torch.randn(5, 300)
    cents = torch.sort(torch.randn(5, 8), dim=1).values
    codes = assign(x, cents)
    brute = (x[:, :, None] - cents[:, None, :]).abs().argmin(dim=2)
    assert torch.equal(reconstruct(cents, codes), reconstruct(cents, brute))


@pytest.mark.parametrize("dist", ["normal", "student_t"])
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_lloyd_within_two_percent_of_optimum(dist: str, bits: int) -> None:
    rows, n = 16, 192
    x = torch.randn(rows, n) if dist == "normal" else torch.distributions.StudentT(3.0).sample((rows, n))
    w = torch.rand(rows, n) ** 2 + 0.01
    result = fit_codebook(x, w, k=2**bits, max_iter=100)
    lloyd = weighted_error(x, w, result.centroids, result.codes)
    for r in range(rows):
        _, opt = optimal_kmeans_1d(x[r], w[r], 2**bits)
        assert float(lloyd[r]) <= 1.02 * opt + 1e-9, (r, float(lloyd[r]), opt)


def test_mixed_k_per_row_and_chunking() -> None:
    x = torch.randn(10, 64)
    ks = torch.tensor([1, 2, 4, 8, 16, 2, 4, 8, 16, 256])
    full = fit_codebook(x, None, ks)
    chunked = fit_codebook(x, None, ks, chunk=3)
    assert torch.equal(full.codes, chunked.codes)
    for r, k in enumerate(ks.tolist()):
        assert int(full.codes[r].max()) < k
        assert torch.isinf(full.centroids[r, k:]).all()
    assert torch.equal(reconstruct(full.centroids, full.codes)[-1], x[-1])  # 256 clusters ≥ 64 values: exact


def test_deterministic_and_kmeanspp() -> None:
    x, w = torch.randn(8, 128), torch.rand(8, 128)
    a, b = fit_codebook(x, w, 8), fit_codebook(x, w, 8)
    assert torch.equal(a.centroids, b.centroids)
    c, d = fit_codebook(x, w, 8, init="kmeans++", seed=3), fit_codebook(x, w, 8, init="kmeans++", seed=3)
    assert torch.equal(c.codes, d.codes)


def test_zero_weights_and_constant_rows() -> None:
    x = torch.ones(3, 32)
    x[1] = torch.linspace(-1, 1, 32)
    w = torch.ones(3, 32)
    w[2] = 0
    result = fit_codebook(x, w, 4)
    assert torch.isfinite(result.centroids[:, :4]).all()
    assert torch.allclose(reconstruct(result.centroids, result.codes)[0], x[0])


def test_shared_fits_across_widths_match_separate_fits() -> None:
    torch.manual_seed(4)
    x = torch.randn(64, 300) * (torch.rand(64, 1) + 0.1)
    x[:, ::37] *= 8  # heavy tails
    w = torch.rand(64, 300)
    shared = fit_codebooks(x, w, [1, 2, 3, 4, 5, 6, 7])
    for b, result in shared.items():
        alone = fit_codebook(x, w, k=1 << b)
        if (1 << b) <= 32:  # the same DP seeds, so the same fit
            assert torch.equal(result.codes, alone.codes)
        objective = weighted_error(x, w, result.centroids, result.codes).sum()
        reference = weighted_error(x, w, alone.centroids, alone.codes).sum()
        assert objective <= reference * 1.02


def test_lloyd_on_sorted_rows_matches_textbook_lloyd() -> None:
    """The boundary-moving Lloyd equals assign-all / re-average Lloyd from the same seeds (mixed k per row)."""
    from anybit.quant.kmeans import _lloyd, _sanitize

    torch.manual_seed(7)
    x = torch.randn(6, 200) * torch.rand(6, 1) + 0.3 * torch.randn(6, 1)
    w = torch.rand(6, 200) + 0.05
    ks = torch.tensor([2, 3, 4, 8, 8, 16])
    seeds = _sanitize(torch.sort(x[:, torch.randperm(200)[:16]], dim=1).values, ks)
    centroids, codes, _ = _lloyd(x, w, seeds, ks, max_iter=100)
    for v in range(x.shape[0]):
        c = seeds[v, : ks[v]].double()
        for _ in range(100):
            labels = (x[v, :, None].double() - c[None, :]).abs().argmin(dim=1)
            mass = torch.zeros_like(c).index_add_(0, labels, w[v].double())
            sums = torch.zeros_like(c).index_add_(0, labels, (w[v] * x[v]).double())
            updated = torch.where(mass > 0, sums / mass.clamp(min=1e-300), c).sort().values
            if torch.equal(updated, c):
                break
            c = updated
        torch.testing.assert_close(centroids[v, : ks[v]].double(), c, rtol=1e-5, atol=1e-6)
        assert torch.isinf(centroids[v, ks[v] :]).all()
    assert torch.equal(codes, assign(x, centroids))
