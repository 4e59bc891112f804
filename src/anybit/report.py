"""Tables for the terminal and the summary of a quantized directory."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from anybit.config import DEFAULT_GROUP
from anybit.errors import AnybitError
from anybit.format.shards import stored_bytes
from anybit.methods import METHODS, get_method
from anybit.model.checkpoint import load_quantized
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
    verdict = "kept" if record["kept"] else "not kept"
    return [
        f"tuned end to end ({record['steps']} steps): held-out KL {record['before']:.4f} -> {record['after']:.4f}, "
        f"{verdict}"
    ]


def _group_notes(info: dict) -> list[str]:
    """Where a run without --group gave a matrix another group than the default (it does not divide its inputs)."""
    if info.get("config", {}).get("group_size", DEFAULT_GROUP) is not None:
        return []
    if info["method"] not in METHODS or not get_method(info["method"]).uses_groups:
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


def plot_bit_map(path: Path, out_png: Path) -> Path:
    """Picture of a quantized DIR: the width of every output row (or input column, for per-column
    layouts) of every linear, one panel per linear kind, layers along x; and counted bits per layer."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise AnybitError("--plot needs matplotlib: pip install 'anybit[plot]'") from None
    model, info = _load_checked(path)
    kinds: dict[str, dict[int, torch.Tensor]] = {}
    layer_bits: dict[int, list[float]] = {}
    for name, module in quant_linears(model):
        qt = module.qtensor
        index, kind = _layer_index(name)
        kinds.setdefault(kind, {})[index] = qt.bitmap.float().mean(dim=1)
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
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png


def _layer_index(name: str) -> tuple[int, str]:
    """(decoder-layer index, linear kind) of a dotted linear name such as model.layers.3.mlp.up_proj."""
    parts = name.split(".")
    for i, part in enumerate(parts):
        if part.isdigit():
            return int(part), ".".join(parts[i + 1 :]).split(".")[-1]
    return 0, parts[-1]
