"""How close the batched K-means engine gets to the exact 1-D optimum, by initialisation.

Usage: python benchmarks/kmeans_optimality.py
Random normal and Student-t(3) rows with heavy-tailed positive weights; the worst ratio over the
rows of (engine objective) / (exact DP optimum) for each length, distribution, width and init.
"""

from __future__ import annotations

import torch

from _common import log_result
from anybit.quant.kmeans import fit_codebook, optimal_kmeans_1d, weighted_error


def main() -> None:
    torch.manual_seed(0)
    rows = 8
    for n in (192, 576):
        for dist in ("normal", "student_t3"):
            for bits in (2, 3, 4, 5):
                x = torch.randn(rows, n) if dist == "normal" else torch.distributions.StudentT(3.0).sample((rows, n))
                w = torch.rand(rows, n) ** 2 + 0.01
                optimum = torch.tensor([optimal_kmeans_1d(x[r], w[r], 2**bits)[1] for r in range(rows)])
                record = {"n": n, "distribution": dist, "bits": bits, "rows": rows}
                for init in ("dp", "quantile", "kmeans++"):
                    result = fit_codebook(x, w, 2**bits, init=init)
                    ratio = weighted_error(x, w, result.centroids, result.codes).double() / optimum
                    record[f"worst_ratio_{init}"] = round(float(ratio.max()), 4)
                log_result("kmeans_optimality", record)


if __name__ == "__main__":
    main()
