"""A model's weights read tensor by tensor, and the empty skeleton they fill.

Streaming quantization, residuals and the large-model path read each decoder layer's weights only when
its turn comes: safetensors shards are memory-mapped (`safe_open`), a GGUF file is mapped by gguf-py's
reader and dequantized one tensor at a time through transformers' own GGUF name map and tensor
processors. Every weight the architecture needs is checked for presence and shape from the headers,
before any weight is read.
"""

from __future__ import annotations

import copy
import functools
import mmap
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from anybit.errors import AnybitError
from anybit.format.qtensor import all_finite
from anybit.format.shards import INDEX_FILE, read_index
from anybit.memory import return_freed_memory
from anybit.model.adapters import get_adapter


@contextmanager
def gguf_parsed_once() -> Iterator[None]:
    """Within the block each GGUF file is parsed once. transformers parses a GGUF's metadata afresh for its
    config, its tokenizer and its weights (6 s each for a 49k-token vocabulary on the development machine)
    and rebuilds the same tensor-name table for every module it maps; here gguf-py's reader of a file, the
    metadata transformers reads from it (handed out as copies) and that table are made once and shared."""
    import gguf
    import transformers.modeling_gguf_pytorch_utils as hf_gguf

    reader_class, name_map, load_checkpoint = gguf.GGUFReader, gguf.get_tensor_name_map, hf_gguf.load_gguf_checkpoint
    readers: dict[tuple[str, str], object] = {}
    metadata: dict[str, dict] = {}

    def shared_reader(path, mode="r"):
        key = (str(Path(path).resolve()), mode)
        if key not in readers:
            readers[key] = reader_class(path, mode)
        return readers[key]

    def shared_metadata(path, return_tensors=False, **kwargs):
        if return_tensors or kwargs:
            return load_checkpoint(path, return_tensors=return_tensors, **kwargs)
        key = str(Path(path).resolve())
        if key not in metadata:
            metadata[key] = load_checkpoint(path, return_tensors=False)
        return copy.deepcopy(metadata[key])  # callers may change what they get

    gguf.GGUFReader, gguf.get_tensor_name_map = shared_reader, functools.cache(name_map)
    hf_gguf.load_gguf_checkpoint = shared_metadata
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = reader_class, name_map
        hf_gguf.load_gguf_checkpoint = load_checkpoint


class WeightSource:
    """The float32 tensors of one model by their transformers parameter name."""

    path: Path

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Shape of every tensor the source holds, by parameter name (read from headers only)."""
        raise NotImplementedError

    def read(self, name: str) -> torch.Tensor:
        raise NotImplementedError

    def tensor(self, name: str, check_finite: bool = True) -> torch.Tensor:
        """The tensor of `name` in float32, checked to be finite."""
        try:
            t = self.read(name).float()
        except (OSError, SafetensorError, ValueError) as exc:
            raise AnybitError(f"corrupt weights file {self.path}: cannot read {name}: {exc}") from None
        if check_finite and not all_finite(t):
            raise AnybitError(f"cannot use model {self.path}: NaN or infinite weights in {name}")
        return t

    def close(self) -> None:
        pass


class SafetensorsSource(WeightSource):
    """A Hugging Face directory's safetensors file(s). Each read maps its file only while it copies the tensor
    out, so the pages read do not stay in the process's resident set."""

    def __init__(self, path: Path, skeleton: nn.Module) -> None:
        self.path = path
        index = path / INDEX_FILE
        if index.is_file():
            files = sorted(set(read_index(index).values()))
        else:
            files = sorted(p.name for p in path.glob("*.safetensors"))
        if not files:
            raise AnybitError(f"{path} holds no weights (no *.safetensors file)")
        self._where: dict[str, tuple[Path, str]] = {}  # parameter name -> (file, stored key)
        self._shapes: dict[str, tuple[int, ...]] = {}
        prefix = f"{skeleton.base_model_prefix}." if getattr(skeleton, "base_model_prefix", "") else ""
        wanted = {name for name, _ in skeleton.named_parameters()}
        for file in files:
            shard = path / file
            if not shard.is_file():
                raise AnybitError(f"{path}: the shard {file} named in {index.name} does not exist")
            try:
                with safe_open(shard, framework="pt") as handle:
                    for key in handle.keys():  # noqa: SIM118 - safe_open is not iterable
                        name = key if key in wanted or not prefix else f"{prefix}{key}"  # a bare model's checkpoint
                        self._where[name] = (shard, key)
                        self._shapes[name] = tuple(handle.get_slice(key).get_shape())
            except (OSError, SafetensorError) as exc:
                raise AnybitError(f"corrupt weights file {shard}: {exc}") from None

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return dict(self._shapes)

    def read(self, name: str) -> torch.Tensor:
        shard, key = self._where[name]
        with safe_open(shard, framework="pt") as handle:
            return handle.get_tensor(key)


