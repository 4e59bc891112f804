"""Compiling the C kernels on first use, into the anybit cache, and loading only what this cache built.

Each source is compiled with the system's C compiler (`CC`, else `cc`) once per source, compiler, flags and
CPU, and loaded only while its sha256 is the one recorded when it was built. The instruction set is the
CPU's own (`-march=native`) unless `ANYBIT_CPU_ISA` asks for `avx2` or `portable` (plain C): the kernels
choose their code path when compiled, so this is how every path is reached and tested on one machine.
A compiler without OpenMP or `-march=native` gets a second, plain try; without any compiler the caller
falls back to the reference path, after one warning.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import subprocess
import warnings
from collections.abc import Callable
from functools import cache
from pathlib import Path

from anybit.cache import cache_dir
from anybit.errors import AnybitError
from anybit.format.files import make_temp_file, remove_stale_temporaries

ISA_FLAGS = {
    "native": ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC"),
    "avx2": ("-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp", "-shared", "-fPIC"),
    "portable": ("-O3", "-fopenmp", "-shared", "-fPIC"),
}
PLAIN_FLAGS = ("-O3", "-shared", "-fPIC")  # no OpenMP, the compiler's default target


def requested_isa() -> str:
    """The instruction set the kernels are compiled for: `ANYBIT_CPU_ISA`, default "native"."""
    isa = os.environ.get("ANYBIT_CPU_ISA", "native")
    if isa not in ISA_FLAGS:
        raise AnybitError(f"ANYBIT_CPU_ISA={isa!r} is not one of {', '.join(ISA_FLAGS)}")
    return isa


def _cpu_signature() -> str:
    """What the compiled code depends on besides its source: the CPU model and its instruction flags."""
    try:
        info = Path("/proc/cpuinfo").read_text()
        lines = [line for line in info.splitlines() if line.startswith(("model name", "flags"))][:2]
    except OSError:
        lines = []
    return "\n".join([platform.machine(), *lines])


@cache  # asked once per process, not once per build tried
def _compiler_identity(compiler: str) -> str:
    """What the compiler says it is (its path and first line of --version); "" when it does not answer."""
    try:
        done = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return ""
    return f"{compiler}\n{(done.stdout.strip().splitlines() or [''])[0]}"


def digest(path: Path) -> str:
    """The sha256 of a file."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


def built_by_us(library: Path) -> bool:
    """Whether `library` is the file this cache built: its sha256 matches the one recorded beside it."""
    record = library.with_name(library.name + ".sha256")
    try:
        return library.is_file() and record.read_text().strip() == digest(library)
    except OSError:
        return False


class CompiledKernel:
    """One C source, compiled and loaded on first use per instruction set; `declare` sets its signatures."""

    def __init__(self, source: Path, declare: Callable[[ctypes.CDLL], None]) -> None:
        self.source = source
        self.declare = declare
        self._loaded: dict[str, ctypes.CDLL | str] = {}

    def library_path(self, compiler: str, flags: tuple[str, ...]) -> Path:
        """The cache entry of one build: keyed by the source, the compiler, its flags and the CPU."""
        key = hashlib.sha256(
            self.source.read_bytes() + "\n".join([_compiler_identity(compiler), *flags, _cpu_signature()]).encode()
        ).hexdigest()[:16]
        return cache_dir() / "kernels" / f"{self.source.stem}-{key}.so"

    def library(self) -> ctypes.CDLL | str:
        """The compiled kernel for the requested instruction set, or why there is none (one line, warned
        once)."""
        isa = requested_isa()
        if isa not in self._loaded:
            self._loaded[isa] = self._load(ISA_FLAGS[isa])
        return self._loaded[isa]

    def cache_clear(self) -> None:
        """Forget what was loaded (tests change the compiler or the cache between calls)."""
        self._loaded.clear()

    def _load(self, flags: tuple[str, ...]) -> ctypes.CDLL | str:
        compiler = os.environ.get("CC", "cc")
        failure = ""
        for attempt in (flags, PLAIN_FLAGS):
            target = self.library_path(compiler, attempt)
            remove_stale_temporaries(target)
            if built_by_us(target) or not (failure := self._compile(compiler, attempt, target)):
                break
        else:
            return self._without(failure)
        if not built_by_us(target):
            return self._without(f"the compiled kernel {target} changed after it was built")
        try:
            lib = ctypes.CDLL(str(target))
        except OSError as exc:
            return self._without(f"the compiled kernel does not load ({exc})")
        self.declare(lib)
        return lib

    def _compile(self, compiler: str, flags: tuple[str, ...], target: Path) -> str:
        """Build into a private temporary, record its sha256, then rename it to `target`; "" on success,
        else why not."""
        target.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = make_temp_file(target, suffix=".so")
        try:
            done = subprocess.run([compiler, *flags, str(self.source), "-o", str(tmp)], capture_output=True, text=True)
            if done.returncode:
                detail = (done.stderr.strip().splitlines() or ["no output"])[0]
                return f"the C compiler failed ({compiler}: {detail})"
            record = make_temp_file(target, suffix=".sha256")
            record.write_text(digest(tmp))
            os.replace(record, target.with_name(target.name + ".sha256"))
            os.replace(tmp, target)
            return ""
        except OSError as exc:
            return f"no C compiler ({compiler}: {exc.strerror or exc})"
        finally:
            tmp.unlink(missing_ok=True)

    def _without(self, reason: str) -> str:
        if reason not in _WARNED:  # one warning per reason, whichever kernel met it first
            _WARNED.add(reason)
            warnings.warn(f"anybit: no CPU kernel ({reason}); CPU products use the slower reference path", stacklevel=5)
        return reason


_WARNED: set[str] = set()
