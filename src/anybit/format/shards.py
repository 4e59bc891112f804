"""Weights written and read as safetensors shards, the way Hugging Face lays them out.

A model whose tensors fit in one shard is one `model.safetensors`; a larger one is
`model-00001-of-0000N.safetensors` ... with `model.safetensors.index.json` mapping each tensor to its
shard. The writer takes tensors as they are produced (one decoder layer at a time) and writes a shard
whenever enough are pending, so a model never has to be whole in memory to be saved.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import BinaryIO

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from anybit.errors import AnybitError

WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
SHARD_BYTES = 256 << 20  # bytes of tensor data that make a shard (on disk while it grows, not in memory)
_ALIGNMENTS = (8, 4, 2, 1)  # element sizes: larger first, so every tensor starts at a multiple of its own


def assemble_shard(path: Path, header: bytes, spills: list[Path]) -> None:
    """Write the shard file `path`: the header, then the spill files' bytes in order (each removed after)."""
    with open(path, "wb") as shard:
        shard.write(header)
        for spill in spills:
            with open(spill, "rb") as source:
                shutil.copyfileobj(source, shard, 16 << 20)
            spill.unlink()


def shard_name(index: int, count: int) -> str:
    return f"model-{index:05d}-of-{count:05d}.safetensors"


class ShardWriter:
    """Writes tensors into `directory` as safetensors shards of about `shard_bytes`; `finish` names them and
    writes the index.

    Each tensor's bytes go to disk when it is added (one spill file per element size), so the writer holds
    no tensor in memory; a shard is assembled from its spill files (header first, as the format wants) once
    it is full. The layout is safetensors' own: tensors ordered by descending element size, none unaligned.
    """

    def __init__(self, directory: Path, metadata: dict[str, str], shard_bytes: int | None = None) -> None:
        self.directory = directory
        self.metadata = metadata
        self.shard_bytes = shard_bytes or SHARD_BYTES
        self._spills: dict[int, tuple[Path, BinaryIO]] = {}
        self._pending: dict[int, list[tuple[str, str, list[int], int]]] = {}  # size -> (name, dtype, shape, bytes)
        self._pending_bytes = 0
        self._written: list[tuple[Path, list[str]]] = []
        self._names: set[str] = set()
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self._names:
            raise ValueError(f"tensor {name} written twice")
        dtype = _DTYPE_NAMES.get(tensor.dtype)
        if dtype is None:
            raise ValueError(f"tensor {name} has dtype {tensor.dtype}, which safetensors does not store")
        self._names.add(name)
        tensor = tensor.detach().cpu().contiguous()
        data = tensor.reshape(-1).view(torch.uint8).numpy()
        size = tensor.element_size()
        self._spill(size).write(data.data)
        self._pending.setdefault(size, []).append((name, dtype, list(tensor.shape), data.nbytes))
        self._pending_bytes += data.nbytes
        if self._pending_bytes >= self.shard_bytes:
            self._flush()

    def _spill(self, size: int) -> BinaryIO:
        if size not in self._spills:
            path = self.directory / f".spill-{size}.bin"
            self._spills[size] = (path, open(path, "wb"))  # noqa: SIM115 (closed in _flush or close)
        return self._spills[size][1]

    def _flush(self) -> None:
        if not self._pending:
            return
        header: dict[str, object] = {"__metadata__": self.metadata}
        offset = 0
        for size in _ALIGNMENTS:
            for name, dtype, shape, nbytes in self._pending.get(size, []):
                header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + nbytes]}
                offset += nbytes
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (-(8 + len(text)) % 8)  # the data starts 8-byte aligned
        path = self.directory / f".shard-{len(self._written):05d}.safetensors"
        spills = [self._spills.pop(size) for size in _ALIGNMENTS if size in self._spills]
        for _, spill in spills:
            spill.close()
        assemble_shard(path, struct.pack("<Q", len(text)) + text, [spill_path for spill_path, _ in spills])
        self._written.append((path, [name for size in _ALIGNMENTS for name, *_ in self._pending.get(size, [])]))
        self.total_bytes += self._pending_bytes
        self._pending, self._pending_bytes = {}, 0

    def close(self) -> None:
        """Close and remove the spill files of an unfinished shard (after an error)."""
        for path, spill in self._spills.values():
            spill.close()
            path.unlink(missing_ok=True)
        self._spills = {}

    def finish(self) -> list[str]:
        """Write what is pending, give the shards their final names; returns the weight file names."""
        self._flush()
        if len(self._written) <= 1:
            names = [WEIGHTS_FILE]
            if self._written:
                os.replace(self._written[0][0], self.directory / WEIGHTS_FILE)
            else:
                save_file({}, self.directory / WEIGHTS_FILE, metadata=self.metadata)
            return names
        count = len(self._written)
        weight_map = {}
        names = []
        for i, (path, tensors) in enumerate(self._written, start=1):
            name = shard_name(i, count)
            os.replace(path, self.directory / name)
            weight_map.update(dict.fromkeys(tensors, name))
            names.append(name)
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
        (self.directory / INDEX_FILE).write_text(json.dumps(index, indent=1))
        return [*names, INDEX_FILE]


