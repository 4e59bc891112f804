"""Batched weighted 1-D K-means: many independent vectors (rows or columns) at once.

`fit_codebook` runs Lloyd iterations on V vectors of N values together. In one dimension a cluster
is a run of the sorted values, so each vector is sorted once and a Lloyd step only moves the k
cluster boundaries (a search of the centroids' midpoints in the sorted values; prefix sums give each
run's mass and mean): no V × N × k distance tensor is ever built, memory is O(V·N + V·k). Each
vector may have its own number of clusters (mixed widths): unused centroid slots are +inf and never
win a point. The default initialisation is the exact optimum over a coarse binning of each vector
(deterministic; it puts lone outliers in clusters of their own, which quantile seeding misses on
heavy-tailed rows), for up to 32 clusters; larger codebooks grow from it by splitting the
highest-error clusters, with Lloyd rounds between. Weighted quantiles and weighted k-means++
(seeded) are the alternatives. An empty cluster moves onto the value with the largest weighted
error. `optimal_kmeans_1d` is the exact dynamic-programming optimum, for tests and short vectors.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch

DP_BINS = 128  # edges of the binned DP initialisation
DP_MAX_K = 32  # clusters seeded by the DP; beyond, clusters are split (the DP costs k · bins² per row)
SPLIT_ROUND_ITERS = 10  # Lloyd iterations between two rounds of splitting
DP_BLOCKS = 4  # the DP's edges are processed in this many blocks (about 5/8 of the full min-plus work)
DP_CHUNK_ELEMENTS = 1 << 21  # rows × edges² processed at once by the DP (its stages then run in cache)


@dataclass
class KMeansResult:
    centroids: torch.Tensor  # (V, k_max), sorted ascending per vector; unused slots are +inf
    codes: torch.Tensor  # (V, N) int64 index of each value's centroid
    iterations: int


def midpoints(centroids: torch.Tensor) -> torch.Tensor:
    """(V, k - 1) decision boundaries between neighbouring sorted centroids (+inf past the used ones)."""
    mid = (centroids[:, 1:] + centroids[:, :-1]) / 2
    return torch.where(torch.isnan(mid), torch.full_like(mid, float("inf")), mid).contiguous()


def assign(x: torch.Tensor, centroids: torch.Tensor, mid: torch.Tensor | None = None) -> torch.Tensor:
    """Index of the nearest centroid for every value; centroids sorted ascending per row (+inf padded).
    `mid`: their `midpoints`, when already computed."""
    mid = midpoints(centroids) if mid is None else mid
    return torch.searchsorted(mid, x.contiguous(), right=False)


def reconstruct(centroids: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """Values of the codes: centroids[v, codes[v, n]]."""
    return torch.gather(centroids, 1, codes)


def weighted_error(
    x: torch.Tensor, weights: torch.Tensor, centroids: torch.Tensor, codes: torch.Tensor
) -> torch.Tensor:
    """Σ w (x − c)² per vector."""
    return (weights * (x - reconstruct(centroids, codes)) ** 2).sum(dim=1)


def _k_per_vector(k: int | torch.Tensor, V: int, device: torch.device) -> torch.Tensor:
    ks = torch.as_tensor(k, device=device, dtype=torch.int64)
    return ks.expand(V).clone() if ks.dim() == 0 else ks


@dataclass
class _SortedRows:
    """Each row sorted once, with float64 prefix sums of w and w·x: the mass and mean of any run of
    sorted values in O(1), so a Lloyd step costs O(k log N) per row instead of O(N log k)."""

    xs: torch.Tensor  # (V, N) sorted values
    order: torch.Tensor  # (V, N) original index of each sorted value
    cw: torch.Tensor  # (V, N + 1) prefix sums of the weights (float64)
    cs: torch.Tensor  # (V, N + 1) prefix sums of weight × value (float64)

    @classmethod
    def of(cls, x: torch.Tensor, weights: torch.Tensor) -> _SortedRows:
        xs, order = torch.sort(x.contiguous(), dim=1)  # a transposed view would sort into strided rows
        ws = torch.gather(weights, 1, order).double()
        zero = torch.zeros(x.shape[0], 1, dtype=torch.float64, device=x.device)
        cw = torch.cat([zero, torch.cumsum(ws, 1)], 1)
        cs = torch.cat([zero, torch.cumsum(ws * xs.double(), 1)], 1)
        return cls(xs, order, cw, cs)

    def rows(self, start: int, stop: int) -> _SortedRows:
        return _SortedRows(self.xs[start:stop], self.order[start:stop], self.cw[start:stop], self.cs[start:stop])

    def boundaries(self, centroids: torch.Tensor) -> torch.Tensor:
        """(V, k + 1) sorted positions where each centroid's cluster starts, then N: the values in
        (mid[j-1], mid[j]] belong to centroid j, as in `assign`."""
        ends = torch.searchsorted(self.xs, midpoints(centroids), right=True)
        V, N = self.xs.shape
        zero = torch.zeros(V, 1, dtype=ends.dtype, device=ends.device)
        return torch.cat([zero, ends, torch.full_like(zero, N)], 1)

    def cluster_stats(self, bounds: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Weight mass and weighted sum of every cluster between consecutive boundaries."""
        mass = torch.gather(self.cw, 1, bounds[:, 1:]) - torch.gather(self.cw, 1, bounds[:, :-1])
        sums = torch.gather(self.cs, 1, bounds[:, 1:]) - torch.gather(self.cs, 1, bounds[:, :-1])
        return mass, sums


