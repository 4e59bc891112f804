"""The quantized model directory on disk: its file names, its anybit.json, and which directories anybit
may write or replace. Storage only: nothing here imports torch modules, the runtime or the model code.

Layout of DIR:
- `model.safetensors` (or, for a large model, shards `model-0000i-of-0000N.safetensors` and their
  `model.safetensors.index.json`, as `anybit.format.shards` writes them): every tensor of the model;
  quantized linears as their packed buffers (`<linear>.codes_4`, `<linear>.scales`, ...), all other
  parameters in fp16;
- `anybit.json`: format name and version, the quantization config, per-linear layout metadata,
  tied-parameter aliases, the counted bits, and the list of files anybit wrote;
- `config.json` and the tokenizer files, as Hugging Face writes them; config.json's `quantization_config`
  (`transformers_quantization_config`) lets transformers load the directory once anybit is imported;
- `residuals.safetensors` (optional): the residuals of dynamic error compensation.
"""

from __future__ import annotations

import json
from pathlib import Path

from anybit.errors import AnybitError
from anybit.format.files import check_writable_dir, remove_stale_temporaries, temporary_target
from anybit.format.shards import WEIGHTS_FILE

FORMAT_NAME = "anybit"
FORMAT_VERSION = 1
QUANT_FILE = "anybit.json"
RESIDUAL_FILE = "residuals.safetensors"


# what anybit writes into a directory, for older directories whose anybit.json has no "files" list
LEGACY_FILES = frozenset(
    {QUANT_FILE, WEIGHTS_FILE, "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
     "special_tokens_map.json", "chat_template.jinja", "vocab.json", "merges.txt", "tokenizer.model",
     "added_tokens.json"}
)  # fmt: skip


def transformers_quantization_config(info: dict) -> dict:
    """The `quantization_config` of config.json: names anybit as the method that loads the directory."""
    return {
        "quant_method": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "method": info["method"],
        "bits_per_weight": info["bits_per_weight"],
    }


def check_output(out_dir: str | Path, force: bool, sources: tuple[Path, ...] = ()) -> Path:
    """Before any work: the output directory anybit may write, or an AnybitError saying why not.

    An existing `out_dir` is replaced only with `force`, and only when it is an anybit output holding
    nothing but the files anybit wrote; never a source model or a directory holding one. Stale
    temporaries of earlier, killed writes are removed, and the parent is proven writable.
    """
    out = Path(out_dir).expanduser()
    for source in sources:
        if out.resolve() == source.resolve() or out.resolve() in source.resolve().parents:
            raise AnybitError(f"refusing to write {out}: it would replace the source model {source}")
    if out.exists() or out.is_symlink():
        if out.is_symlink() or not out.is_dir():
            raise AnybitError(f"output {out} exists and is not a directory anybit wrote")
        if not force:
            raise AnybitError(f"output {out} already exists (use --force to replace it)")
        problem = _not_ours(out)
        if problem:
            raise AnybitError(f"refusing to replace {out}: {problem}")
    remove_stale_temporaries(out)
    check_writable_dir(out.parent)
    return out


def _not_ours(directory: Path) -> str:
    """Why `directory` is not an anybit output that may be replaced ("" when it is)."""
    try:
        info = json.loads((directory / QUANT_FILE).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return f"it is not an anybit output (no readable {QUANT_FILE})"
    if not isinstance(info, dict) or info.get("format") != FORMAT_NAME:
        return f"it is not an anybit output ({QUANT_FILE} is not anybit's)"
    files = info.get("files", sorted(LEGACY_FILES))
    if not isinstance(files, list) or not all(isinstance(name, str) for name in files):
        return f"its {QUANT_FILE} has a damaged list of files"
    allowed = {*files, RESIDUAL_FILE}
    for entry in directory.iterdir():
        name = temporary_target(entry.name) or entry.name  # a killed `anybit residual` leaves one
        if entry.is_symlink() or not entry.is_file() or name not in allowed:
            return f"it holds {entry.name}, which anybit did not write"
    return ""


def read_quant_info(path: str | Path) -> dict:
    """anybit.json of a quantized directory, checked to be ours and to have every field this anybit reads."""
    path = Path(path)
    try:
        info = json.loads((path / QUANT_FILE).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AnybitError(f"{path} is not a readable anybit directory: {exc}") from exc
    if not isinstance(info, dict) or info.get("format") != FORMAT_NAME:
        raise AnybitError(f"{path / QUANT_FILE} is not an anybit quantization file")
    if info.get("format_version") != FORMAT_VERSION:
        raise AnybitError(f"{path} has format version {info.get('format_version')}, this anybit reads {FORMAT_VERSION}")
    problem = _info_problem(info)
    if problem:
        raise AnybitError(f"corrupt {path / QUANT_FILE}: {problem}")
    return info


_INFO_FIELDS = {
    "method": str,
    "source": str,
    "config": dict,
    "aliases": dict,
    "layers": dict,
    "quantized_weights": int,
    "storage_bits": int,
    "bits_per_weight": (int, float),
    "nominal_bits_per_weight": (int, float),
}
_LAYER_FIELDS = {"shape": list, "group_size": int, "axis": int, "kind": str, "storage_bits": int}
_TUNING_FIELDS = {"before": (int, float), "after": (int, float), "kept": bool}  # optional "tuning" list, per layer


def _info_problem(info: dict) -> str:
    """What is wrong with the fields of an anybit.json ("" when nothing is)."""
    for key, kind in _INFO_FIELDS.items():
        if not isinstance(info.get(key), kind) or isinstance(info.get(key), bool):
            return f"field {key!r} is missing or not a {getattr(kind, '__name__', 'number')}"
    if not info["layers"]:
        return "no quantized layers"
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in info["aliases"].items()):
        return "aliases must map names to names"
    for name, meta in info["layers"].items():
        if not isinstance(meta, dict):
            return f"layer {name}: not an object"
        for key, kind in _LAYER_FIELDS.items():
            if not isinstance(meta.get(key), kind) or isinstance(meta.get(key), bool):
                return f"layer {name}: field {key!r} is missing or not a {kind.__name__}"
    return _tuning_problem(info.get("tuning", [])) or _end_to_end_problem(info.get("end_to_end_tuning"))


def _has_fields(record: object, fields: dict) -> bool:
    """Whether `record` is a dict holding each field of `fields` with its type (a bool only where asked)."""
    return isinstance(record, dict) and all(
        isinstance(record.get(key), kind) and (kind is bool or not isinstance(record.get(key), bool))
        for key, kind in fields.items()
    )


def _end_to_end_problem(record: object) -> str:
    """What is wrong with the record of end-to-end tuning ("" when nothing is; it is optional)."""
    fields = {**_TUNING_FIELDS, "steps": int}
    if record is None:
        return ""
    earlier = record.get("earlier", []) if isinstance(record, dict) else None
    if _has_fields(record, fields) and isinstance(earlier, list) and all(_has_fields(r, fields) for r in earlier):
        return ""
    return (
        "field 'end_to_end_tuning' is not {steps: int, before: number, after: number, kept: bool, "
        "earlier: [such records], ...}"
    )


def _tuning_problem(tuning: object) -> str:
    """What is wrong with the record of block-wise tuning ("" when nothing is; it is optional)."""
    if not isinstance(tuning, list):
        return "field 'tuning' is not a list"
    for i, entry in enumerate(tuning):
        if not _has_fields(entry, _TUNING_FIELDS):
            return f"tuning entry {i} is not {{before: number, after: number, kept: bool}}"
    return ""
