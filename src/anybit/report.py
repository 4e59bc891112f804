"""Tables for the terminal, the summary of a quantized directory, and pictures (bit maps, perplexity
against counted bits)."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch
from torch import nn

from anybit.errors import AnybitError
from anybit.format.files import make_temp_file
from anybit.format.shards import stored_bytes
from anybit.methods import METHODS, get_method
from anybit.model.checkpoint import load_quantized
from anybit.quant.groups import DEFAULT_GROUP
from anybit.runtime.qlinear import quant_linears


def format_table(rows: list[dict], title: str = "") -> str:
    """A plain-text table: model, method, counted bits per weight, file size, perplexity."""
    header = f"{'method':<24} {'bits/weight':>11} {'size':>10} {'ppl':>10}  model"
    lines = [title, header, "-" * len(header)] if title else [header, "-" * len(header)]
    for r in rows:
        lines.append(f"{r['method']:<24} {r['bits_per_weight']:>11.4f} {r['size']:>10} {r['ppl']:>10.3f}  {r['model']}")
    return "\n".join(lines)


def inspect_directory(path: Path) -> dict:
    """Per-linear layout and stored bytes of a quantized directory, measured from its tensors after the
    same checks as any load."""
    _, info = _load_checked(path)
    rows = []
    for name, layer in info["layers"].items():
        numel = layer["shape"][0] * layer["shape"][1]
        rows.append(
            {
                "name": name,
                **layer,
                "bytes": layer["storage_bits"] // 8,
                "bits_per_weight": layer["storage_bits"] / numel,
            }
        )
    return {
        "layers": rows,
        "notes": _group_notes(info) + _tuning_notes(info) + _end_to_end_notes(info),
        "method": info["method"],
        "quantized_weights": info["quantized_weights"],
        "quantized_bytes": info["storage_bits"] // 8,
        "bits_per_weight": info["bits_per_weight"],
        "file_bytes": stored_bytes(path),
    }


def _tuning_notes(info: dict) -> list[str]:
    """What block-wise tuning (--tune-steps) did to the layers' held-out errors, as the run recorded it."""
    tuning = info.get("tuning")
    if not tuning:
        return []
    kept = [t for t in tuning if t["kept"]]
    note = f"tuned block by block ({info['config'].get('tune_steps')} steps): {len(kept)} of {len(tuning)} layers kept"
    if kept:
        changes = [100 * (1 - t["after"] / t["before"]) for t in kept if t["before"] > 0]
        note += f", held-out error lower by {min(changes):.1f}-{max(changes):.1f} %"
    return [note]


def _end_to_end_notes(info: dict) -> list[str]:
    """What end-to-end tuning (`anybit tune`) did to the held-out KL, as the run recorded it."""
    record = info.get("end_to_end_tuning")
    if not record:
        return []
    return [_end_to_end_note(earlier) for earlier in record.get("earlier", [])] + [_end_to_end_note(record)]


def _end_to_end_note(record: dict) -> str:
    verdict = "kept" if record["kept"] else "not kept"
    return (
        f"tuned end to end ({record['steps']} steps): held-out KL {record['before']:.4f} -> {record['after']:.4f}, "
        f"{verdict}"
    )


def _group_notes(info: dict) -> list[str]:
    """Where a run without --group gave a matrix another group than the default (it does not divide its inputs)."""
    if info.get("config", {}).get("group_size", DEFAULT_GROUP) is not None:
        return []
    if info["method"] not in METHODS or not get_method(info["method"]).takes("group_size"):
        return []
    other: dict[tuple[int, int], list[str]] = {}
    for name, layer in info["layers"].items():
        if layer["group_size"] != DEFAULT_GROUP:
            other.setdefault((layer["shape"][1], layer["group_size"]), []).append(name)
    notes = []
    for (in_features, group), names in sorted(other.items()):
        used = "per channel" if group == in_features else f"group {group}"
        notes.append(
            f"the default group {DEFAULT_GROUP} does not divide {in_features} inputs: {len(names)} linear(s) use "
            f"{used} ({names[0]}{', ...' if len(names) > 1 else ''})"
        )
    return notes


def _load_checked(path: Path) -> tuple[nn.Module, dict]:
    """The quantized model in `path` and its measured summary; an AnybitError for anything else."""
    model, _, info = load_quantized(path)
    return model, info


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise AnybitError("plotting needs matplotlib: pip install 'anybit[plot]'") from None
    return plt


def check_picture_output(out_png: Path, force: bool) -> None:
    """An AnybitError unless a picture may be written at `out_png`: a new file, or (with `force`) a file that
    is there; checked before any work."""
    if out_png.is_dir():
        raise AnybitError(f"{out_png} is a directory; give a file name for the picture")
    if out_png.exists() and not force:
        raise AnybitError(f"{out_png} exists; pass --force to replace it")
    if not out_png.parent.is_dir():
        raise AnybitError(f"cannot write {out_png}: no directory {out_png.parent}")


def save_figure(fig, out_png: Path) -> Path:
    """Write a matplotlib figure to `out_png` atomically (a temporary beside it, then renamed)."""
    plt = _pyplot()
    tmp = None
    try:
        tmp = make_temp_file(out_png, suffix=".png")
        fig.savefig(tmp, dpi=110)
        os.replace(tmp, out_png)
    except OSError as exc:
        raise AnybitError(f"cannot write {out_png}: {exc.strerror or exc}") from None
    finally:
        if tmp is not None:
            tmp.unlink(missing_ok=True)
        plt.close(fig)
    return out_png


