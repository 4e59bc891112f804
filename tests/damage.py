"""Damaged copies of quantized directories, for the tests that must see them refused."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file


def damaged_copy(src: Path, dst: Path, edit: Callable[[dict[str, torch.Tensor]], object]) -> Path:
    """A copy of the quantized directory `src` at `dst` whose model.safetensors went through `edit` (in place)."""
    shutil.copytree(src, dst)
    weights = dst / "model.safetensors"
    with safe_open(weights, framework="pt") as f:
        metadata = f.metadata()
    tensors = load_file(weights)
    edit(tensors)
    save_file(tensors, weights, metadata=metadata)
    return dst