class GGUFSource(WeightSource):
    """A GGUF file mapped by gguf-py; each tensor dequantized and turned to transformers' layout when read."""

    def __init__(self, path: Path, skeleton: nn.Module) -> None:
        from gguf import GGUFReader
        from transformers.modeling_gguf_pytorch_utils import (
            TENSOR_PROCESSORS,
            TensorProcessor,
            get_gguf_hf_weights_map,
            load_gguf_checkpoint,
            read_field,
        )

        self.path = path
        try:
            self._reader = GGUFReader(path)
            parsed = load_gguf_checkpoint(path, return_tensors=False)
            architecture = read_field(self._reader, "general.architecture")[0]
        except Exception as exc:
            raise AnybitError(f"corrupt GGUF file {path}: {exc}") from None
        self._processor = TENSOR_PROCESSORS.get(architecture, TensorProcessor)(config=parsed.get("config", {}))
        hf_names = get_gguf_hf_weights_map(skeleton, self._processor)
        self._where: dict[str, object] = {}
        self._shapes: dict[str, tuple[int, ...]] = {}
        for tensor in self._reader.tensors:
            shape = tuple(int(n) for n in reversed(tensor.shape.tolist()))
            # the processors only reorder and rename: a placeholder of the right shape says where a tensor goes
            placeholder = np.lib.stride_tricks.as_strided(np.zeros(1, np.uint8), shape, (0,) * len(shape))
            name, processed = self._process(tensor.name, placeholder, hf_names)
            if name is not None:
                self._where[name] = tensor
                self._shapes[name] = tuple(processed.shape)
        self._hf_names = hf_names

    def _process(self, gguf_name: str, weights: np.ndarray, hf_names: dict[str, str]) -> tuple[str | None, object]:
        side: dict = {"tensors": {}}
        result = self._processor.process(
            weights=weights, name=gguf_name, tensor_key_mapping=hf_names, parsed_parameters=side
        )
        if result.name in hf_names:
            return hf_names[result.name], result.weights
        if side["tensors"]:  # a processor that stores a tensor under its transformers name itself (GPT-2's head)
            ((name, value),) = side["tensors"].items()
            return name, value
        return None, None

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return dict(self._shapes)

    def read(self, name: str) -> torch.Tensor:
        from gguf import dequantize

        tensor = self._where[name]
        weights = dequantize(tensor.data, tensor.tensor_type)
        weights = weights.reshape(tuple(int(n) for n in reversed(tensor.shape.tolist())))
        _, processed = self._process(tensor.name, weights, self._hf_names)
        out = processed if torch.is_tensor(processed) else torch.from_numpy(np.array(processed, dtype=np.float32))
        self._drop_mapped_pages()
        return out

    def _drop_mapped_pages(self) -> None:
        """Let the pages of the mapped file read so far leave the resident set (they stay in the page cache)."""
        mapping = getattr(self._reader.data, "_mmap", None)
        if mapping is not None and hasattr(mmap, "MADV_DONTNEED"):
            mapping.madvise(mmap.MADV_DONTNEED)


