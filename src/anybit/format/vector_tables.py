"""The fixed tables of d-dimensional entries that vector-coded matrices index (`format.vector`).

A table of 2**k entries of dimension d (`INDEX_BITS`) is part of the format, like the grids of llama.cpp's
i-quants: it is shipped with anybit (`vector_tables.safetensors`, checked against its sha256 when read) and not
stored with a model. Each was fitted once by K-means to standard Gaussian samples
(`quant.vector_codebooks.gaussian_codebook`, fixed seed), which is what a row rotated by `format.rotation` and
divided by its scale looks like. A shipped table never changes (directories made with it decode by it);
`python -m anybit.format.vector_tables` fits the tables `INDEX_BITS` names that the file does not hold yet and
adds them (each doubling of the entries quadruples the time), then prints the sha256 to record in `TABLE_SHA256`.
"""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from anybit.errors import AnybitError

TABLE_FILE = Path(__file__).with_name("vector_tables.safetensors")
TABLE_SHA256 = "677d3193e7a768c78b27bac46ac945d1eda3ffced5a10ad6f96738941fe114bc"
# Index widths per dimension: 4-D entries for 1-3.25 bits per weight, 2-D entries for 3.5-5.5 (a 4-D table
# for 4 bits per weight would hold 2**16 entries, too many to search while rounding).
INDEX_BITS = {4: tuple(range(4, 14)), 2: tuple(range(7, 12))}
DIMS = tuple(INDEX_BITS)


def table_name(dim: int, index_bits: int) -> str:
    return f"d{dim}_k{index_bits}"


@functools.cache
def _all_tables() -> dict[str, torch.Tensor]:
    data = TABLE_FILE.read_bytes()
    if hashlib.sha256(data).hexdigest() != TABLE_SHA256:
        raise AnybitError(f"{TABLE_FILE} is damaged (its sha256 differs from the shipped one): reinstall anybit")
    return load_file(TABLE_FILE)


def has_table(dim: int, index_bits: int) -> bool:
    """Whether the format has a table of 2**index_bits entries of dimension `dim`."""
    return index_bits in INDEX_BITS.get(dim, ())


def vector_table(dim: int, index_bits: int) -> torch.Tensor:
    """The fp16 (2**index_bits, dim) table; a ValueError where the format has none."""
    if not has_table(dim, index_bits):
        raise ValueError(f"no vector table of dimension {dim} with {index_bits}-bit indices")
    return _all_tables()[table_name(dim, index_bits)]


def generate(path: Path = TABLE_FILE) -> str:
    """Fit the tables `path` lacks and write them beside the ones it holds (never refitted); returns the
    file's sha256."""
    from anybit.quant.vector_codebooks import gaussian_codebook

    tables = load_file(path) if path.exists() else {}
    for d, widths in INDEX_BITS.items():
        for k in widths:
            if table_name(d, k) not in tables:
                tables[table_name(d, k)] = gaussian_codebook(1 << k, d).half().contiguous()
                save_file(tables, path)  # each fit kept as soon as it is done
    return hashlib.sha256(path.read_bytes()).hexdigest()


if __name__ == "__main__":
    print(generate())
