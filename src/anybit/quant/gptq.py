"""GPTQ: Hessian accumulation and the error-feedback solver over any column quantizer.

The solver follows Frantar et al. (2023): H = 2 XᵀX / n, dead inputs zeroed, optional act-order
(descending diag H), dampening by a fraction of mean(diag H), upper Cholesky factor of H⁻¹, and lazy
block updates. It does not know how a column is rounded: a `ColumnQuantizer` does that, so uniform
grids, K-means codebooks and mixed bit maps all share this one loop.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import torch

if TYPE_CHECKING:
    from anybit.format.rotation import InputRotation


class HessianAccumulator:
    """Running XᵀX (float32) and token count of the inputs of one linear layer.

    With `diagonal_only`, only diag(XᵀX) is kept (what activation-weighted K-means needs): O(d)
    memory and time per token instead of O(d²). With `sample_stride` s > 0, every s-th input token
    is also kept (float32), for methods that measure layer outputs (SliM-LLM's allocation search).

    XᵀX is symmetric, so batches only add its upper triangle, in a few row blocks (about 5/8 of the full
    product's work); `hessian()` mirrors it once.
    """

    def __init__(
        self,
        in_features: int,
        device: torch.device | str = "cpu",
        diagonal_only: bool = False,
        sample_stride: int = 0,
    ) -> None:
        shape = (in_features,) if diagonal_only else (in_features, in_features)
        self.diagonal_only = diagonal_only
        self.XtX = torch.zeros(shape, dtype=torch.float32, device=device)
        self.tokens = 0
        self.sample_stride = sample_stride
        self._samples: list[torch.Tensor] = []
        self._raw_diagonal: torch.Tensor | None = None  # diag(XᵀX), kept once XtX holds H
        self._rotated = False  # XtX is full and symmetric (rotate_)

    def add_batch(self, x: torch.Tensor) -> None:
        if self._raw_diagonal is not None or self._rotated:
            raise ValueError("the Hessian was already taken from this accumulator, or rotated")
        x = x.reshape(-1, x.shape[-1]).to(device=self.XtX.device, dtype=torch.float32)
        if self.diagonal_only:
            self.XtX.add_(x.square().sum(dim=0))
        else:
            self._add_upper(x)
        if self.sample_stride:
            self._samples.append(x[:: self.sample_stride].clone())
        self.tokens += x.shape[0]

    def _add_upper(self, x: torch.Tensor) -> None:
        """XtX's blocks on and above the diagonal += their part of xᵀx (diagonal blocks in full)."""
        for start, stop in _row_blocks(x.shape[1]):
            self.XtX[start:stop, start:].addmm_(x[:, start:stop].t(), x[:, start:])

    def _mirror_upper(self) -> None:
        """Fill the blocks below the diagonal from those above it."""
        for start, stop in _row_blocks(self.XtX.shape[0]):
            self.XtX[stop:, start:stop].copy_(self.XtX[start:stop, stop:].t())

    def rotate_(self, rotation: InputRotation) -> None:
        """Make the statistics those of the inputs R x (XᵀX becomes R XᵀX Rᵀ), before the Hessian is taken."""
        if self.diagonal_only or self._raw_diagonal is not None or self._samples:
            raise ValueError("only a full XᵀX not yet taken as the Hessian, without kept tokens, can be rotated")
        self._mirror_upper()
        once = rotation.apply(self.XtX)  # each row r becomes R r: XᵀX Rᵀ (XᵀX is symmetric)
        self.XtX.copy_(rotation.apply(once.t()))  # R (XᵀX Rᵀ), transposed: symmetric up to rounding
        del once
        self.XtX.add_(self.XtX.t().clone()).mul_(0.5)  # exactly symmetric again
        self._rotated = True

    def input_sample(self) -> torch.Tensor:
        """The kept input tokens (tokens, in_features)."""
        if not self._samples:
            raise ValueError("this accumulator kept no input tokens (sample_stride = 0)")
        return torch.cat(self._samples)

    def diagonal(self) -> torch.Tensor:
        """diag(XᵀX): the summed squared activation of each input channel."""
        if self.diagonal_only:
            return self.XtX
        return torch.diagonal(self.XtX).clone() if self._raw_diagonal is None else self._raw_diagonal

    def hessian(self) -> torch.Tensor:
        """H = 2 XᵀX / n, the Hessian of the layer-wise squared error (read-only: shared by every caller).

        The first call turns the accumulator's XᵀX into H in place: no second d×d matrix (485 MB for an
        11008-wide input) and no more batches."""
        if self.tokens == 0:
            raise ValueError("no calibration tokens were seen by this layer")
        if self.diagonal_only:
            raise ValueError("this accumulator kept only the diagonal of XᵀX")
        if self._raw_diagonal is None:
            if not self._rotated:
                self._mirror_upper()
            self._raw_diagonal = torch.diagonal(self.XtX).clone()
            self.XtX.mul_(2.0 / self.tokens)
        return self.XtX


def _row_blocks(d: int) -> list[tuple[int, int]]:
    """(start, stop) of the row blocks of the upper-triangular XᵀX update: about a quarter of d each, in
    multiples of 64."""
    step = max(64, -(-d // 256) * 64)
    return [(start, min(start + step, d)) for start in range(0, d, step)]


class ColumnQuantizer(Protocol):
    """Rounds the columns of a weight matrix, one group of columns sharing parameters at a time."""

    group_size: int

    def fit(self, W_group: torch.Tensor, group: int) -> None:
        """Choose the parameters of group `group` from its current (error-updated) columns."""

    def quantize(self, w: torch.Tensor, column: int) -> torch.Tensor:
        """Round column `column` (rows,) with its group's parameters, record its codes, return the values."""


@dataclass
class GPTQResult:
    Q: torch.Tensor  # dequantized weight in coded column order
    perm: torch.Tensor | None  # coded order of input columns (act-order), None when natural
    loss: float  # sum over rows of (w - q)² / [H⁻¹]ⱼⱼ² / 2, the GPTQ proxy loss


def act_order_perm(H: torch.Tensor) -> torch.Tensor:
    """Columns by descending diag(H) (dead inputs count as 1, as `prepare_hessian` sets them)."""
    diag = torch.diag(H).clone()
    diag[diag == 0] = 1
    return torch.argsort(diag, descending=True)


def prepare_hessian(
    W: torch.Tensor, H: torch.Tensor, damp: float, act_order: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Fix dead inputs, optionally reorder by act-order, and return (W, upper Cholesky of H⁻¹, perm)."""
    perm = act_order_perm(H) if act_order else None
    if perm is None:
        W, H = W.clone().float(), H.clone().float()
    else:  # one gather each: new matrices (XᵀX untouched), not a copy and then two permuted ones
        W, H = W.float()[:, perm], H.float()[perm[:, None], perm[None, :]]
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    diag = torch.arange(H.shape[0], device=H.device)
    H[diag, diag] += damp * torch.mean(torch.diag(H))
    return W, upper_cholesky_of_inverse(H), perm


def upper_cholesky_of_inverse(H: torch.Tensor) -> torch.Tensor:
    """Upper Cholesky factor of H⁻¹ for a symmetric positive definite H, overwriting H on the CPU."""
    if H.device.type != "cpu":  # the in-place form below is only checked on the CPU
        return torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    # LAPACK works on column-major matrices: handed a C-ordered one, torch copies it for each call
    # (three d×d temporaries, 485 MB each for a 7B down_proj). H is symmetric, so its transpose view
    # is the same matrix in column-major order, and all three steps run in it with no copy (same values).
    A = H.mT
    torch.linalg.cholesky(A, out=A)
    torch.cholesky_inverse(A, out=A)
    torch.linalg.cholesky(A, upper=True, out=A)
    return A


def gptq_quantize(
    W: torch.Tensor,
    H: torch.Tensor,
    quantizer: ColumnQuantizer,
    damp: float = 0.01,
    act_order: bool = False,
    blocksize: int = 128,
) -> GPTQResult:
    """Quantize W (rows, columns) column by column with error feedback through H⁻¹."""
    W, Hinv, perm = prepare_hessian(W, H, damp, act_order)
    columns = W.shape[1]
    gs = quantizer.group_size
    # Blocks are whole groups, so each group's parameters are fitted on fully updated columns.
    blocksize = max(1, blocksize // gs) * gs if gs <= blocksize else gs
    Q = torch.zeros_like(W)
    loss = torch.zeros((), dtype=torch.float64, device=W.device)
    for i1 in range(0, columns, blocksize):
        i2 = min(i1 + blocksize, columns)
        W1 = W[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if col % gs == 0:
                quantizer.fit(W1[:, i : i + gs], col // gs)
            w = W1[:, i]
            d = Hinv1[i, i]
            q = quantizer.quantize(w, col)
            Q[:, col] = q
            err = (w - q) / d
            W1[:, i:] -= err.unsqueeze(1) @ Hinv1[i, i:].unsqueeze(0)
            Err1[:, i] = err
        loss += Err1.double().square().sum() / 2
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    return GPTQResult(Q=Q, perm=perm, loss=float(loss))
