"""Per-row codebooks under the layer-wise objective: GPTQ's error-feedback rounding onto fixed codebooks,
and the least-squares update of the codebooks with the codes held fixed (the two steps GPTVQ alternates)."""

from __future__ import annotations

import torch

from anybit.quant.gptq import act_order_perm, gptq_quantize
from anybit.quant.kmeans import assign, midpoints, reconstruct

REFIT_CHUNK_ELEMENTS = 1 << 24  # one-hot entries (rows × cols × entries) built at once by `refit_codebooks`
REFIT_DAMP = 1e-6  # ridge toward the old entries, as a fraction of mean(diag H): keeps empty entries as they were


class RowCodebookQuantizer:
    """GPTQ column quantizer that rounds every weight to the nearest entry of its row's fixed codebook
    (sorted, +inf padded); weights marked as outliers keep their (error-updated) value in fp16, so
    their feedback is zero."""

    group_size = 1

    def __init__(self, books: torch.Tensor, kept: torch.Tensor | None) -> None:
        self.books = books
        self.mid = midpoints(books)
        self.kept = kept
        self.columns: list[torch.Tensor] = []

    def fit(self, W_group: torch.Tensor, group: int) -> None:
        pass  # the codebooks are fixed before the GPTQ pass

    def quantize(self, w: torch.Tensor, column: int) -> torch.Tensor:
        codes = assign(w[:, None], self.books, self.mid)
        self.columns.append(codes[:, 0].to(torch.uint8))  # widths <= 8: an eighth of int64's memory
        q = reconstruct(self.books, codes)[:, 0]
        if self.kept is not None:
            q = torch.where(self.kept[:, column], w.half().float(), q)
        return q


def feedback_codes(
    W: torch.Tensor, H: torch.Tensor, widths: torch.Tensor, books: torch.Tensor, kept: torch.Tensor | None,
    damp: float, act_order: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """Codes (rows, cols; uint8) from GPTQ's column-by-column rounding onto the rows' codebooks (in act-order:
    columns by descending diag H), and the codebooks (sorted, as the rounding needs them)."""
    sorted_books = sorted_codebooks(books, widths)
    valid = torch.isfinite(sorted_books)
    perm = act_order_perm(H) if act_order else None  # the order the solver will visit the columns in
    quantizer = RowCodebookQuantizer(sorted_books, kept if kept is None or perm is None else kept[:, perm])
    gptq_quantize(W, H, quantizer, damp=damp, act_order=act_order)
    codes = torch.stack(quantizer.columns, dim=1)
    quantizer.columns.clear()
    if perm is not None:
        codes = codes[:, torch.argsort(perm)]
    return codes, torch.where(valid, sorted_books, torch.zeros_like(books))


def sorted_codebooks(books: torch.Tensor, widths: torch.Tensor) -> torch.Tensor:
    """Each row's 2**width entries sorted ascending, the unused slots +inf (what `assign` needs)."""
    entries = torch.arange(books.shape[1], device=books.device)[None, :]
    valid = entries < (1 << widths.to(torch.long))[:, None]
    return torch.where(valid, books, torch.full_like(books, float("inf"))).sort(dim=1).values


def stored_books(centroids: torch.Tensor) -> torch.Tensor:
    """Centroids as they are stored (fp16 values; unused +inf slots as 0), in float32."""
    return torch.nan_to_num(centroids, posinf=0.0).to(torch.float16).float()


def refit_codebooks(
    W: torch.Tensor, H: torch.Tensor, codes: torch.Tensor, books: torch.Tensor, widths: torch.Tensor,
    kept: torch.Tensor | None = None, damp: float = 0.0,
) -> torch.Tensor:  # fmt: skip
    """Each row's codebook entries that minimise the layer-wise error tr((W − Ŵ) H (W − Ŵ)ᵀ) with the
    codes held fixed, rounded to fp16 as stored. `damp` adds damp · mean(diag H) to H's diagonal, as GPTQ
    does: where the calibration inputs span fewer directions than H has columns, the undamped solution
    fits them with entries far from the weights.

    Row i's reconstruction is Pᵢcᵢ (Pᵢ: the one-hot code matrix, zero where a weight is `kept` in fp16 and
    so reproduced exactly), so its entries solve the normal equations PᵢᵀHPᵢ cᵢ = PᵢᵀH(wᵢ on the coded
    positions). A tiny ridge toward the old entries keeps an entry that no weight uses unchanged.
    Entries past a row's 2**width stay as they are.
    """
    W, H = W.float(), H.float()
    if damp:
        H = H.clone()  # one d×d copy, not an identity and a sum (485 MB each for a 7B down_proj)
        H.diagonal().add_(damp * torch.diagonal(H).mean())
    coded = torch.ones_like(W, dtype=torch.bool) if kept is None else ~kept
    target = torch.where(coded, W, torch.zeros_like(W)) @ H  # (rows, cols): H(wᵢ on the coded positions)
    ridge = REFIT_DAMP * float(torch.diagonal(H).mean().clamp(min=1e-30))
    out = books.float().clone()
    for width in torch.unique(widths).tolist():
        rows = torch.nonzero(widths == width).flatten()
        k = 1 << int(width)
        for part in torch.split(rows, max(1, REFIT_CHUNK_ELEMENTS // (W.shape[1] * k))):
            onehot = torch.nn.functional.one_hot(codes[part].long(), k).float() * coded[part, :, None]
            r, cols = onehot.shape[:2]
            # H·P for all rows of the chunk as one (cols, cols) @ (cols, r·k) product, not r skinny ones
            HP = (H @ onehot.transpose(0, 1).reshape(cols, r * k)).reshape(cols, r, k).transpose(0, 1)
            gram = onehot.transpose(1, 2) @ HP  # (r, k, k) = PᵀHP
            rhs = (onehot.transpose(1, 2) @ target[part, :, None])[..., 0]  # (r, k) = PᵀH w
            old = out[part, :k]
            gram += ridge * torch.eye(k, device=W.device)
            out[part, :k] = torch.linalg.solve(gram, rhs + ridge * old)
    return out.to(torch.float16).float()
