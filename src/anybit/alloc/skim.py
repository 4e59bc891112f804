"""SKIM's per-row bit allocation: an error table per row and width, then greedy spending of a budget.

The error of row i at width b is the layer-wise error of that row quantized with its own K-means
codebook of 2**b entries: e = δᵢᵀ H δᵢ with δᵢ = wᵢ − ŵᵢ (H ∝ XᵀX). Widening a row costs stored bits:
its codes grow by one bit per weight and its fp16 codebook doubles. The greedy step gives the next
bits to the row whose error falls most per stored bit. Taken over each row's lower convex hull of
(cost, error) points, this greedy is optimal for the convex relaxation, and it is what SKIM's
"largest error reduction first" becomes when steps have different costs.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from anybit.errors import AnybitError
from anybit.format.packing import packed_nbytes
from anybit.memory import Spilled, SpillFile
from anybit.quant.kmeans import fit_codebooks, reconstruct

CODEBOOK_ENTRY_BITS = 16  # fp16 centroids
BITMAP_BITS = 3  # one width (1-8) per row when widths differ
ERROR_TABLE_CHUNK_ELEMENTS = 1 << 22  # weights whose rows `error_table` clusters at once


@dataclass
class ErrorTable:
    widths: list[int]  # candidate widths, ascending
    errors: torch.Tensor  # (rows, len(widths)) layer-wise error of each row at each width
    codes: list[torch.Tensor]  # per width: (rows, cols) uint8 K-means codes; empty where not asked for
    centroids: list[torch.Tensor]  # per width: (rows, 2**b) centroids


def row_cost_bits(cols: int, width: int) -> int:
    """Stored bits of one row at `width`: its codes and its fp16 codebook."""
    return cols * width + CODEBOOK_ENTRY_BITS * (1 << width)


def error_table(
    W: torch.Tensor,
    H: torch.Tensor,
    weights: torch.Tensor | None,
    widths: list[int],
    kept: torch.Tensor | None = None,
    with_codes: bool = True,
) -> ErrorTable:
    """K-means every row at every width (batched over rows) and measure δᵀHδ per row.

    `kept` marks weights stored exactly (sparse outliers): their error is zero. Rows are independent, so
    they are taken ERROR_TABLE_CHUNK_ELEMENTS weights at a time: the K-means state of every width for a large
    matrix (several bytes per weight per width) never exists at once. Without `with_codes` the codes (a byte
    per weight per width) are dropped chunk by chunk: an allocation that needs only errors and codebooks.
    """
    rows, cols = W.shape
    step = max(1, ERROR_TABLE_CHUNK_ELEMENTS // max(1, cols))
    parts = [
        _error_table_rows(
            W[start : start + step],
            H,
            None if weights is None else weights.expand_as(W)[start : start + step],
            widths,
            None if kept is None else kept[start : start + step],
            with_codes,
        )
        for start in range(0, rows, step)
    ]
    return ErrorTable(
        widths,
        torch.cat([p.errors for p in parts]),
        [torch.cat([p.codes[i] for p in parts]) for i in range(len(widths))] if with_codes else [],
        [torch.cat([p.centroids[i] for p in parts]) for i in range(len(widths))],
    )


def _error_table_rows(
    W: torch.Tensor,
    H: torch.Tensor,
    weights: torch.Tensor | None,
    widths: list[int],
    kept: torch.Tensor | None,
    with_codes: bool,
) -> ErrorTable:
    errors, codes, centroids = [], [], []
    fits = fit_codebooks(W, weights, widths)
    for b in widths:
        result = fits.pop(b)
        cents = result.centroids[:, : 1 << b].to(torch.float16).float()  # the stored values
        delta = W - reconstruct(cents, result.codes)
        if kept is not None:
            delta = delta.masked_fill(kept, 0.0)
        errors.append(((delta @ H) * delta).sum(dim=1))
        if with_codes:
            codes.append(result.codes.to(torch.uint8))
        centroids.append(cents)
    return ErrorTable(widths, torch.stack(errors, dim=1), codes, centroids)


def _lower_hulls(costs: torch.Tensor, errors: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's lower convex hull of (cost, error) points from its cheapest point, error decreasing: the
    (rows, widths) indices of the hull points, valid up to each row's (rows,) count. Costs ascend along a row."""
    rows, count = errors.shape
    at = torch.arange(rows)
    hull = torch.zeros(rows, count, dtype=torch.long)
    size = torch.ones(rows, dtype=torch.long)
    for j in range(1, count):
        e_j, c_j = errors[:, j], costs[:, j]
        live = e_j < errors[at, hull[at, size - 1]]  # a wider point no better than the last is never worth it
        while True:
            a, b = hull[at, (size - 2).clamp(min=0)], hull[at, size - 1]
            e_a, e_b, c_a, c_b = errors[at, a], errors[at, b], costs[at, a], costs[at, b]
            # drop b where it lies on or above the segment a -> j
            above = live & (size >= 2) & ((e_b - e_a) * (c_j - c_a) >= (e_j - e_a) * (c_b - c_a))
            if not bool(above.any()):
                break
            size = size - above.long()
        hull[at[live], size[live]] = j
        size = size + live.long()
    return hull, size