def _quantile_init(
    x: torch.Tensor, weights: torch.Tensor, ks: torch.Tensor, k_max: int, rows: _SortedRows
) -> torch.Tensor:
    """Centroid j of a vector with k clusters at its weighted (j + 0.5)/k quantile."""
    xs = rows.xs
    ws = torch.gather(weights, 1, rows.order) + 1e-12 * weights.mean(dim=1, keepdim=True).clamp(min=1e-30)
    cdf = torch.cumsum(ws, dim=1)
    cdf = cdf / cdf[:, -1:]
    j = torch.arange(k_max, device=x.device, dtype=x.dtype)
    levels = ((j + 0.5) / ks[:, None].to(x.dtype)).clamp(max=1.0)
    idx = torch.searchsorted(cdf.contiguous(), levels.contiguous()).clamp(max=x.shape[1] - 1)
    return torch.gather(xs, 1, idx)


def _binned_dp_seeds(
    x: torch.Tensor,
    weights: torch.Tensor,
    ks_list: list[torch.Tensor],
    k_max: int,
    bins: int | None = None,
    rows: _SortedRows | None = None,
) -> list[torch.Tensor]:
    """Optimal centroids among partitions whose boundaries fall on bin edges, for all rows at once, for
    each cluster count in `ks_list` (one per row) from one dynamic programme: its stage t holds the best
    (t + 1)-cluster partitions, so every k <= k_max is one walk back.

    The sorted values are cut at `bins/2` rank quantiles and at `bins/2` equal steps of the value range
    (so lone outliers get bins of their own). Per-bin sums make every cluster's cost exact.
    """
    V, N = x.shape
    bins = bins or DP_BINS
    rows = rows or _SortedRows.of(x, weights)
    chunk = max(1, DP_CHUNK_ELEMENTS // (bins + 2) ** 2)
    if chunk < V:
        parts = [
            _binned_dp_seeds(
                x[i : i + chunk],
                weights[i : i + chunk],
                [ks[i : i + chunk] for ks in ks_list],
                k_max,
                bins,
                rows.rows(i, i + chunk),
            )
            for i in range(0, V, chunk)
        ]
        return [torch.cat([p[j] for p in parts]) for j in range(len(ks_list))]
    # standardise each row so the float32 cluster costs below do not lose precision to cancellation
    mu = x.mean(dim=1, keepdim=True)
    sd = x.std(dim=1, keepdim=True).clamp(min=1e-12) if N > 1 else torch.ones_like(mu)
    xs = (rows.xs - mu) / sd
    ws = torch.gather(weights, 1, rows.order).double()
    ws = ws / ws.sum(dim=1, keepdim=True).clamp(min=1e-300)
    xd = xs.double()
    zero = torch.zeros(V, 1, dtype=torch.float64, device=x.device)
    cW = torch.cat([zero, torch.cumsum(ws, 1)], 1)
    cS = torch.cat([zero, torch.cumsum(ws * xd, 1)], 1)
    cQ = torch.cat([zero, torch.cumsum(ws * xd * xd, 1)], 1)
    half = max(bins // 2, 1)
    by_rank = torch.linspace(0, N, half + 1, device=x.device).round().long().expand(V, -1)
    steps = torch.linspace(0, 1, half + 1, device=x.device, dtype=xs.dtype)
    levels = xs[:, :1] + (xs[:, -1:] - xs[:, :1]) * steps
    by_value = torch.searchsorted(xs.contiguous(), levels.contiguous(), right=True)
    edges = torch.sort(torch.cat([by_rank, by_value.clamp(0, N)], 1), dim=1).values  # (V, B)
    W, S, Q = (torch.gather(c, 1, edges).float() for c in (cW, cS, cQ))
    # cost[v, b, a]: one cluster over the values between edges a and b (a last: the stage's min is contiguous)
    mass = (W[:, :, None] - W[:, None, :]).clamp_(min=1e-30)
    lin = S[:, :, None] - S[:, None, :]
    cost = Q[:, :, None] - Q[:, None, :]
    cost.sub_(lin.square_().div_(mass)).clamp_(min=0)
    del mass, lin
    B = edges.shape[1]
    earlier = torch.arange(B, device=x.device)[None, :] < torch.arange(B, device=x.device)[:, None]
    cost.masked_fill_(~earlier, float("inf"))
    best = cost[:, :, 0].clone()
    best[:, 0] = 0.0
    bests = [best]  # bests[t][v, b]: least cost of t + 1 clusters over the values before edge b
    # edges b in DP_BLOCKS blocks: a block only looks at the edges a before its end (the rest cost +inf)
    blocks = [(B * i // DP_BLOCKS, B * (i + 1) // DP_BLOCKS) for i in range(DP_BLOCKS)]
    totals = [torch.empty(V, stop - start, stop, dtype=cost.dtype, device=x.device) for start, stop in blocks]
    for _ in range(1, k_max):
        best = torch.empty_like(bests[-1])
        for (start, stop), total in zip(blocks, totals, strict=True):
            # values only (amin is ~10x faster than min with indices); the walk back recovers the argmins it needs
            torch.add(cost[:, start:stop, :stop], bests[-1][:, None, :stop], out=total)
            best[:, start:stop] = total.amin(dim=2)
        best[:, 0] = 0.0
        bests.append(best)
    del totals
    # walk back from the last edge; rows with fewer clusters stop early (their extra slots become +inf)
    row = torch.arange(V, device=x.device)
    seeds = []
    for ks in ks_list:
        centroids = torch.full((V, k_max), float("inf"), dtype=x.dtype, device=x.device)
        end = torch.full((V,), B - 1, dtype=torch.long, device=x.device)
        for t in range(int(ks.max()) - 1, -1, -1):  # slots past every row's k stay +inf
            active = t < ks  # row uses cluster slot t
            start = (bests[t - 1] + cost[row, end]).argmin(dim=1) if t > 0 else torch.zeros_like(end)
            m = W[row, end] - W[row, start]
            c = torch.where(m > 0, (S[row, end] - S[row, start]) / m.clamp(min=1e-30), float("inf"))
            centroids[:, t] = torch.where(active, c, centroids[:, t])
            end = torch.where(active, start, end)
        seeds.append((centroids * sd + mu).to(x.dtype))
    return seeds


def _kmeanspp_init(x: torch.Tensor, weights: torch.Tensor, k_max: int, generator: torch.Generator) -> torch.Tensor:
    """Weighted k-means++ seeding, all vectors together."""
    V, _ = x.shape
    rows = torch.arange(V, device=x.device)
    probs = weights + 1e-30
    first = torch.multinomial(probs.cpu(), 1, generator=generator).to(x.device)[:, 0]
    cents = [x[rows, first]]
    d2 = (x - cents[0][:, None]) ** 2
    for _ in range(1, k_max):
        p = (weights * d2).cpu() + 1e-30
        nxt = torch.multinomial(p, 1, generator=generator).to(x.device)[:, 0]
        cents.append(x[rows, nxt])
        d2 = torch.minimum(d2, (x - cents[-1][:, None]) ** 2)
    return torch.stack(cents, dim=1)


def _reseed_empty(
    x: torch.Tensor,
    weights: torch.Tensor,
    centroids: torch.Tensor,
    codes: torch.Tensor,
    mass: torch.Tensor,
    ks: torch.Tensor,
) -> torch.Tensor:
    """Move each empty cluster onto one of the values with the largest weighted error (distinct per slot)."""
    valid = torch.arange(centroids.shape[1], device=x.device)[None, :] < ks[:, None]
    empty = (mass <= 0) & valid
    if not bool(empty.any()):
        return centroids
    err = weights * (x - reconstruct(centroids, codes)) ** 2
    m = int(empty.sum(dim=1).max())
    worst = torch.gather(x, 1, err.topk(min(m, x.shape[1]), dim=1).indices)  # (V, m)
    rank = (empty.cumsum(dim=1) - 1).clamp(0, worst.shape[1] - 1)
    return torch.where(empty, torch.gather(worst, 1, rank), centroids)


def _sanitize(centroids: torch.Tensor, ks: torch.Tensor) -> torch.Tensor:
    """Sort, and set slots past each vector's k to +inf."""
    k_max = centroids.shape[1]
    unused = torch.arange(k_max, device=centroids.device)[None, :] >= ks[:, None]
    centroids = torch.where(unused, torch.full_like(centroids, float("inf")), centroids)
    return torch.sort(centroids, dim=1).values


def fit_codebook(
    x: torch.Tensor,
    weights: torch.Tensor | None = None,
    k: int | torch.Tensor = 16,
    max_iter: int = 50,
    init: str = "dp",
    seed: int = 0,
    chunk: int | None = None,
) -> KMeansResult:
    """Weighted K-means of every row of x (V, N) with k clusters (an int or one per row, up to 256).

    Minimises Σₙ wₙ (xₙ − c[codeₙ])² per row. Runs until no assignment changes or `max_iter`.
    `chunk` bounds how many rows are processed at once (default: all).
    """
    if x.dim() != 2:
        raise ValueError(f"x must be (vectors, values), got shape {tuple(x.shape)}")
    x = x.float()
    weights = torch.ones_like(x) if weights is None else weights.float().expand_as(x)
    if chunk is not None and x.shape[0] > chunk:
        ks_all = _k_per_vector(k, x.shape[0], x.device)
        parts = [
            fit_codebook(x[i : i + chunk], weights[i : i + chunk], ks_all[i : i + chunk], max_iter, init, seed)
            for i in range(0, x.shape[0], chunk)
        ]
        k_max = max(p.centroids.shape[1] for p in parts)
        pad = [
            torch.nn.functional.pad(p.centroids, (0, k_max - p.centroids.shape[1]), value=float("inf")) for p in parts
        ]
        return KMeansResult(torch.cat(pad), torch.cat([p.codes for p in parts]), max(p.iterations for p in parts))
    V, _ = x.shape
    ks = _k_per_vector(k, V, x.device)
    k_max = int(ks.max())
    if not 1 <= k_max <= 256 or int(ks.min()) < 1:
        raise ValueError(f"clusters per vector must be in 1-256, got {int(ks.min())}-{k_max}")
    rows = _SortedRows.of(x, weights)
    if init == "dp":
        # the binned DP seeds up to DP_MAX_K clusters; rows with more grow by splitting clusters
        k_seed = ks.clamp(max=DP_MAX_K)
        seeds = _binned_dp_seeds(x, weights, [k_seed], int(k_seed.max()), rows=rows)[0]
        centroids = _sanitize(seeds, k_seed)
        while bool((k_seed < ks).any()):
            centroids, codes, _ = _lloyd(x, weights, centroids, k_seed, SPLIT_ROUND_ITERS, rows)
            k_next = torch.minimum(ks, 2 * k_seed)
            centroids = _split_clusters(x, weights, centroids, codes, k_next)
            k_seed = k_next
    elif init == "quantile":
        centroids = _quantile_init(x, weights, ks, k_max, rows)
    elif init == "kmeans++":
        centroids = _kmeanspp_init(x, weights, k_max, torch.Generator().manual_seed(seed))
    else:
        raise ValueError(f"unknown init {init!r} (dp, quantile or kmeans++)")
    centroids, codes, iterations = _lloyd(x, weights, _sanitize(centroids, ks), ks, max_iter, rows)
    return KMeansResult(centroids, codes, iterations)


def fit_codebooks(
    x: torch.Tensor, weights: torch.Tensor | None, widths: list[int], max_iter: int = 50
) -> dict[int, KMeansResult]:
    """`fit_codebook` of every row at each width in `widths` (2**b clusters), sharing work: one binned
    DP seeds every width up to DP_MAX_K clusters, and each wider codebook grows by splitting the
    converged codebook one width below it (the same seeds for widths up to 5, better-started ones
    beyond)."""
    x = x.float()
    weights = torch.ones_like(x) if weights is None else weights.float().expand_as(x)
    V = x.shape[0]
    full = {b: torch.full((V,), 1 << b, dtype=torch.int64, device=x.device) for b in widths}
    small = sorted(b for b in widths if (1 << b) <= DP_MAX_K)
    results: dict[int, KMeansResult] = {}
    rows = _SortedRows.of(x, weights)
    if small:
        seeds = _binned_dp_seeds(x, weights, [full[b] for b in small], 1 << small[-1], rows=rows)
        for b, seed in zip(small, seeds, strict=True):
            seed = _sanitize(seed[:, : 1 << b], full[b])
            results[b] = KMeansResult(*_lloyd(x, weights, seed, full[b], max_iter, rows))
    for b in sorted(set(widths) - set(small)):
        below = max((w for w in results if w < b), default=None)
        if below is None:
            results[b] = fit_codebook(x, weights, k=1 << b, max_iter=max_iter)
            continue
        centroids, codes, k_cur = results[below].centroids, results[below].codes, full[below]
        while bool((k_cur < full[b]).any()):
            k_next = torch.minimum(full[b], 2 * k_cur)
            centroids = _split_clusters(x, weights, centroids, codes, k_next)
            k_cur = k_next
            if bool((k_cur < full[b]).any()):
                centroids, codes, _ = _lloyd(x, weights, _sanitize(centroids, k_cur), k_cur, SPLIT_ROUND_ITERS, rows)
        results[b] = KMeansResult(*_lloyd(x, weights, _sanitize(centroids, full[b]), full[b], max_iter, rows))
    return results


def _lloyd(
    x: torch.Tensor,
    weights: torch.Tensor,
    centroids: torch.Tensor,
    ks: torch.Tensor,
    max_iter: int,
    rows: _SortedRows | None = None,
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Lloyd iterations from sorted centroids until no assignment changes (or `max_iter`).

    Clusters are runs of each row's sorted values, so an iteration only moves the k boundaries."""
    rows = rows or _SortedRows.of(x, weights)
    bounds = rows.boundaries(centroids)
    used = torch.arange(centroids.shape[1], device=x.device)[None, :] < ks[:, None]
    iterations = 0
    for iterations in range(1, max_iter + 1):  # noqa: B007 - reported
        mass, sums = rows.cluster_stats(bounds)
        updated = torch.where(mass > 0, sums / mass.clamp(min=1e-300), centroids.double()).to(x.dtype)
        if bool(((mass <= 0) & used).any()):
            updated = _reseed_empty(x, weights, updated, assign(x, centroids), mass.to(x.dtype), ks)
        centroids = _sanitize(updated, ks)
        new_bounds = rows.boundaries(centroids)
        if torch.equal(new_bounds, bounds):
            break
        bounds = new_bounds
    return centroids, assign(x, centroids), iterations


def _split_clusters(
    x: torch.Tensor, weights: torch.Tensor, centroids: torch.Tensor, codes: torch.Tensor, k_next: torch.Tensor
) -> torch.Tensor:
    """Split each row's highest-error clusters in two (the means of their members below and above the
    centroid) until the row has k_next clusters; returns sorted centroids padded with +inf."""
    V, k_cur = centroids.shape
    current = torch.isfinite(centroids).sum(dim=1)
    need = (k_next - current).clamp(min=0)
    recon = torch.gather(centroids, 1, codes)
    zeros = torch.zeros(V, k_cur, device=x.device)
    sse = zeros.scatter_add(1, codes, weights * (x - recon).square())
    sse = torch.where(torch.isfinite(centroids), sse, torch.full_like(sse, -1.0))
    rank = torch.argsort(torch.argsort(sse, dim=1, descending=True, stable=True), dim=1)
    chosen = rank < need[:, None]
    upper = (x >= recon).float()
    mass_hi = zeros.scatter_add(1, codes, weights * upper)
    sum_hi = zeros.scatter_add(1, codes, weights * upper * x)
    mass_lo = zeros.scatter_add(1, codes, weights * (1 - upper))
    sum_lo = zeros.scatter_add(1, codes, weights * (1 - upper) * x)
    lo = torch.where(mass_lo > 0, sum_lo / mass_lo.clamp(min=1e-30), centroids)
    hi = torch.where(mass_hi > 0, sum_hi / mass_hi.clamp(min=1e-30), centroids)
    kept = torch.where(chosen, lo, centroids)
    added = torch.where(chosen, hi, torch.full_like(hi, float("inf")))
    grown = torch.sort(torch.cat([kept, added], dim=1), dim=1).values
    return grown[:, : int(k_next.max())]


def optimal_kmeans_1d(x: torch.Tensor, weights: torch.Tensor | None, k: int) -> tuple[torch.Tensor, float]:
    """Exact optimum of weighted 1-D K-means by dynamic programming over sorted values, O(k·N²).

    Returns (sorted centroids (k,), optimal Σ w (x − c)²). Meant for short vectors and as a test oracle.
    """
    x = x.double().flatten()
    w = torch.ones_like(x) if weights is None else weights.double().flatten()
    order = torch.argsort(x)
    x, w = x[order], w[order]
    n = x.numel()
    k = min(k, n)
    # prefix sums give the cost of one cluster over any sorted range [i, j) in O(1)
    zero = torch.zeros(1, dtype=torch.float64)
    W = torch.cat([zero, torch.cumsum(w, 0)])
    S = torch.cat([zero, torch.cumsum(w * x, 0)])
    Q = torch.cat([zero, torch.cumsum(w * x * x, 0)])
    i = torch.arange(n + 1)
    lo, hi = i[:, None], i[None, :]  # cost[lo, hi] for the range [lo, hi)
    mass = W[hi] - W[lo]
    cost = Q[hi] - Q[lo] - torch.where(mass > 0, (S[hi] - S[lo]) ** 2 / mass.clamp(min=1e-300), 0.0)
    cost = torch.where(hi > lo, cost.clamp(min=0), torch.full_like(cost, float("inf")))
    best = cost[0].clone()  # best[j]: one cluster over [0, j)
    best[0] = 0.0
    splits = []
    for _ in range(1, k):
        total = best[:, None] + cost  # last cluster [lo, hi)
        new_best, arg = total.min(dim=0)
        new_best[0] = 0.0
        splits.append(arg)
        best = new_best
    # walk back the boundaries of the k clusters over [0, n)
    bounds = [n]
    for arg in reversed(splits):
        bounds.append(int(arg[bounds[-1]]))
    bounds.append(0)
    bounds = bounds[::-1]
    cents = []
    for a, b in itertools.pairwise(bounds):
        if b > a and W[b] - W[a] > 0:
            cents.append(float((S[b] - S[a]) / (W[b] - W[a])))
        elif b > a:
            cents.append(float(x[a:b].mean()))
    return torch.tensor(sorted(cents)), float(best[n])
