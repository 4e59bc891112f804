"""Where anybit keeps what it fetches or builds once: the reference model, compiled kernels, default runs."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """The cache root: $ANYBIT_CACHE, else ~/.cache/anybit."""
    return Path(os.environ.get("ANYBIT_CACHE", "~/.cache/anybit")).expanduser()
