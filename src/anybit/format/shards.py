"""Weights written and read as safetensors shards, the way Hugging Face lays them out.

A model whose tensors fit in one shard is one `model.safetensors`; a larger one is
`model-00001-of-0000N.safetensors` ... with `model.safetensors.index.json` mapping each tensor to its
shard. The writer takes tensors as they are produced (one decoder layer at a time) and writes a shard
whenever enough are pending, so a model never has to be whole in memory to be saved.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from anybit.errors import AnybitError

WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
SHARD_BYTES = 256 << 20  # pending bytes that make a shard: bounds the writer's share of peak memory


def shard_name(index: int, count: int) -> str:
    return f"model-{index:05d}-of-{count:05d}.safetensors"


class ShardWriter:
    """Writes tensors into `directory` as shards of about `shard_bytes`; `finish` names them and writes the index."""

    def __init__(self, directory: Path, metadata: dict[str, str], shard_bytes: int | None = None) -> None:
        self.directory = directory
        self.metadata = metadata
        self.shard_bytes = shard_bytes or SHARD_BYTES
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._written: list[tuple[Path, list[str]]] = []
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self._pending or any(name in names for _, names in self._written):
            raise ValueError(f"tensor {name} written twice")
        tensor = tensor.detach().cpu().contiguous()
        self._pending[name] = tensor
        self._pending_bytes += tensor.numel() * tensor.element_size()
        if self._pending_bytes >= self.shard_bytes:
            self._flush()

    def _flush(self) -> None:
        if not self._pending:
            return
        path = self.directory / f".shard-{len(self._written):05d}.safetensors"
        save_file(self._pending, path, metadata=self.metadata)
        self._written.append((path, list(self._pending)))
        self.total_bytes += self._pending_bytes
        self._pending, self._pending_bytes = {}, 0

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
