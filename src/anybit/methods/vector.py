"""Vector codebooks (`--method vq`): pieces of 4 weights coded as a per-row scale times one entry of a fixed
table, rounded with error feedback (GPTVQ), index widths per linear from one model-wide budget."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from anybit.alloc.skim import RowTable
from anybit.format.packing import packed_nbytes
from anybit.format.qtensor import index_dtype
from anybit.format.rotation import rotation_bits
from anybit.format.vector import VectorTensor
from anybit.format.vector_tables import INDEX_BITS, vector_table
from anybit.methods.base import ACT_ORDER, DAMP, ROTATE, LayerStats, Method, row_importance
from anybit.quant.gptq import act_order_perm
from anybit.quant.vector_codebooks import nearest_entries, refit_row_scales, vector_gptq

if TYPE_CHECKING:
    from anybit.config import QuantConfig

PIECE = 4  # weights per table entry
TABLE_ROWS = 256  # rows of a matrix its error-table estimate codes (evenly spaced)


class VectorCodebooks(Method):
    """Each linear's input rotated (`--rotate`, on by default here), its rows cut into pieces of 4 consecutive
    weights in act-order, and each piece coded as s_r · c: a per-row fp16 scale s_r and one entry c of the
    format's fixed table of 2**k 4-dimensional entries (K-means on Gaussian samples: a rotated row divided by
    its scale is close to Gaussian). Pieces are rounded in order with GPTQ's error feedback over blocks of 4
    columns (GPTVQ), then each row's scale is refitted in closed form under XᵀX, codes fixed.

    The index width k (k/4 bits per weight) is chosen per linear from one model-wide budget in counted bits:
    the first pass estimates each linear's Fisher-weighted layer-wise error at every width by rounding a
    sample of its rows to the nearest entries (no error feedback: an estimate that ranks the linears, not
    the error the second pass reaches), and the greedy allocation spends the budget where that error falls
    most per counted bit.
    """

    name = "vq"
    options = (DAMP, ACT_ORDER, ROTATE)
    integer_bits = False
    bit_range = (1, 3.25)
    default_bits = 2.5
    default_scope = "model"
    default_act_order = True
    default_rotate = True

    def needs_fisher(self, config: QuantConfig) -> bool:
        return True

    def quantize(self, W: torch.Tensor, stats: LayerStats | None, config: QuantConfig) -> VectorTensor:
        if stats.plan is None:
            raise ValueError("vq quantizes at the index widths of a model-wide plan")
        index_bits = int(stats.plan.widths[0])
        table = vector_table(PIECE, index_bits).float().to(W.device)
        H = stats.hessian.hessian()
        scales = _initial_scales(W)
        codes, chosen, perm = vector_gptq(W, H, table, scales, config.damp, config.act_order)
        Wp, Hp = (W, H) if perm is None else (W[:, perm], H[perm[:, None], perm[None, :]])
        scales = refit_row_scales(Wp, chosen, Hp, scales)
        return VectorTensor.from_codes(codes, scales, tuple(W.shape), PIECE, index_bits, perm)

    def shape_problem(self, shape: tuple[int, int]) -> str:
        return "" if shape[1] % PIECE == 0 else f"its {shape[1]} inputs do not cut into pieces of {PIECE}"

    def cheapest_bits(self, shape: tuple[int, int], config: QuantConfig) -> float:
        return float(stored_bits(shape, min(INDEX_BITS), config))

    def row_table(self, W: torch.Tensor, stats: LayerStats | None, config: QuantConfig) -> RowTable:
        """The whole linear as one unit: its estimated Fisher-weighted layer-wise error and its counted bits at
        each index width (see the class doc)."""
        H = stats.hessian.hessian()
        rows = torch.linspace(0, W.shape[0] - 1, min(TABLE_ROWS, W.shape[0])).round().long().unique()
        importance = row_importance(stats, H, W.shape[0])[rows]
        order = act_order_perm(H) if config.act_order else torch.arange(W.shape[1])
        sample, Hp = W[rows][:, order].float(), H[order[:, None], order[None, :]].float()
        scales = _initial_scales(sample)
        pieces = (sample / scales[:, None]).reshape(-1, PIECE)
        errors, costs = [], []
        for index_bits in INDEX_BITS:
            table = vector_table(PIECE, index_bits).float()
            nearest = table[nearest_entries(pieces, torch.ones_like(pieces), table)]
            delta = sample - scales[:, None] * nearest.view_as(sample)
            error = ((delta @ Hp) * delta).sum(dim=1).double().cpu() * importance
            errors.append(float(error.sum()) * W.shape[0] / len(rows))
            costs.append(float(stored_bits(tuple(W.shape), index_bits, config)))
        table = torch.tensor([errors], dtype=torch.float64), torch.tensor([costs], dtype=torch.float64)
        return RowTable(*table, widths=list(INDEX_BITS), fixed_bits=0, weights=W.numel())


def _initial_scales(W: torch.Tensor) -> torch.Tensor:
    """Each row's root mean square, rounded to fp16: the scale the table's unit-variance entries start from."""
    return W.square().mean(dim=1).sqrt().clamp_min(1e-8).half().float()


def stored_bits(shape: tuple[int, int], index_bits: int, config: QuantConfig) -> int:
    """Counted bits of a (rows, columns) linear coded at `index_bits` with `config`'s permutation and rotation:
    what `VectorTensor.storage_bits` gives for it."""
    rows, columns = shape
    bits = 8 * packed_nbytes(rows * columns // PIECE, index_bits) + 16 * rows
    if config.act_order:
        bits += columns * torch.iinfo(index_dtype(columns)).bits
    if config.rotate:
        bits += rotation_bits(columns)
    return bits
