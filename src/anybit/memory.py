"""Process memory: freed tensor memory handed back to the system, so that peak resident memory follows what
is alive (one decoder layer when streaming), not what was ever allocated."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools


@functools.cache
def _malloc_trim():
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None


def return_freed_memory() -> None:
    """Hand the memory of freed tensors back to the system (glibc keeps freed blocks under 32 MiB otherwise)."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