def read_results(paths: list[Path]) -> list[dict]:
    """The records with a finite perplexity ("ppl") in files of JSON lines (as `anybit eval --json` prints
    them); an AnybitError naming the file and line of anything that is not a JSON object, or when none has one."""
    records = []
    for path in paths:
        try:
            lines = path.read_text().splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise AnybitError(f"cannot read {path}: {getattr(exc, 'strerror', None) or exc}") from None
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError:
                record = None
            if not isinstance(record, dict):
                raise AnybitError(f"{path}:{number} is not a JSON object (give the lines `anybit eval --json` prints)")
            if _finite_number(record.get("ppl")):
                records.append(record)
    if not records:
        raise AnybitError(f"no perplexity in {', '.join(map(str, paths))} (give the lines `anybit eval --json` prints)")
    return records


def _finite_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def quality_series(records: list[dict]) -> tuple[dict[str, list[tuple[float, float]]], dict[str, float]]:
    """Points (counted bits, perplexity) per method, and the perplexity of each unquantized model (records
    without counted bits), by label; labels name the corpus where the records come from more than one."""
    corpora = {record.get("dataset") for record in records}
    series: dict[str, list[tuple[float, float]]] = {}
    references: dict[str, float] = {}
    for record in records:
        corpus = f" [{record.get('dataset')}]" if len(corpora) > 1 else ""
        bits = record.get("bits_per_weight")
        if _finite_number(bits):
            series.setdefault(f"{record.get('method', 'quantized')}{corpus}", []).append((bits, record["ppl"]))
        else:
            references[f"{record.get('model', 'unquantized')}{corpus}"] = record["ppl"]
    return series, references


def plot_quality(
    series: dict[str, list[tuple[float, float]]],
    references: dict[str, float],
    out_png: Path,
    title: str = "Perplexity against counted bits per weight",
    ylabel: str = "perplexity",
) -> Path:
    """One marker series per label (points joined in order of bits), each reference as a dashed line, log
    perplexity; written atomically to `out_png`."""
    plt = _pyplot()
    import matplotlib

    fig, ax = plt.subplots(figsize=(7.5, 5), constrained_layout=True)
    markers = "osD^v<>ph*X"
    for i, (label, points) in enumerate(sorted(series.items())):
        points = sorted(points)
        ax.plot(
            [p[0] for p in points],
            [p[1] for p in points],
            marker=markers[i % len(markers)],
            color=matplotlib.colormaps["tab20"](i % 20),  # the default cycle repeats after 10 series
            label=label,
        )
    for j, (label, ppl) in enumerate(sorted(references.items())):
        ax.axhline(ppl, color="black", linestyle=("--", ":", "-.")[j % 3], linewidth=1, label=f"{label} ({ppl:.2f})")
    ax.set_yscale("log")
    ax.set_xlabel("counted bits per weight (codes, scales, codebooks, maps, outliers)")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    return save_figure(fig, out_png)


def plot_bit_map(path: Path, out_png: Path) -> Path:
    """Picture of a quantized DIR: the width of every output row (or input column, for per-column
    layouts) of every linear, one panel per linear kind, layers along x; and counted bits per layer."""
    plt = _pyplot()
    model, info = _load_checked(path)
    kinds: dict[str, dict[int, torch.Tensor]] = {}
    layer_bits: dict[int, list[float]] = {}
    for name, module in quant_linears(model):
        qt = module.qtensor
        index, kind = _layer_index(name)
        kinds.setdefault(kind, {})[index] = qt.line_bits()
        layer_bits.setdefault(index, [0.0, 0.0])
        layer_bits[index][0] += qt.storage_bits()
        layer_bits[index][1] += qt.numel
    fig, axes = plt.subplots(1, len(kinds) + 1, figsize=(2.2 * (len(kinds) + 1), 4.5), constrained_layout=True)
    top = max(float(v.max()) for per in kinds.values() for v in per.values())
    for ax, (kind, per_layer) in zip(axes, kinds.items(), strict=False):
        layers = sorted(per_layer)
        lines = max(per_layer[i].numel() for i in layers)
        grid = torch.full((lines, len(layers)), float("nan"))
        for j, i in enumerate(layers):
            grid[: per_layer[i].numel(), j] = per_layer[i]
        image = ax.imshow(grid.numpy(), aspect="auto", interpolation="nearest", vmin=1, vmax=top, cmap="viridis")
        ax.set_title(kind, fontsize=9)
        ax.set_xlabel("layer")
    axes[0].set_ylabel("row (or column) index")
    fig.colorbar(image, ax=axes[len(kinds) - 1], label="bits per code")
    layers = sorted(layer_bits)
    axes[-1].bar(layers, [layer_bits[i][0] / layer_bits[i][1] for i in layers], color="gray")
    axes[-1].set_title("counted bits/weight", fontsize=9)
    axes[-1].set_xlabel("layer")
    fig.suptitle(f"{path.name}: {info['method']}, {info['bits_per_weight']:.3f} counted bits/weight", fontsize=10)
    return save_figure(fig, out_png)


def _layer_index(name: str) -> tuple[int, str]:
    """(decoder-layer index, linear kind) of a dotted linear name such as model.layers.3.mlp.up_proj."""
    parts = name.split(".")
    for i, part in enumerate(parts):
        if part.isdigit():
            return int(part), ".".join(parts[i + 1 :]).split(".")[-1]
    return 0, parts[-1]
