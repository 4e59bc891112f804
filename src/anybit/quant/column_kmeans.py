"""CLAQ's column quantizer for the GPTQ loop: one K-means codebook per input column.

Each column is clustered when GPTQ reaches it, i.e. after the error feedback of every earlier
column has been applied; its codebook is final from then on. Columns cannot be clustered in
batches: inside a lazy block every column still receives the updates of the columns before it, so
column j's values are only known once column j − 1 is quantized.

Outlier reservation keeps both tails of a column (the ⌈p·n⌉ largest and smallest values, p per
column) at their current value in fp16; their quantization error, and thus their feedback, is zero.
"""

from __future__ import annotations

import torch

from anybit.format.qtensor import QuantizedTensor, SparseOutliers
from anybit.quant.kmeans import assign, fit_codebook, reconstruct


class ColumnKMeansQuantizer:
    """Per-column K-means with per-column widths and reserve ratios (coded column order)."""

    group_size = 1

    def __init__(self, rows: int, bits: torch.Tensor, reserve: torch.Tensor | None = None) -> None:
        columns = bits.numel()
        self.bits = bits.to(torch.int64)
        self.reserve = reserve
        k_max = 1 << int(self.bits.max())
        device = bits.device
        self.codes = torch.zeros(columns, rows, dtype=torch.uint8, device=device)
        self.codebooks = torch.zeros(columns, k_max, dtype=torch.float32, device=device)
        self.kept = torch.zeros(columns, rows, dtype=torch.bool, device=device)
        self.kept_values = torch.zeros(columns, rows, dtype=torch.float32, device=device)

    def fit(self, W_group: torch.Tensor, group: int) -> None:
        k = 1 << int(self.bits[group])
        result = fit_codebook(W_group.t(), None, k=k)
        centroids = result.centroids[0, :k].to(torch.float16).float()  # what is stored is what is used
        self.codebooks[group, :k] = centroids
        self._centroids = centroids[None, :]

    def quantize(self, w: torch.Tensor, column: int) -> torch.Tensor:
        codes = assign(w[None, :], self._centroids)
        q = reconstruct(self._centroids, codes)[0]
        self.codes[column] = codes[0].to(torch.uint8)
        if self.reserve is not None and float(self.reserve[column]) > 0:
            n = w.numel()
            tail = max(1, round(float(self.reserve[column]) * n))
            order = torch.argsort(w)
            keep = torch.zeros(n, dtype=torch.bool, device=w.device)
            keep[order[:tail]] = True
            keep[order[-tail:]] = True
            kept = w.to(torch.float16).float()
            q = torch.where(keep, kept, q)
            self.kept[column] = keep
            self.kept_values[column] = torch.where(keep, kept, 0.0)
        return q

    def to_qtensor(self, shape: tuple[int, int], perm: torch.Tensor | None = None) -> QuantizedTensor:
        rows, columns = shape
        outliers = None
        if bool(self.kept.any()):
            # reserved weights live in dense (row, input column) coordinates
            mask = torch.zeros(rows, columns, dtype=torch.bool, device=self.kept.device)
            values = torch.zeros(rows, columns, dtype=torch.float32, device=self.kept.device)
            dense_cols = perm if perm is not None else torch.arange(columns, device=self.kept.device)
            mask[:, dense_cols] = self.kept.t()
            values[:, dense_cols] = self.kept_values.t()
            outliers = SparseOutliers.from_mask(values, mask)
        return QuantizedTensor.from_codebook(
            self.codes, self.codebooks[:, None, :], self.bits[:, None], shape, rows, axis=1, perm=perm,
            outliers=outliers,
        )  # fmt: skip
