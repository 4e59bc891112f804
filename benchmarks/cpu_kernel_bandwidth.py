"""The fast CPU kernel against the machine's read bandwidth, for every layout the recipes store.

Usage: python benchmarks/cpu_kernel_bandwidth.py [--weights 268435456] [--rounds 5] [--batches 1,8]

For each layout (per-row codebooks of mixed widths at anybit's 2.25, 3.25 and 4.25 bits, group
codebooks, uniform grids per channel and per group at 2-4 bits, SliM-LLM's group bit maps, SqueezeLLM's
outliers with SKIM's scaling vector and a permutation, CLAQ's per-column codebooks of mixed widths, vq's
vector codebooks: 4-D at 2.25-2.75 bits, 2-D at 4 and 4.5), a set of 4096×4096 matrices holding `--weights` weights in all (far more bytes than the last-level cache), with random codes: the time of one product
of every matrix with a (batch, 4096) input, as the median of `--rounds`. Bandwidth is the bytes the
kernel reads (its codes, re-laid or read in place, tables, scales and zero points) per second, beside the machine's read
bandwidth measured in the same run by a streaming sum over 1 GiB (`fraction_of_read`: the two medians, taken
minutes apart) and, as `paired_fraction`, the median over rounds of each round's kernel speed over a streaming
read timed just before it (on a shared machine whose read speed drifts between minutes, the steadier figure).
Beside it, the roof the machine's integer
products set (`int8_dot_roof.c`: the multiplies per second of the code path's product instruction, on the
kernel's threads): `roof_fraction` is the share of the read bandwidth a layout would reach if the kernel did
nothing but its products at that rate (AVX-512: two byte products per weight and token, three with two-part
tables or, with int8 tables, where 4 tokens or more multiply their zero low parts;
AVX2: one int16 product), the most any code with these products could reach. One JSON line per layout and
batch to benchmarks/results/cpu_kernel_bandwidth.jsonl.
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import statistics
import time
from pathlib import Path

import torch

from _common import log_result
from anybit.format.qtensor import QuantizedTensor, SparseOutliers
from anybit.format.vector import VectorTensor
from anybit.kernels import build, cpu_fast
from anybit.quant.uniform import rtn_quantize

SIDE = 4096


def _widths(mix: dict[int, float], rows: int, groups: int, per_row: bool) -> torch.Tensor:
    """A bit map drawing widths with the shares in `mix` (one per row, or one per segment)."""
    widths = torch.tensor(list(mix), dtype=torch.uint8)
    shares = torch.tensor(list(mix.values()))
    draw = torch.multinomial(shares, rows if per_row else rows * groups, replacement=True)
    chosen = widths[draw]
    return chosen[:, None].expand(rows, groups).contiguous() if per_row else chosen.view(rows, groups)


def _codebook(mix: dict[int, float], group: int, per_row: bool = True, **extras) -> QuantizedTensor:
    groups = SIDE // group
    bitmap = _widths(mix, SIDE, groups, per_row)
    codes = torch.randint(0, 256, (SIDE, SIDE), dtype=torch.uint8) % (1 << bitmap.long()).repeat_interleave(group, 1)
    books = torch.randn(SIDE, groups, 1 << max(mix)).sort(dim=-1).values * 0.02
    return QuantizedTensor.from_codebook(codes, books, bitmap, (SIDE, SIDE), group, **extras)


def _uniform(mix: dict[int, float], group: int, per_segment: bool = False) -> QuantizedTensor:
    groups = SIDE // group
    if per_segment:  # SliM-LLM: one width per group, shared by all rows
        bitmap = _widths(mix, 1, groups, per_row=False).expand(SIDE, groups).contiguous()
    else:
        bitmap = _widths(mix, SIDE, groups, per_row=True)
    return rtn_quantize(torch.randn(SIDE, SIDE) * 0.02, group, bitmap)


def _squeezellm_like() -> QuantizedTensor:
    mask = torch.rand(SIDE, SIDE) < 0.0045
    return _codebook(
        {3: 1.0}, SIDE, perm=torch.randperm(SIDE), col_scale=torch.rand(SIDE) + 0.5,
        outliers=SparseOutliers.from_mask(torch.randn(SIDE, SIDE) * 0.02, mask),
    )  # fmt: skip


def _columns(mix: dict[int, float]) -> QuantizedTensor:
    """CLAQ's layout: one codebook per column (all rows), each column's width drawn with the shares in `mix`,
    act-order."""
    bits = _widths(mix, SIDE, 1, per_row=True)  # (columns, 1)
    codes = torch.randint(0, 256, (SIDE, SIDE), dtype=torch.uint8) % (1 << bits.long())  # (columns, rows)
    books = torch.randn(SIDE, 1, 1 << max(mix)).sort(dim=-1).values * 0.02
    return QuantizedTensor.from_codebook(codes, books, bits, (SIDE, SIDE), SIDE, axis=1, perm=torch.randperm(SIDE))


def _vector(index_bits: int, dim: int = 4) -> VectorTensor:
    """`--method vq`'s layout: a k-bit table index per piece of `dim` weights, a scale per row, act-order."""
    codes = torch.randint(0, 1 << index_bits, (SIDE, SIDE // dim))
    scales = torch.rand(SIDE) * 0.02
    return VectorTensor.from_codes(codes, scales, (SIDE, SIDE), dim, index_bits, torch.randperm(SIDE))


LAYOUTS = {
    "row codebooks 2.25 (anybit)": lambda: _codebook({2: 0.75, 3: 0.25}, SIDE),
    "row codebooks 3.25 (anybit)": lambda: _codebook({3: 0.75, 4: 0.25}, SIDE),
    "row codebooks 4.25 (anybit)": lambda: _codebook({4: 0.75, 5: 0.25}, SIDE),
    "group codebooks g64, 3-bit": lambda: _codebook({3: 1.0}, 64, per_row=False),
    "uniform per channel, 4-bit": lambda: _uniform({4: 1.0}, SIDE),
    "uniform g64, 2-bit": lambda: _uniform({2: 1.0}, 64),
    "uniform g64, 3-bit (gptq3)": lambda: _uniform({3: 1.0}, 64),
    "uniform g64, 4-bit (gptq4)": lambda: _uniform({4: 1.0}, 64),
    "group bit map g64, 2-4 bits (slim)": lambda: _uniform({2: 0.25, 3: 0.5, 4: 0.25}, 64, per_segment=True),
    "row codebooks 3-bit + outliers, scaling, permutation": _squeezellm_like,
    "column codebooks 2-4 bits (claq 2.2)": lambda: _columns({2: 0.9, 4: 0.1}),
    "column codebooks 3-4 bits (claq 3)": lambda: _columns({3: 0.9, 4: 0.1}),
    "vector codebooks 2.25 (vq, 9-bit indices)": lambda: _vector(9),
    "vector codebooks 2.5 (vq, 10-bit indices)": lambda: _vector(10),
    "vector codebooks 2.75 (vq, 11-bit indices)": lambda: _vector(11),
    "vector codebooks 3.25 (vq, 13-bit indices)": lambda: _vector(13),
    "vector codebooks 4 (vq, 2-D, 8-bit indices)": lambda: _vector(8, dim=2),
    "vector codebooks 4.5 (vq, 2-D, 9-bit indices)": lambda: _vector(9, dim=2),
}


READ_DATA = 1 << 28  # float32 elements of the streaming read (1 GiB)


def read_round(data: torch.Tensor) -> float:
    """GB/s of one streaming sum over `data` (torch, all its threads): the machine's read speed."""
    start = time.perf_counter()
    data.sum()
    return data.numel() * data.element_size() / (time.perf_counter() - start) / 1e9


def read_bandwidth(rounds: int, data: torch.Tensor | None = None) -> float:
    """The median GB/s of `rounds` streaming reads of `data` (1 GiB of float32 where not given), after one to
    warm up."""
    data = torch.ones(READ_DATA) if data is None else data
    return statistics.median([read_round(data) for _ in range(rounds + 1)][1:])


def _declare_roof(lib: ctypes.CDLL) -> None:
    lib.anybit_dot_roof.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.POINTER(ctypes.c_int64)]
    lib.anybit_dot_roof.restype = ctypes.c_double


ROOF = build.CompiledKernel(Path(__file__).with_name("int8_dot_roof.c"), _declare_roof)


def dot_roof(rounds: int) -> float | None:
    """G multiplies per second of the code path's product instruction on torch's threads (best of `rounds`),
    None where it cannot be built or the build has none."""
    lib = ROOF.library()
    if isinstance(lib, str):
        return None
    sink = ctypes.c_int64()
    best = max(lib.anybit_dot_roof(torch.get_num_threads(), 20_000_000, ctypes.byref(sink)) for _ in range(rounds))
    return best or None


def products_per_weight(prepared, tokens: int) -> int | None:
    """The kernel's integer products per weight and token on this code path for `tokens` tokens (None: float
    products, vq): on AVX-512 a table's low part adds one, except where the row path skips int8 tables' zeros."""
    if isinstance(prepared.qt, VectorTensor):
        return None
    path = cpu_fast.code_path()
    if prepared.qt.axis == 1:  # per-column codebooks: madd_epi16 on every SIMD path
        return 1 if path == "avx2" else None
    if path == "avx512":
        skipped = prepared.high_only and cpu_fast.token_path(prepared, tokens) == "rows"
        return 3 if prepared.tables is not None and not skipped else 2
    return 1 if path == "avx2" else None


def read_bytes(prepared) -> int:
    """Bytes one product reads: what the kernel holds (`nbytes`) and, where it reads the stored codes in
    place (one width on the AVX-512 path), those codes too."""
    shared = not getattr(prepared, "owns_codes", True)
    return prepared.nbytes() + (prepared.codes.numel() * prepared.codes.element_size() if shared else 0)


def _copies(prepared, count: int) -> list:
    """`count` independent copies (own memory) of one prepared matrix."""

    def copy():
        fields = (f.name for f in dataclasses.fields(prepared))
        tensors = {f: getattr(prepared, f).clone() for f in fields if isinstance(getattr(prepared, f), torch.Tensor)}
        return dataclasses.replace(prepared, **tensors)

    return [copy() for _ in range(count)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", type=int, default=1 << 28)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--layouts", default=None, help="comma-separated prefixes of the layouts to run")
    args = parser.parse_args()
    torch.manual_seed(0)
    data = torch.ones(READ_DATA)  # also read before each round of the kernels (paired_fraction)
    bandwidth = read_bandwidth(args.rounds, data)
    roof = dot_roof(args.rounds)
    count = max(1, args.weights // (SIDE * SIDE))
    weights = count * SIDE * SIDE
    for name, make in LAYOUTS.items():
        if args.layouts and not any(name.startswith(p) for p in args.layouts.split(",")):
            continue
        qt = make()
        matrices = _copies(cpu_fast.prepare(qt), count)
        read = sum(read_bytes(m) for m in matrices)
        for batch in (int(b) for b in args.batches.split(",")):
            per_weight = products_per_weight(matrices[0], batch)
            x = torch.randn(batch, SIDE)
            seconds, fractions, reads = [], [], []
            for _ in range(args.rounds + 1):  # round 0 warms up
                reads.append(read_round(data))
                start = time.perf_counter()
                for m in matrices:
                    cpu_fast.product(m, x)
                seconds.append(time.perf_counter() - start)
                fractions.append(read / seconds[-1] / 1e9 / reads[-1])
            median = statistics.median(seconds[1:])
            roof_fraction = None
            if roof and per_weight:  # the products alone, at the roof: weights/s times bytes per weight
                roof_fraction = roof * 1e9 / (batch * per_weight) * (read / weights) / (bandwidth * 1e9)
            log_result(
                "cpu_kernel_bandwidth",
                {
                    "layout": name, "batch": batch, "code_path": cpu_fast.code_path(), "matrices": count,
                    "weights": weights, "counted_bits": qt.bits_per_weight(),
                    "kernel_bytes": read, "seconds": median, "kernel_gbs": read / median / 1e9,
                    "read_gbs": bandwidth, "fraction_of_read": read / median / 1e9 / bandwidth,
                    "paired_read_gbs": statistics.median(reads[1:]), "paired_fraction": statistics.median(fractions[1:]),
                    "gweights_per_s": weights / median / 1e9, "gmacs": weights * batch / median / 1e9,
                    "dot_roof_gmuls": roof, "roof_fraction": roof_fraction,
                },
            )  # fmt: skip
        del matrices


if __name__ == "__main__":
    main()
