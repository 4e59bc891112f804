"""Triton kernels (optional `cuda` extra). Importing this package does not import triton."""

from __future__ import annotations

import importlib.util


def triton_available() -> bool:
    """Whether triton can be imported (the kernels' only extra dependency)."""
    return importlib.util.find_spec("triton") is not None