@dataclass
class Skeleton:
    """A model built without weights (parameters on the meta device, buffers real) and where to read them."""

    model: nn.Module
    source: WeightSource

    def materialize(self, *modules: nn.Module, device: torch.device | str = "cpu") -> None:
        """Read the parameters of `modules` (each module's own, not its children's) from the source, in float32,
        onto `device`; a parameter tied to one elsewhere stays tied (the head to the embedding)."""
        names = {id(p): name for name, p in self.model.named_parameters()}

        def read(p: nn.Parameter) -> nn.Parameter:
            return nn.Parameter(self.source.tensor(names[id(p)]).to(device), requires_grad=False)

        self._replace(modules, read, True)

    def release(self, *modules: nn.Module) -> None:
        """Put the parameters of `modules` (each module's own) back on the meta device, freeing their memory."""
        self._replace(modules, lambda p: nn.Parameter(p.to("meta"), requires_grad=False), False)

    def _replace(self, modules: tuple[nn.Module, ...], make, from_meta: bool) -> None:
        """Replace the parameters of `modules` that are (from_meta) or are not on the meta device by `make(p)`,
        and the same parameter wherever else it is tied."""
        made: dict[int, nn.Parameter] = {}
        originals = []  # alive until the end, so that no new parameter takes an id in `made`
        for module in modules:
            for key, p in list(module._parameters.items()):
                if p is None or p.is_meta != from_meta:
                    continue
                if id(p) not in made:
                    made[id(p)] = make(p)
                    originals.append(p)
                module._parameters[key] = made[id(p)]
        for module in self.model.modules():  # a parameter tied to one elsewhere (the head to the embedding)
            for key, p in list(module._parameters.items()):
                if p is not None and id(p) in made:
                    module._parameters[key] = made[id(p)]

    def check(self) -> None:
        """Every parameter the architecture needs is in the source, in its shape; an AnybitError if not."""
        shapes = self.source.shapes()
        missing, wrong = [], []
        for name, p in self.model.named_parameters():
            if name not in shapes:
                missing.append(name)
            elif shapes[name] != tuple(p.shape):
                wrong.append(f"{name} {shapes[name]} (expected {tuple(p.shape)})")
        where = self.source.path
        if missing:
            raise AnybitError(f"cannot load model {where}: no weights for {name_list(missing)}")
        if wrong:
            raise AnybitError(f"cannot load model {where}: wrong shape for {name_list(wrong)}")

    def check_finite(self) -> None:
        """No weight is NaN or infinite (one tensor in memory at a time); an AnybitError naming them if any is."""
        bad = []
        for name, _ in self.model.named_parameters():
            tensor = self.source.tensor(name, check_finite=False)
            if tensor.is_floating_point() and not all_finite(tensor):
                bad.append(name)
            del tensor
        return_freed_memory()
        if bad:
            raise AnybitError(f"cannot use model {self.source.path}: NaN or infinite weights in {name_list(bad)}")


def first_line(exc: BaseException) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


def name_list(names: list[str]) -> str:
    """The first three names, and how many more."""
    return ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")


def hf_location(kind: str, path: Path) -> tuple[Path, dict]:
    """The directory and keyword arguments transformers reads a Hugging Face directory ("hf") or a GGUF file from."""
    return (path, {}) if kind == "hf" else (path.parent, {"gguf_file": path.name})


def weightless_model(config, dtype: torch.dtype, what: str) -> nn.Module:
    """The model `config` describes, its parameters on the meta device; a config transformers cannot build a
    model from is an AnybitError starting with `what`."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    try:
        with init_empty_weights(include_buffers=False):
            return AutoModelForCausalLM.from_config(config, dtype=dtype)
    except Exception as exc:  # transformers' own checks raise many kinds (ValueError, ZeroDivisionError, ...)
        raise AnybitError(f"{what}: {first_line(exc)}") from None


def open_skeleton(kind: str, path: Path) -> Skeleton:
    """The weightless model of a Hugging Face directory or GGUF file and its weight source, checked."""
    from transformers import AutoConfig

    where, kwargs = hf_location(kind, path)
    try:
        config = AutoConfig.from_pretrained(where, **kwargs)
    except Exception as exc:
        what = f"corrupt GGUF file {path}" if kind == "gguf" else f"cannot read {path / 'config.json'}"
        raise AnybitError(f"{what}: {first_line(exc)}") from None
    get_adapter(config.model_type)
    model = weightless_model(config, torch.float32, f"cannot build the model of {path}")
    model.tie_weights()
    model.eval()
    model.requires_grad_(False)
    source = SafetensorsSource(path, model) if kind == "hf" else GGUFSource(path, model)
    skeleton = Skeleton(model, source)
    try:
        skeleton.check()
        skeleton.check_finite()
    except BaseException:
        source.close()
        raise
    return skeleton
