"""Process memory: freed tensor memory handed back to the system, so that peak resident memory follows what
is alive (one decoder layer when streaming), not what was ever allocated; pages of a memory-mapped
checkpoint that nothing reads any more handed back too; and a spill file for what a pass keeps of every layer."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import mmap
import os
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from anybit.errors import AnybitError

MADV_PAGEOUT = 21  # Linux 5.4+: reclaim the pages now; their contents are kept (read again on the next touch)
M_MMAP_THRESHOLD = -3  # mallopt parameter: allocations of at least this many bytes get a mapping of their own
LARGE_BLOCK_BYTES = 4 << 20


@functools.cache
def _libc():
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


@functools.cache
def _malloc_trim():
    return getattr(_libc(), "malloc_trim", None)  # glibc only


@functools.cache
def _madvise():
    madvise = getattr(_libc(), "madvise", None)
    if madvise is not None:
        madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return madvise


def return_freed_memory() -> None:
    """Hand the memory of freed tensors back to the system (glibc keeps freed blocks under 32 MiB otherwise)."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def map_large_blocks(threshold: int = LARGE_BLOCK_BYTES) -> None:
    """Have glibc give every allocation of at least `threshold` bytes a mapping of its own, unmapped when freed.

    By default glibc raises that bar, up to 32 MiB, each time such a block is freed, and freed blocks below it
    stay in the heap between live ones: one error table of a 7B-shaped down_proj then peaks 458-664 MiB above
    its inputs instead of 370 (`benchmarks/table_memory.py`). A fixed bar costs the page faults of fresh
    mappings (8-16 % of that table's time). Process-wide; idempotent; nothing where the C library is not glibc."""
    mallopt = getattr(_libc(), "mallopt", None)
    if mallopt is not None:
        mallopt(M_MMAP_THRESHOLD, threshold)


def _file_mappings() -> list[tuple[int, int]]:
    """(start, end) of this process's memory-mapped files, from /proc/self/maps (empty where there is none)."""
    spans = []
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                fields = line.split(maxsplit=5)
                if len(fields) == 6 and fields[5].startswith("/"):
                    start, end = (int(address, 16) for address in fields[0].split("-"))
                    spans.append((start, end))
    except OSError:
        pass
    return spans


def release_file_pages(tensors: Iterable[torch.Tensor]) -> int:
    """Hand back the resident pages of CPU tensors that are views of a memory-mapped file (a loaded
    checkpoint whose values now live elsewhere: converted, packed or re-laid). They stay valid: a later read
    faults them in again from the file. Tensors in ordinary memory are left alone. Returns bytes advised."""
    madvise = _madvise()
    tensors = [t for t in tensors if t is not None and t.device.type == "cpu" and t.numel() and t.is_contiguous()]
    if madvise is None or not tensors:
        return 0
    spans, page, advised = _file_mappings(), mmap.PAGESIZE, 0
    for tensor in tensors:
        low = tensor.data_ptr()
        high = low + tensor.numel() * tensor.element_size()
        if not any(start <= low and high <= end for start, end in spans):
            continue
        first, last = -(-low // page) * page, high // page * page  # whole pages only: neighbours may share one
        if last > first and madvise(first, last - first, MADV_PAGEOUT) == 0:
            advised += last - first
    return advised


def _no_room(what: str, exc: OSError) -> AnybitError:
    reason = exc.strerror or str(exc)
    return AnybitError(f"cannot write {what} in {tempfile.gettempdir()}: {reason} (TMPDIR chooses another place)")


def mapped_zeros(numel: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A zeroed 1-D tensor in a memory-mapped temporary file (no name on disk; the mapping keeps it until the
    tensor is gone). Its disk space is reserved here, so a disk without room fails now, in one line, not with
    a bus error when a page is first written."""
    fd, path = tempfile.mkstemp(prefix="anybit-mapped-")
    try:
        os.unlink(path)
        if hasattr(os, "posix_fallocate"):  # Linux and most Unixes; elsewhere the file grows as it is written
            os.posix_fallocate(fd, 0, max(1, numel * dtype.itemsize))
        else:
            os.ftruncate(fd, numel * dtype.itemsize)
        return torch.from_file(f"/proc/self/fd/{fd}", shared=True, size=numel, dtype=dtype)
    except OSError as exc:
        raise _no_room(f"{numel * dtype.itemsize / 1e9:.1f} GB of temporary statistics", exc) from None
    finally:
        os.close(fd)


@dataclass(frozen=True)
class Spilled:
    """A tensor's bytes in a `SpillFile`; `load()` reads them back as a new CPU tensor."""

    spill: SpillFile
    offset: int
    shape: tuple[int, ...]
    dtype: torch.dtype

    def load(self) -> torch.Tensor:
        nbytes = torch.Size(self.shape).numel() * self.dtype.itemsize
        if not nbytes:
            return torch.empty(self.shape, dtype=self.dtype)
        data = bytearray(os.pread(self.spill.fileno(), nbytes, self.offset))
        return torch.frombuffer(data, dtype=torch.uint8).view(self.dtype).view(self.shape)


class SpillFile:
    """An anonymous temporary file that tensors are written to and read back from: what a pass over the model
    keeps for every layer (so that memory stays flat in depth) without holding it. The file is made at the
    first `put`, has no name on disk and goes with the process."""

    def __init__(self) -> None:
        self._file = None

    def put(self, tensor: torch.Tensor) -> Spilled:
        data = tensor.detach().to("cpu").contiguous()
        try:
            if self._file is None:
                self._file = tempfile.TemporaryFile(prefix="anybit-spill-")  # noqa: SIM115 (closed in close())
            offset = self._file.seek(0, os.SEEK_END)
            self._file.write(data.reshape(-1).view(torch.uint8).numpy().data)
            self._file.flush()
        except OSError as exc:
            raise _no_room("the allocation's spill file", exc) from None
        return Spilled(self, offset, tuple(data.shape), data.dtype)

    def fileno(self) -> int:
        return self._file.fileno()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> SpillFile:
        return self

    def __exit__(self, *_exc) -> None:
        self.close()