def weight_files(directory: Path) -> dict[str, str]:
    """Tensor name -> shard file name of the weights stored in `directory` (sharded or not)."""
    index = directory / INDEX_FILE
    if not index.is_file():
        path = directory / WEIGHTS_FILE
        try:
            with safe_open(path, framework="pt") as f:
                return dict.fromkeys(f.keys(), WEIGHTS_FILE)
        except (OSError, SafetensorError) as exc:
            raise AnybitError(f"corrupt or missing {path}: {exc}") from None
    return read_index(index)


def read_index(index: Path) -> dict[str, str]:
    """The weight map (tensor name -> file name) of a `model.safetensors.index.json`, checked."""
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
            raise TypeError("entries must be strings")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as exc:
        raise AnybitError(f"corrupt shard index {index}: {exc}") from None
    return weight_map


def stored_bytes(directory: Path) -> int:
    """Bytes of the weight files in `directory`."""
    return sum((directory / name).stat().st_size for name in set(weight_files(directory).values()))


def _files_of(directory: Path, weight_map: dict[str, str]) -> Iterator[tuple[Path, list[str]]]:
    """(shard path, names of its tensors) for every file of `weight_map`, each checked to lie in `directory`."""
    by_file: dict[str, list[str]] = {}
    for name, file in weight_map.items():
        by_file.setdefault(file, []).append(name)
    for file, names in by_file.items():
        path = directory / file
        if path.resolve().parent != directory.resolve():
            raise AnybitError(f"corrupt shard index in {directory}: {file} is not a file of the directory")
        yield path, names


def _open_checked(stack: ExitStack, path: Path, names: list[str]):
    """The open safetensors file at `path`, checked to hold every tensor of `names`."""
    handle = stack.enter_context(safe_open(path, framework="pt"))
    missing = set(names) - set(handle.keys())
    if missing:
        raise AnybitError(f"corrupt weights file {path}: no tensor {sorted(missing)[0]}")
    return handle


def iter_tensors(directory: Path, weight_map: dict[str, str]) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) for every tensor of `weight_map`, read shard by shard from memory-mapped files."""
    with ExitStack() as stack:
        for path, names in _files_of(directory, weight_map):
            try:
                handle = _open_checked(stack, path, names)
                for name in names:
                    yield name, handle.get_tensor(name)
            except (OSError, SafetensorError) as exc:
                raise AnybitError(f"corrupt or missing weights file {path}: {exc}") from None


_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "U16": torch.uint16, "U32": torch.uint32, "U64": torch.uint64, "BOOL": torch.bool,
}  # fmt: skip
_DTYPE_NAMES = {dtype: name for name, dtype in _SAFETENSORS_DTYPES.items()}


def tensor_specs(directory: Path, weight_map: dict[str, str]) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Shape and dtype of every tensor of `weight_map`, read from the shards' headers (no tensor data)."""
    specs = {}
    with ExitStack() as stack:
        for path, names in _files_of(directory, weight_map):
            try:
                handle = _open_checked(stack, path, names)
                for name in names:
                    view = handle.get_slice(name)
                    dtype = _SAFETENSORS_DTYPES.get(view.get_dtype())
                    if dtype is None:
                        raise AnybitError(f"corrupt weights file {path}: {name} has dtype {view.get_dtype()}")
                    specs[name] = (tuple(view.get_shape()), dtype)
            except (OSError, SafetensorError) as exc:
                raise AnybitError(f"corrupt or missing weights file {path}: {exc}") from None
    return specs
