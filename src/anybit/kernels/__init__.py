"""Triton kernels (optional `cuda` extra). Importing this package does not import triton."""

from __future__ import annotations

import importlib.util

MAX_BATCH = 8  # rows of x the fused decode kernel takes; longer inputs go through the prefill path


def triton_available() -> bool:
    """Whether triton can be imported (the kernels' only extra dependency)."""
    return importlib.util.find_spec("triton") is not None
