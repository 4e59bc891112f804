"""CPU kernels for the packed format on axis 0 (every layout but CLAQ's per-column codebooks).

Decode-time products y = W x (batch 1-8) multiply straight from the bit-plane codes with a small C kernel
(`segment_lut.c`: OpenMP over rows, codebook lookups by AVX2 permutes where the CPU has them), without
decoding the matrix: per-row codebooks of mixed widths (anybit, SKIM, SqueezeLLM), per-channel or
group-wise uniform grids (RTN, GPTQ), group bit maps (SliM-LLM). Longer inputs (prefill) decode the matrix
with the same kernel's decoder, then take one GEMM.

The kernel is compiled on first use with the system's C compiler (`CC`, else `cc`) into the anybit
cache, once per source, compiler, flags and CPU, and loaded only while its sha256 is the one recorded when
it was built; without a compiler the reference path serves, after one warning.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import subprocess
import warnings
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import torch

from anybit.cache import cache_dir
from anybit.format.files import make_temp_file, remove_stale_temporaries
from anybit.format.packing import unpack_codes
from anybit.format.qtensor import QuantizedTensor
from anybit.kernels import MAX_BATCH, coded_input, outlier_corrections

SOURCE = Path(__file__).with_name("segment_lut.c")
FLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC")
PLAIN_FLAGS = ("-O3", "-shared", "-fPIC")


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


def _library_path(compiler: str, flags: tuple[str, ...]) -> Path:
    """The cache entry of one build: keyed by the source, the compiler, its flags and the CPU."""
    key = hashlib.sha256(
        SOURCE.read_bytes() + "\n".join([_compiler_identity(compiler), *flags, _cpu_signature()]).encode()
    ).hexdigest()[:16]
    return cache_dir() / "kernels" / f"segment_lut-{key}.so"


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _built_by_us(library: Path) -> bool:
    """Whether `library` is the file this cache built: its sha256 matches the one recorded beside it."""
    record = library.with_name(library.name + ".sha256")
    try:
        return library.is_file() and record.read_text().strip() == _digest(library)
    except OSError:
        return False


def _compile(compiler: str, flags: tuple[str, ...], target: Path) -> str:
    """Build the kernel into a private temporary, record its sha256, then rename it to `target`;
    "" on success, else why not."""
    target.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = make_temp_file(target, suffix=".so")
    try:
        done = subprocess.run([compiler, *flags, str(SOURCE), "-o", str(tmp)], capture_output=True, text=True)
        if done.returncode:
            detail = (done.stderr.strip().splitlines() or ["no output"])[0]
            return f"the C compiler failed ({compiler}: {detail})"
        record = make_temp_file(target, suffix=".sha256")
        record.write_text(_digest(tmp))
        os.replace(record, target.with_name(target.name + ".sha256"))
        os.replace(tmp, target)
        return ""
    except OSError as exc:
        return f"no C compiler ({compiler}: {exc.strerror or exc})"
    finally:
        tmp.unlink(missing_ok=True)


@cache
def _library() -> ctypes.CDLL | str:
    """The compiled kernel, or why there is none (a one-line reason). The optimized build first; a compiler
    without OpenMP or -march=native gets a second, plain try (single-threaded, no AVX2 unless the default
    target has it). A cached library is loaded only if its sha256 is the one recorded when it was built."""
    compiler = os.environ.get("CC", "cc")
    failure = ""
    for flags in (FLAGS, PLAIN_FLAGS):
        target = _library_path(compiler, flags)
        remove_stale_temporaries(target)
        if _built_by_us(target) or not (failure := _compile(compiler, flags, target)):
            break
    else:
        return _without(failure)
    if not _built_by_us(target):
        return _without(f"the compiled kernel {target} changed after it was built")
    try:
        lib = ctypes.CDLL(str(target))
    except OSError as exc:
        return _without(f"the compiled kernel does not load ({exc})")
    common = [ctypes.c_void_p] * 5 + [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64]
    lib.anybit_segment_matvec.restype = lib.anybit_segment_dequantize.restype = None
    lib.anybit_segment_matvec.argtypes = [*common, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int]
    lib.anybit_segment_dequantize.argtypes = [*common, ctypes.c_void_p, ctypes.c_int]
    return lib


def _without(reason: str) -> str:
    warnings.warn(f"anybit: no CPU kernel ({reason}); CPU decoding uses the slower reference path", stacklevel=4)
    return reason


def unavailable(qt: QuantizedTensor) -> str:
    """Why the CPU kernels cannot serve this tensor ("" when they can)."""
    if qt.axis != 0:
        return "per-column (axis 1) layouts have no CPU kernel"
    if qt.group_size % 8:
        return f"group size {qt.group_size} is not a multiple of 8"
    if qt.bitmap.device.type != "cpu":
        return "the tensor is not in CPU memory"
    lib = _library()
    return lib if isinstance(lib, str) else ""


@dataclass
class CpuPrepared:
    """Per-segment addresses into a `QuantizedTensor`'s own code streams and codebooks (kept alive here);
    segments in row-major order, `group_size` columns each."""

    qt: QuantizedTensor
    code_addr: torch.Tensor  # int64 address of each segment's first code byte
    bits: torch.Tensor  # int32 width of each segment
    table_addr: torch.Tensor  # int64 address of each segment's fp16 codebook (codebook kind)
    scale: torch.Tensor  # float32 scale of each segment (uniform kind)
    zero: torch.Tensor  # int32 zero point of each segment (uniform kind)
    outliers: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None  # rows, cols, stored − decoded

    def arguments(self) -> tuple:
        """The leading arguments both kernels take."""
        rows, cols = self.qt.shape
        return (
            self.code_addr.data_ptr(), self.bits.data_ptr(), self.table_addr.data_ptr(), self.scale.data_ptr(),
            self.zero.data_ptr(), self.qt.kind == "uniform", rows, cols, self.qt.group_size,
        )  # fmt: skip


def prepare(qt: QuantizedTensor) -> CpuPrepared:
    """The kernels' view of a tensor they serve (see `unavailable`)."""
    reason = unavailable(qt)
    if reason:
        raise ValueError(reason)
    widths = qt.bitmap.reshape(-1).to(torch.int64)
    code_addr = torch.zeros(widths.numel(), dtype=torch.int64)
    table_addr = torch.zeros(widths.numel(), dtype=torch.int64)
    zero = torch.zeros(widths.numel(), dtype=torch.int32)
    uniform = qt.kind == "uniform"
    for b in qt.widths:  # a width's segments are stored in row-major order
        seg = (widths == b).nonzero()[:, 0]
        rank = torch.arange(seg.numel(), dtype=torch.int64)
        code_addr[seg] = qt.codes[b].data_ptr() + rank * (qt.group_size // 8) * b
        if uniform:
            zero[seg] = unpack_codes(qt.zeros[b], b, seg.numel()).to(torch.int32)
        else:
            book = qt.codebooks[b]
            table_addr[seg] = book.data_ptr() + rank * book.stride(0) * book.element_size()
    scale = qt.scales.reshape(-1).float().contiguous() if uniform else torch.zeros(1)
    return CpuPrepared(qt, code_addr, widths.to(torch.int32), table_addr, scale, zero, outlier_corrections(qt))


def _add_outliers(prepared: CpuPrepared, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    if prepared.outliers is not None:
        rows, cols, deltas = prepared.outliers
        y.index_add_(1, rows, (deltas[None, :] * x.float()[:, cols]).to(y.dtype))
    return y


def matvec(prepared: CpuPrepared, x: torch.Tensor) -> torch.Tensor:
    """y = W x for x of shape (batch ≤ 8, in_features); float32 result (batch, out_features)."""
    qt = prepared.qt
    rows, cols = qt.shape
    if x.dim() != 2 or x.shape[1] != cols or x.shape[0] > MAX_BATCH or x.device.type != "cpu":
        raise ValueError(f"x must be a CPU tensor (batch <= {MAX_BATCH}, {cols}), got {tuple(x.shape)} on {x.device}")
    xs = coded_input(x, qt.perm, qt.col_scale).float().contiguous()
    y = torch.empty(x.shape[0], rows, dtype=torch.float32)
    _library().anybit_segment_matvec(
        *prepared.arguments(), xs.data_ptr(), x.shape[0], y.data_ptr(), torch.get_num_threads()
    )
    return _add_outliers(prepared, y, x)


def matmul(prepared: CpuPrepared, x: torch.Tensor) -> torch.Tensor:
    """y = x Wᵀ for any number of rows of x (prefill): the coded matrix decoded once into a transient dense
    float32 matrix, then one GEMM in x's dtype."""
    qt = prepared.qt
    if x.dim() != 2 or x.shape[1] != qt.shape[1] or x.device.type != "cpu":
        raise ValueError(f"x must be a CPU tensor (tokens, {qt.shape[1]}), got {tuple(x.shape)} on {x.device}")
    dense = torch.empty(qt.shape, dtype=torch.float32)
    _library().anybit_segment_dequantize(*prepared.arguments(), dense.data_ptr(), torch.get_num_threads())
    y = coded_input(x, qt.perm, qt.col_scale).to(x.dtype) @ dense.to(x.dtype).t()
    return _add_outliers(prepared, y, x)
