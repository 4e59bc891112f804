"""K-means engine against scikit-learn's KMeans fitted row by row (what SqueezeLLM does).

Usage: python benchmarks/kmeans_engine.py [--rows 1000] [--cols 1536] [--device cpu]
Needs scikit-learn (benchmark only: pip install scikit-learn). The rows are real SmolLM2 weights
(rows of the down projections, 1536 wide), with heavy-tailed positive per-column weights like
diag(XᵀX); both engines minimise the same weighted objective, compared row by row.
"""

from __future__ import annotations

import argparse
import time

import torch

from _common import log_result
from anybit.model.loading import load_model
from anybit.quant.kmeans import fit_codebook, weighted_error


def real_rows(n_rows: int, cols: int) -> torch.Tensor:
    model = load_model("smollm2-135m").model
    rows = [layer.mlp.down_proj.weight.detach() for layer in model.model.layers]  # (576, 1536) each
    W = torch.cat(rows)[:, :cols]
    return W[torch.randperm(W.shape[0], generator=torch.Generator().manual_seed(0))[:n_rows]].float()


def sklearn_rows(W: torch.Tensor, weights: torch.Tensor, k: int) -> tuple[torch.Tensor, float]:
    from sklearn.cluster import KMeans

    errors = torch.empty(W.shape[0])
    start = time.perf_counter()
    for i in range(W.shape[0]):
        x, w = W[i].double().numpy()[:, None], weights[i].double().numpy()
        km = KMeans(n_clusters=k, n_init="auto", max_iter=50, random_state=0).fit(x, sample_weight=w)
        centers = torch.from_numpy(km.cluster_centers_[:, 0])
        errors[i] = float((weights[i].double() * (W[i].double() - centers[km.labels_]) ** 2).sum())
    return errors, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1000)
    parser.add_argument("--cols", type=int, default=1536)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--skip-sklearn", action="store_true")
    args = parser.parse_args()
    W = real_rows(args.rows, args.cols)
    # activation-like importance: positive, heavy-tailed, shared by a column
    weights = (torch.randn(args.cols, generator=torch.Generator().manual_seed(1)) ** 2 + 0.05).expand_as(W)
    for bits in (3, 4):
        k = 2**bits
        Wd, wd = W.to(args.device), weights.to(args.device).contiguous()
        fit_codebook(Wd[:8], wd[:8], k)  # warm-up
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        result = fit_codebook(Wd, wd, k)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        ours_s = time.perf_counter() - start
        ours = weighted_error(Wd, wd, result.centroids, result.codes).double().cpu()
        record = {"bits": bits, "rows": args.rows, "cols": args.cols, "device": args.device,
                  "anybit_seconds": ours_s, "anybit_rows_per_s": args.rows / ours_s,
                  "anybit_objective": float(ours.sum())}  # fmt: skip
        if not args.skip_sklearn:
            theirs, sk_s = sklearn_rows(W, weights, k)
            record.update(
                sklearn_seconds=sk_s,
                sklearn_objective=float(theirs.sum()),
                speedup=sk_s / ours_s,
                rows_anybit_not_worse=float((ours <= theirs.double() * (1 + 1e-6)).float().mean()),
                objective_ratio=float(ours.sum() / theirs.sum()),
            )
        log_result("kmeans_engine", record)


if __name__ == "__main__":
    main()
