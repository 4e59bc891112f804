"""Kernels: Triton for CUDA (optional `cuda` extra) and C for the CPU (`cpu`), with the helpers they share.
Importing this package does not import triton."""

from __future__ import annotations

import dataclasses
import importlib.util
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from anybit.format.qtensor import QuantizedTensor

MAX_BATCH = 8  # rows of x the fused decode kernels take; longer inputs go through the prefill path


def triton_available() -> bool:
    """Whether triton can be imported (the kernels' only extra dependency)."""
    return importlib.util.find_spec("triton") is not None


def cpu_unavailable(qt: QuantizedTensor, library: object, multiple: int) -> str:
    """Why a CPU kernel whose segments are `multiple` columns cannot serve `qt` ("" when it can); `library` is
    the loaded kernel, or why there is none."""
    if qt.axis != 0:
        return "per-column (axis 1) layouts have no CPU kernel"
    if qt.group_size % multiple or qt.shape[1] % multiple:
        return f"group size {qt.group_size} or row length {qt.shape[1]} is not a multiple of {multiple}"
    return cpu_placement_unavailable(qt.bitmap, library)


def cpu_placement_unavailable(stored: torch.Tensor, library: object) -> str:
    """Why a CPU kernel cannot serve a tensor whose layout it takes ("" when it can): `stored`, one of its
    tensors, is not in CPU memory, or `library` (the loaded kernel, or why there is none) is a reason."""
    if stored.device.type != "cpu":
        return "the tensor is not in CPU memory"
    return library if isinstance(library, str) else ""


def check_cpu_input(x: torch.Tensor, cols: int, max_rows: int | None = None) -> None:
    """Raise ValueError unless x is a CPU matrix of `cols` columns (and at most `max_rows` rows)."""
    if x.dim() != 2 or x.shape[1] != cols or x.device.type != "cpu" or (max_rows and x.shape[0] > max_rows):
        rows = f"at most {max_rows}" if max_rows else "tokens"
        raise ValueError(f"x must be a CPU tensor ({rows}, {cols}), got {tuple(x.shape)} on {x.device}")


def coded_input(x: torch.Tensor, perm: torch.Tensor | None, col_scale: torch.Tensor | None) -> torch.Tensor:
    """x in the coded column order, divided by the scaling vector: what the coded matrix multiplies."""
    xs = x
    if col_scale is not None:  # in original column order, before the coded order is applied
        xs = xs.float() / col_scale.float()[None, :]
    if perm is not None:
        xs = xs[:, perm.to(torch.int64)]
    return xs.contiguous()


def outlier_corrections(qt: QuantizedTensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """Rows, columns and (stored − decoded) value of each sparse outlier, None without outliers: a kernel
    that multiplies by the codes alone adds deltas · x[:, cols] into y[:, rows]."""
    if qt.outliers is None:
        return None
    rows, cols = qt.outliers.coordinates()
    decoded = dataclasses.replace(qt, outliers=None).dequantize(torch.float32)  # once, at preparation
    return rows, cols, qt.outliers.values.float() - decoded[rows, cols]
