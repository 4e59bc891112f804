"""The steps the CLI composes: quantize a model spec to a directory, evaluate a model spec."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from anybit.calibrate import QuantReport, quantize_model
from anybit.config import QuantConfig
from anybit.data import calibration_windows, eval_windows, load_corpus, tokenize_corpus
from anybit.errors import AnybitError
from anybit.eval.perplexity import EvalResult, evaluate
from anybit.format.io import WEIGHTS_FILE, save_quantized
from anybit.methods import get_method
from anybit.model.loading import LoadedModel, load_model


@dataclass
class QuantizeOutcome:
    out_dir: Path
    meta: dict
    report: QuantReport

    @property
    def bits_per_weight(self) -> float:
        return self.meta["bits_per_weight"]

    @property
    def file_bytes(self) -> int:
        return (self.out_dir / WEIGHTS_FILE).stat().st_size


def check_device(device: str) -> None:
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise AnybitError(f"device {device} requested but CUDA is not available")


def quantize_to_dir(
    spec: str,
    config: QuantConfig,
    out_dir: str | Path,
    force: bool = False,
    progress: bool = True,
    loaded: LoadedModel | None = None,
) -> QuantizeOutcome:
    """Load `spec` (unless already `loaded`), quantize it with `config`, and write `out_dir`."""
    out_dir = Path(out_dir).expanduser()
    if out_dir.exists() and not force:
        raise AnybitError(f"output {out_dir} already exists (use --force to replace it)")
    check_device(config.device)
    loaded = loaded or load_model(spec)
    if loaded.kind == "quantized":
        raise AnybitError(f"{spec} is already quantized; quantize the original model instead")
    calib = None
    if get_method(config.method).needs_stats:
        ids = tokenize_corpus(loaded.tokenizer, load_corpus(config.calib))
        calib = calibration_windows(ids, config.nsamples, config.seqlen, config.seed)
    report = quantize_model(loaded.model, config, calib, progress=progress)
    info = {"method": config.method, "source": spec, "config": config.to_dict(), "quantize_seconds": report.seconds}
    meta = save_quantized(loaded.model, loaded.tokenizer, out_dir, info, force=force)
    return QuantizeOutcome(out_dir, meta, report)


def evaluate_spec(
    loaded: LoadedModel,
    dataset: str = "wikitext2",
    seqlen: int = 2048,
    max_windows: int | None = None,
    device: str = "cpu",
    dtype: str = "float32",
    reference: LoadedModel | None = None,
    progress: bool = True,
) -> EvalResult:
    """Perplexity of a loaded model on a corpus (and KL/top-1 against `reference` if given)."""
    check_device(device)
    torch_dtype = getattr(torch, dtype)
    windows = eval_windows(tokenize_corpus(loaded.tokenizer, load_corpus(dataset)), seqlen, max_windows)
    model = loaded.model.to(device=device, dtype=torch_dtype)
    ref = None if reference is None else reference.model.to(device=device, dtype=torch_dtype)
    result = evaluate(model, windows, device=device, reference=ref, progress=progress, desc=Path(loaded.source).name)
    if not math.isfinite(result.ppl):
        result.ppl = float("inf")
    return result
