"""CPU kernel for decode-time products y = W x (batch 1-8) on row layouts of the packed format.

Row layouts (one segment per output row: anybit, SKIM and SqueezeLLM per-row codebooks of mixed widths,
per-channel uniform grids) are multiplied straight from their bit-plane codes by a small C kernel
(`row_lut.c`: one OpenMP thread per block of rows, codebook lookups by AVX2 permutes where the CPU has
them), without decoding the matrix. Grouped layouts and per-column codebooks keep the reference path.

The kernel is compiled on first use with the system's C compiler (`CC`, else `cc`) into the anybit
cache, once per source and CPU; without a compiler the reference path serves, after one warning.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import subprocess
import tempfile
import warnings
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import torch

from anybit.format.packing import unpack_codes
from anybit.format.qtensor import QuantizedTensor
from anybit.kernels import MAX_BATCH, coded_input, outlier_corrections

SOURCE = Path(__file__).with_name("row_lut.c")
FLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC")


def _cpu_signature() -> str:
    """What the compiled code depends on besides its source: the CPU model and its instruction flags."""
    try:
        info = Path("/proc/cpuinfo").read_text()
        lines = [line for line in info.splitlines() if line.startswith(("model name", "flags"))][:2]
    except OSError:
        lines = []
    return "\n".join([platform.machine(), *lines])


@cache
def _library() -> ctypes.CDLL | str:
    """The compiled kernel, or why there is none (a one-line reason)."""
    from anybit.model.loading import cache_dir

    source = SOURCE.read_bytes()
    key = hashlib.sha256(source + " ".join(FLAGS).encode() + _cpu_signature().encode()).hexdigest()[:16]
    target = cache_dir() / "kernels" / f"row_lut-{key}.so"
    if not target.exists():
        compiler = os.environ.get("CC", "cc")
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".row_lut.", suffix=".so", dir=target.parent)
        os.close(fd)
        try:
            done = subprocess.run([compiler, *FLAGS, str(SOURCE), "-o", tmp], capture_output=True, text=True)
            if done.returncode:
                detail = (done.stderr.strip().splitlines() or ["no output"])[0]
                return _without(f"the C compiler failed ({compiler}: {detail})")
            os.replace(tmp, target)
        except OSError as exc:
            return _without(f"no C compiler ({compiler}: {exc.strerror or exc})")
        finally:
            Path(tmp).unlink(missing_ok=True)
    lib = ctypes.CDLL(str(target))
    lib.anybit_row_matvec.restype = None
    lib.anybit_row_matvec.argtypes = [ctypes.c_void_p] * 5 + [ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    lib.anybit_row_matvec.argtypes += [ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int]
    return lib


def _without(reason: str) -> str:
    warnings.warn(f"anybit: no CPU kernel ({reason}); CPU decoding uses the slower reference path", stacklevel=4)
    return reason


def unavailable(qt: QuantizedTensor) -> str:
    """Why the CPU kernel cannot serve this tensor ("" when it can)."""
    if qt.axis != 0 or qt.group_size != qt.shape[1]:
        return "only row layouts (one segment per output row) have a CPU kernel"
    if qt.shape[1] % 8:
        return f"{qt.shape[1]} input features is not a multiple of 8"
    if qt.bitmap.device.type != "cpu":
        return "the tensor is not in CPU memory"
    lib = _library()
    return lib if isinstance(lib, str) else ""


@dataclass
class CpuPrepared:
    """Per-row addresses into a `QuantizedTensor`'s own code streams and codebooks (which it keeps alive)."""

    qt: QuantizedTensor
    code_addr: torch.Tensor  # int64 address of each row's first code byte
    bits: torch.Tensor  # int32 width of each row
    table_addr: torch.Tensor  # int64 address of each row's fp16 codebook (codebook kind)
    scale: torch.Tensor  # float32 per-row scale (uniform kind)
    zero: torch.Tensor  # int32 per-row zero point (uniform kind)
    outliers: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None  # rows, cols, stored − decoded


def prepare(qt: QuantizedTensor) -> CpuPrepared:
    """The kernel's view of a row-layout tensor (see `unavailable`)."""
    reason = unavailable(qt)
    if reason:
        raise ValueError(reason)
    rows, cols = qt.shape
    widths = qt.bitmap[:, 0].to(torch.int64)
    code_addr = torch.zeros(rows, dtype=torch.int64)
    table_addr = torch.zeros(rows, dtype=torch.int64)
    zero = torch.zeros(rows, dtype=torch.int32)
    uniform = qt.kind == "uniform"
    for b in qt.widths:  # a width's segments are stored in row order
        row = (widths == b).nonzero()[:, 0]
        rank = torch.arange(row.numel(), dtype=torch.int64)
        code_addr[row] = qt.codes[b].data_ptr() + rank * (cols // 8) * b
        if uniform:
            zero[row] = unpack_codes(qt.zeros[b], b, row.numel()).to(torch.int32)
        else:
            book = qt.codebooks[b]
            table_addr[row] = book.data_ptr() + rank * book.stride(0) * book.element_size()
    scale = qt.scales[:, 0].float().contiguous() if uniform else torch.zeros(1)
    return CpuPrepared(qt, code_addr, widths.to(torch.int32), table_addr, scale, zero, outlier_corrections(qt))


def row_matvec(prepared: CpuPrepared, x: torch.Tensor) -> torch.Tensor:
    """y = W x for x of shape (batch ≤ 8, in_features); float32 result (batch, out_features)."""
    qt = prepared.qt
    rows, cols = qt.shape
    if x.dim() != 2 or x.shape[1] != cols or x.shape[0] > MAX_BATCH or x.device.type != "cpu":
        raise ValueError(f"x must be a CPU tensor (batch <= {MAX_BATCH}, {cols}), got {tuple(x.shape)} on {x.device}")
    xs = coded_input(x, qt.perm, qt.col_scale).float().contiguous()
    y = torch.empty(x.shape[0], rows, dtype=torch.float32)
    p = prepared
    _library().anybit_row_matvec(
        p.code_addr.data_ptr(), p.bits.data_ptr(), p.table_addr.data_ptr(), p.scale.data_ptr(), p.zero.data_ptr(),
        qt.kind == "uniform", rows, cols, xs.data_ptr(), x.shape[0], y.data_ptr(), torch.get_num_threads(),
    )  # fmt: skip
    if p.outliers is not None:
        o_rows, o_cols, deltas = p.outliers
        y.index_add_(1, o_rows, deltas[None, :] * x.float()[:, o_cols])
    return y