def hull_segments(errors: torch.Tensor, costs: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The steps along every row's lower convex hull (float64 `errors`, `costs` as (rows, widths)), row by row in
    hull order: each step's row, the width indices it goes from and to, its cost in bits and its error decrease."""
    rows = errors.shape[0]
    hull, size = _lower_hulls(costs, errors)
    valid = torch.arange(hull.shape[1] - 1)[None, :] < (size - 1)[:, None]  # (rows, widths - 1), row-major
    seg_row = torch.arange(rows)[:, None].expand_as(valid)[valid]
    seg_from, seg_to = hull[:, :-1][valid], hull[:, 1:][valid]
    seg_cost = costs[seg_row, seg_to] - costs[seg_row, seg_from]
    seg_gain = errors[seg_row, seg_from] - errors[seg_row, seg_to]
    return seg_row, seg_from, seg_to, seg_cost, seg_gain


def greedy_allocation(errors: torch.Tensor, costs: torch.Tensor, budget: float) -> torch.Tensor:
    """Index of the width for each row, spending at most `budget` stored bits.

    `errors` and `costs` are (rows, widths) (costs may be a broadcast view); every row starts at width index 0.
    Hull segments are taken in order of error decrease per bit; after the largest affordable prefix, later
    segments that still fit are taken while they are the next step of their row. Vectorized over rows: memory
    and time follow the number of rows of a whole model.
    """
    errors, costs = errors.double(), costs.double().expand_as(errors)
    rows = errors.shape[0]
    spent = float(costs[:, 0].sum())
    if spent > budget:
        raise ValueError(f"budget {budget:.0f} bits is below the cheapest allocation {spent:.0f}")
    choice = torch.zeros(rows, dtype=torch.long)
    seg_row, seg_from, seg_to, seg_cost, seg_gain = hull_segments(errors, costs)
    if not len(seg_row):
        return choice
    order = torch.sort(seg_gain / seg_cost, descending=True, stable=True).indices
    position = torch.empty_like(order)
    position[order] = torch.arange(len(order))
    same_row = seg_row[1:] == seg_row[:-1]  # a row's segments are adjacent, in hull order
    if bool((position[1:] > position[:-1])[same_row].all()):
        # each segment comes after its row's previous one: the affordable prefix is taken whole
        paid = torch.cumsum(torch.cat([torch.tensor([spent], dtype=torch.float64), seg_cost[order]]), 0)
        taken = int((paid[1:] <= budget).sum())  # paid ascends: costs grow with width
        choice.scatter_reduce_(0, seg_row[order[:taken]], seg_to[order[:taken]], "amax")
        spent = float(paid[taken])
        order = order[taken:]
        order = order[spent + seg_cost[order] <= budget]  # the budget left only shrinks
    # the rest one by one: rounding made a row's later segment rank first, or the tail after the prefix
    rest = seg_row[order]
    now = dict(zip(rest.tolist(), choice[rest].tolist(), strict=True))
    for r, a, b, c in zip(*(t[order].tolist() for t in (seg_row, seg_from, seg_to, seg_cost)), strict=True):
        if now[r] == a and spent + c <= budget:
            now[r] = b
            spent += c
    if now:
        choice[torch.tensor(list(now))] = torch.tensor(list(now.values()))
    return choice


def allocation_budget(rows: int, cols: int, target_bits: float) -> float:
    """Bits available for codes and codebooks when the whole matrix may average `target_bits`."""
    bitmap_bits = packed_nbytes(rows, BITMAP_BITS) * 8
    return target_bits * rows * cols - bitmap_bits


def chosen_codebooks(choice: torch.Tensor, widths: list[int], centroids: list[torch.Tensor]) -> torch.Tensor:
    """(rows, 2**max chosen width) float32: each row's codebook at the width index `choice` picks from
    `centroids` (one (rows, 2**b) tensor per width); unused slots 0."""
    device = centroids[0].device
    choice = choice.to(device)
    top = int(torch.tensor(widths)[choice.cpu()].max())
    books = torch.zeros(choice.shape[0], 1 << top, device=device)
    for i, b in enumerate(widths):
        picked = choice == i
        if bool(picked.any()):
            books[picked, : 1 << b] = centroids[i][picked].float()
    return books


@dataclass
class RowTable:
    """What one matrix contributes to a model-wide allocation."""

    errors: torch.Tensor  # (rows, len(widths)) error of each row at each width, comparable across the model
    costs: torch.Tensor  # (rows, len(widths)) stored bits of each row at each width (may be a broadcast view)
    widths: list[int]
    fixed_bits: float  # bits the matrix stores whatever the widths (bit map, scaling vector)
    weights: int  # number of weights of the matrix
    centroids: list[torch.Tensor] | list[Spilled] | None = None  # per width, the (rows, 2**b) fp16 codebooks the
    # errors were measured with (codebook recipes; None for grids, whose parameters are fitted again at the
    # planned width), in memory or in a spill file

    def spilled(self, spill: SpillFile) -> RowTable:
        """This table with its codebooks moved to `spill`: what a model-wide pass keeps of each matrix."""
        if self.centroids is None:
            return self
        return dataclasses.replace(self, centroids=[spill.put(c) for c in self.centroids])


@dataclass
class RowPlan:
    """A matrix's share of the model-wide allocation: each row's width and, for codebook recipes, the codebook
    its error was measured with (rows, 2**max width; fp16 values, unused slots 0), in memory or spilled."""

    widths: torch.Tensor
    books: torch.Tensor | Spilled | None = None

    def codebooks(self) -> torch.Tensor | None:
        """The planned codebooks as float32, read back where they were spilled."""
        return None if self.books is None else _loaded(self.books).float()


def _loaded(tensor: torch.Tensor | Spilled) -> torch.Tensor:
    return tensor.load() if isinstance(tensor, Spilled) else tensor


def allocate_model(
    tables: dict[str, RowTable], target_bits: float, spill: SpillFile | None = None
) -> dict[str, RowPlan]:
    """Per-row widths (and codebooks) for every matrix, spending one budget of `target_bits` per weight over
    all of them. A "row" is whatever unit a table lists: a matrix's rows, or the whole matrix as one unit.
    With `spill`, each matrix's planned codebooks go there as they are chosen (its tables' codebooks are read
    back one matrix at a time where they were spilled)."""
    keys = list(tables)
    weights = sum(tables[k].weights for k in keys)
    budget = target_bits * weights - sum(tables[k].fixed_bits for k in keys)
    errors = torch.cat([tables[k].errors.double() for k in keys])
    costs = torch.cat([tables[k].costs.double() for k in keys])
    try:
        choice = greedy_allocation(errors, costs, budget)
    except ValueError:
        minimum = (float(costs[:, 0].sum()) + sum(tables[k].fixed_bits for k in keys)) / weights
        raise AnybitError(f"{target_bits:g} bits per weight is below the model's minimum of {minimum:.3f}") from None
    del errors, costs
    plan, start = {}, 0
    for k in keys:
        table = tables[k]
        rows = table.errors.shape[0]
        mine = choice[start : start + rows]
        books = None
        if table.centroids is not None:
            books = chosen_codebooks(mine, table.widths, [_loaded(c) for c in table.centroids]).half()
            books = books if spill is None else spill.put(books)
        plan[k] = RowPlan(torch.tensor(table.widths, dtype=torch.uint8)[mine], books)
        start += rows
    return plan
