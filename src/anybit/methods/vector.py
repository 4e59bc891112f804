"""Vector codebooks (`--method vq`): pieces of 4 weights (2 above 3.25 bits per weight) coded as a per-row scale
times one entry of a fixed table, rounded with error feedback (GPTVQ), widths per linear from one model-wide
budget."""

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

PIECE = 4  # weights per table entry up to 3.25 bits per weight; 2 above (`format.vector_tables.INDEX_BITS`)
TABLE_ROWS = 256  # rows of a matrix its error-table estimate codes (evenly spaced)


class VectorCodebooks(Method):
    """Each linear's input rotated (`--rotate`, on by default here), its rows cut into pieces of d consecutive
    weights in act-order, and each piece coded as s_r · c: a per-row fp16 scale s_r and one entry c of the
    format's fixed table of 2**k d-dimensional entries (K-means on Gaussian samples: a rotated row divided by
    its scale is close to Gaussian). Pieces are rounded in order with GPTQ's error feedback over blocks of d
    columns (GPTVQ), then each row's scale is refitted in closed form under XᵀX, codes fixed.

    Each linear's width, 1 to 5.5 bits per weight, is one table: d = 4 and k = 4-13 up to 3.25 bits per weight,
    d = 2 and k = 7-11 above (`layout_of`). The width is chosen per linear from one model-wide budget in counted
    bits: the first pass estimates each linear's Fisher-weighted layer-wise error at every width by rounding a
    sample of its rows to the nearest entries (no error feedback: an estimate that ranks the linears, not
    the error the second pass reaches), and the greedy allocation spends the budget where that error falls
    most per counted bit.
    """

    name = "vq"
    options = (DAMP, ACT_ORDER, ROTATE)
    integer_bits = False
    bit_range = (1, 5.5)
    default_bits = 2.5
    default_scope = "model"
    default_act_order = True
    default_rotate = True

    def needs_fisher(self, config: QuantConfig) -> bool:
        return True

    def quantize(self, W: torch.Tensor, stats: LayerStats | None, config: QuantConfig) -> VectorTensor:
        if stats.plan is None:
            raise ValueError("vq quantizes at the index widths of a model-wide plan")
        dim, index_bits = layout_of(int(stats.plan.widths[0]))
        table = vector_table(dim, index_bits).float().to(W.device)
        H = stats.hessian.hessian()
        scales = _initial_scales(W)
        codes, chosen, perm = vector_gptq(W, H, table, scales, config.damp, config.act_order)
        Wp, Hp = (W, H) if perm is None else (W[:, perm], H[perm[:, None], perm[None, :]])
        scales = refit_row_scales(Wp, chosen, Hp, scales)
        return VectorTensor.from_codes(codes, scales, tuple(W.shape), dim, index_bits, perm)

    def shape_problem(self, shape: tuple[int, int]) -> str:
        return "" if shape[1] % PIECE == 0 else f"its {shape[1]} inputs do not cut into pieces of {PIECE}"

    def cheapest_bits(self, shape: tuple[int, int], config: QuantConfig) -> float:
        return float(stored_bits(shape, min(WIDTHS), config))

    def row_table(self, W: torch.Tensor, stats: LayerStats | None, config: QuantConfig) -> RowTable:
        """The whole linear as one unit: its estimated Fisher-weighted layer-wise error and its counted bits at
        each index width (see the class doc)."""
        H = stats.hessian.hessian()
        rows = torch.linspace(0, W.shape[0] - 1, min(TABLE_ROWS, W.shape[0])).round().long().unique()
        importance = row_importance(stats, H, W.shape[0])[rows]
        order = act_order_perm(H) if config.act_order else torch.arange(W.shape[1])
        sample, Hp = W[rows][:, order].float(), H[order[:, None], order[None, :]].float()
        scales = _initial_scales(sample)
        normalized = sample / scales[:, None]
        errors, costs = [], []
        for width in WIDTHS:
            dim, index_bits = layout_of(width)
            table = vector_table(dim, index_bits).float()
            pieces = normalized.reshape(-1, dim)
            nearest = table[nearest_entries(pieces, None, table)]
            delta = sample - scales[:, None] * nearest.view_as(sample)
            error = ((delta @ Hp) * delta).sum(dim=1).double().cpu() * importance
            errors.append(float(error.sum()) * W.shape[0] / len(rows))
            costs.append(float(stored_bits(tuple(W.shape), width, config)))
        table = torch.tensor([errors], dtype=torch.float64), torch.tensor([costs], dtype=torch.float64)
        return RowTable(*table, widths=list(WIDTHS), fixed_bits=0, weights=W.numel())


# A plan's width is counted in bits per PIECE weights: 4-D k-bit indices are width k, 2-D ones width 2k.
_LAYOUTS = {k * PIECE // dim: (dim, k) for dim, ks in INDEX_BITS.items() for k in ks}
WIDTHS = tuple(sorted(_LAYOUTS))


def layout_of(width: int) -> tuple[int, int]:
    """The (piece dimension, index bits) of a plan width counted in bits per 4 weights."""
    return _LAYOUTS[width]


def _initial_scales(W: torch.Tensor) -> torch.Tensor:
    """Each row's root mean square, rounded to fp16: the scale the table's unit-variance entries start from."""
    return W.square().mean(dim=1).sqrt().clamp_min(1e-8).half().float()


def stored_bits(shape: tuple[int, int], width: int, config: QuantConfig) -> int:
    """Counted bits of a (rows, columns) linear coded at plan width `width` (`layout_of`) with `config`'s
    permutation and rotation: what `VectorTensor.storage_bits` gives for it."""
    rows, columns = shape
    dim, index_bits = layout_of(width)
    bits = 8 * packed_nbytes(rows * columns // dim, index_bits) + 16 * rows
    if config.act_order:
        bits += columns * torch.iinfo(index_dtype(columns)).bits
    if config.rotate:
        bits += rotation_bits(columns)
    return bits
