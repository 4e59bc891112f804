"""Tables for the terminal and the summary of a quantized directory."""

from __future__ import annotations

from pathlib import Path

from safetensors import SafetensorError, safe_open

from anybit.errors import AnybitError
from anybit.format.io import WEIGHTS_FILE, read_quant_info

DTYPE_BYTES = {"U8": 1, "I8": 1, "I16": 2, "F16": 2, "BF16": 2, "I32": 4, "F32": 4, "I64": 8, "F64": 8}


def format_table(rows: list[dict], title: str = "") -> str:
    """A plain-text table: model, method, counted bits per weight, file size, perplexity."""
    header = f"{'method':<24} {'bits/weight':>11} {'size':>10} {'ppl':>10}  model"
    lines = [title, header, "-" * len(header)] if title else [header, "-" * len(header)]
    for r in rows:
        lines.append(f"{r['method']:<24} {r['bits_per_weight']:>11.4f} {r['size']:>10} {r['ppl']:>10.3f}  {r['model']}")
    return "\n".join(lines)


def inspect_directory(path: Path) -> dict:
    """Per-linear layout and stored bytes, measured from the safetensors header of `path`."""
    info = read_quant_info(path)
    weights = path / WEIGHTS_FILE
    try:
        with safe_open(weights, "pt") as f:
            sizes = {}
            for key in f.keys():  # noqa: SIM118 - safe_open is not iterable
                sl = f.get_slice(key)
                n = 1
                for d in sl.get_shape():
                    n *= d
                sizes[key] = n * DTYPE_BYTES[sl.get_dtype()]
    except (OSError, SafetensorError) as exc:
        raise AnybitError(f"corrupt or missing {weights}: {exc}") from exc
    rows, total_bytes, total_weights = [], 0, 0
    for name, meta in info["layers"].items():
        stored = sum(v for k, v in sizes.items() if k.startswith(f"{name}.") and k != f"{name}.bias")
        numel = meta["shape"][0] * meta["shape"][1]
        rows.append({"name": name, **meta, "bytes": stored, "bits_per_weight": 8 * stored / numel})
        total_bytes += stored
        total_weights += numel
    return {
        "layers": rows,
        "method": info["method"],
        "quantized_weights": total_weights,
        "quantized_bytes": total_bytes,
        "bits_per_weight": 8 * total_bytes / total_weights,
        "file_bytes": weights.stat().st_size,
    }
