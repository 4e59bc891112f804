"""The steps the CLI composes: quantize a model spec to a directory, evaluate a model spec."""

from __future__ import annotations

import math
import time
import warnings
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from anybit.calibrate import QuantReport, quantize_model
from anybit.config import E2E_LR, QuantConfig, check_device_name, compute_dtype
from anybit.data import calibration_windows, check_token_ids, eval_windows, load_corpus, tokenize_corpus
from anybit.errors import AnybitError
from anybit.eval.perplexity import EvalResult, evaluate
from anybit.format.directory import check_output
from anybit.format.files import check_writable_dir
from anybit.format.shards import stored_bytes
from anybit.layerwise import Streamed
from anybit.memory import return_freed_memory
from anybit.methods import get_method
from anybit.model.adapters import get_adapter
from anybit.model.checkpoint import (
    CheckpointWriter,
    load_residuals,
    own_state,
    packed_fingerprint,
    save_quantized,
    save_residuals,
    tied_aliases,
)
from anybit.model.loading import LoadedModel, load_model, load_tokenizer, resolve_spec
from anybit.model.sources import Skeleton, gguf_parsed_once, open_skeleton
from anybit.runtime.dec import (
    FIT_RIDGE,
    RESIDUAL_BITS,
    CalibrationStats,
    DecPlan,
    compensation,
    quantize_residual,
)
from anybit.runtime.head import HeadInfo, quantize_head
from anybit.runtime.qlinear import dense_weights, quant_linears, set_kernel
from anybit.tune import tune_model


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
        return stored_bytes(self.out_dir)


def check_device(device: str) -> None:
    """An AnybitError unless `device` is a well-formed name of a device present here."""
    check_device_name(device)
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise AnybitError(f"device {device} requested but CUDA is not available")
    if device.startswith("cuda:") and int(device[5:]) >= torch.cuda.device_count():
        raise AnybitError(f"device {device} requested but there are {torch.cuda.device_count()} CUDA devices")


def corpus_ids(loaded: LoadedModel, corpus: str) -> torch.Tensor:
    """A corpus (name or text file) tokenized by the model's tokenizer, every id checked against its embedding."""
    return _corpus_ids(loaded.tokenizer, loaded.model, corpus)


def _corpus_ids(tokenizer, model: torch.nn.Module, corpus: str) -> torch.Tensor:
    ids = tokenize_corpus(tokenizer, load_corpus(corpus))
    return check_token_ids(ids, model.get_input_embeddings().num_embeddings)


def quantize_to_dir(
    spec: str,
    config: QuantConfig,
    out_dir: str | Path,
    force: bool = False,
    progress: bool = True,
    loaded: LoadedModel | None = None,
) -> QuantizeOutcome:
    """Quantize the model `spec` with `config` and write `out_dir`.

    The model is streamed: its decoder layers are read from its files one at a time, quantized, written
    and freed, so peak memory is about one layer, not the model. With `loaded` (a model already in
    memory), that model is quantized in place instead; both give the same tensors.
    """
    check_device(config.device)
    kind, path = resolve_spec(spec)
    out_dir = check_output(out_dir, force, sources=(path,))
    if kind == "quantized":
        raise AnybitError(f"{spec} is already quantized; quantize the original model instead")
    needs_calibration = get_method(config.method).needs_stats
    info = {"method": config.method, "source": spec, "config": config.to_dict()}
    if loaded is not None:
        calib = _calibration(loaded.tokenizer, loaded.model, config) if needs_calibration else None
        report = quantize_model(loaded.model, config, calib, progress=progress)
        meta = save_quantized(loaded.model, loaded.tokenizer, out_dir, {**info, **report.info()}, force=force)
        return QuantizeOutcome(out_dir, meta, report)
    with gguf_parsed_once():
        skeleton = open_skeleton(kind, path)
        try:
            model, tokenizer = skeleton.model, load_tokenizer(kind, path)
            calib = _calibration(tokenizer, model, config) if needs_calibration else None
            layers_prefix = f"{get_adapter(model).layers_path}."
            with CheckpointWriter(out_dir, tied_aliases(model)) as writer:
                report = quantize_model(
                    model,
                    config,
                    calib,
                    progress=progress,
                    supply=Streamed(skeleton),
                    on_layer=lambda index, layer: writer.add(layer, f"{layers_prefix}{index}."),
                )
                _write_outside(skeleton, writer)
                meta = writer.finish(model.config, tokenizer, {**info, **report.info()})
        finally:
            skeleton.source.close()
    return QuantizeOutcome(out_dir, meta, report)


def tune_to_dir(
    quant_dir: str | Path,
    out_dir: str | Path,
    steps: int,
    lr: float = E2E_LR,
    nsamples: int = 32,
    seqlen: int = 2048,
    calib: str = "wikitext2-valid",
    source: str | None = None,
    force: bool = False,
    progress: bool = True,
    device: str = "cpu",
) -> dict:
    """Tune a quantized directory end to end toward its source model (`tune.tune_model`: codes fixed,
    codebooks or scales and norms trained on the calibration windows, in float32, on `device`) and write the
    result to `out_dir`; returns its anybit.json. The counted bits do not change."""
    quant_dir = Path(quant_dir)
    loaded = load_model(str(quant_dir))
    if loaded.kind != "quantized":
        raise AnybitError(f"{quant_dir} is not a quantized directory")
    out = check_output(out_dir, force, sources=(quant_dir,))
    source = source or loaded.quant_info.get("source")
    if source is None:
        raise AnybitError(f"{quant_dir} does not record its source model; pass --source")
    if nsamples < 2:
        raise AnybitError("end-to-end tuning needs at least 2 calibration windows (one is held out to judge it)")
    teacher = load_model(source)
    windows = calibration_windows(corpus_ids(loaded, calib), nsamples, seqlen, seed=0)
    start = time.perf_counter()
    model, teacher_model = loaded.model.to(device), teacher.model.to(device)
    result = tune_model(model, teacher_model, windows.to(device), steps, lr, progress=progress)
    model.to("cpu")
    del teacher, teacher_model
    record = {
        "steps": steps, "lr": lr, "nsamples": nsamples, "seqlen": seqlen, "calib": calib, "source": source,
        "before": result.before, "after": result.after, "kept": result.kept, "device": device,
        "seconds": round(time.perf_counter() - start, 1),
    }  # fmt: skip
    earlier = loaded.quant_info.get("end_to_end_tuning")
    if earlier:  # a further pass: the passes before it stay on record, oldest first
        record["earlier"] = [*earlier.get("earlier", []), {k: v for k, v in earlier.items() if k != "earlier"}]
    info = {**loaded.quant_info, "end_to_end_tuning": record}
    return save_quantized(loaded.model, loaded.tokenizer, out, info, force=force)


def _write_outside(skeleton: Skeleton, writer: CheckpointWriter) -> None:
    """Write what the decoder layers leave (embeddings, final norm, head), one module's weights in memory at a
    time; the layers themselves are already written and gone."""
    for name, module in skeleton.model.named_modules():
        prefix = f"{name}." if name else ""
        if all(key in writer.aliases for key in own_state(module, prefix)):
            continue  # nothing of its own to store (or only a parameter tied to one stored elsewhere)
        skeleton.materialize(module)
        writer.add(module, prefix, recurse=False)
        skeleton.release(module)


def _calibration(tokenizer, model: torch.nn.Module, config: QuantConfig) -> torch.Tensor:
    ids = _corpus_ids(tokenizer, model, config.calib)
    return calibration_windows(ids, config.nsamples, config.seqlen, config.seed)


def configure_runtime(loaded: LoadedModel, kernel: str = "auto", head: str = "dense", tables: str = "int8") -> HeadInfo:
    """Ask every quantized linear for `kernel` (`runtime.qlinear.KERNELS`) with the fast kernel's `tables`
    (`kernels.cpu_fast.TABLES`) and, for a quantized directory with `head="int8"`, pack its embedding and
    output head to 8 bits (`runtime.head`); what the head holds."""
    set_kernel(loaded.model, kernel, tables)
    info = quantize_head(loaded.model, head if loaded.kind == "quantized" else "dense")
    return_freed_memory()  # the dense embedding, just replaced
    return info


def evaluate_spec(
    loaded: LoadedModel,
    dataset: str = "wikitext2",
    seqlen: int = 2048,
    max_windows: int | None = None,
    device: str = "cpu",
    dtype: str = "auto",
    reference: LoadedModel | None = None,
    progress: bool = True,
    dec: DecPlan | int | str | None = None,
    dec_static: bool = False,
    dec_score: str = "activation",
    kernel: str = "exact",
    head: str = "dense",
    tables: str = "int8",
) -> EvalResult:
    """Perplexity of a loaded model on a corpus (and KL/top-1 against `reference` if given).

    `dec` (a k_chunk or a `DecPlan`) turns on dynamic error compensation from the directory's stored
    residuals. `kernel`, `head` and `tables` choose the runtime (`configure_runtime`): by default the exact
    products and the stored head, so that figures measure the quantization alone.
    """
    check_device(device)
    configure_runtime(loaded, kernel, head, tables)
    torch_dtype = getattr(torch, compute_dtype(dtype, device))
    windows = eval_windows(corpus_ids(loaded, dataset), seqlen, max_windows)
    model = loaded.model.to(device=device, dtype=torch_dtype)
    ref = None if reference is None else reference.model.to(device=device, dtype=torch_dtype)
    with dec_compensation(loaded, dec, dec_static, dec_score):
        result = evaluate(
            model, windows, device=device, reference=ref, progress=progress, desc=Path(loaded.source).name
        )
    if not math.isfinite(result.ppl):
        result.ppl = float("inf")
    return result


def dec_plan(value: DecPlan | int | str | None, option: str = "--dec") -> DecPlan | None:
    """A `DecPlan` from a k_chunk or its text form ("8", "qkv=4,down=16", "8,down=16"); None stays None."""
    if value is None or isinstance(value, DecPlan):
        return value
    try:
        return DecPlan.parse(value)
    except ValueError as exc:
        raise AnybitError(f"{option}: {exc}") from None


def dec_compensation(
    loaded: LoadedModel, plan: DecPlan | int | str | None, static: bool = False, score: str = "activation"
) -> AbstractContextManager:
    """Context in which a quantized model's linears add their residual compensation, k_chunk per layer
    type from `plan` (a no-op for None); `score` is how channels are ranked (`runtime.dec.compensate.DEC_SCORES`)."""
    plan = dec_plan(plan)
    if plan is None:
        if static:
            raise AnybitError("--dec-static needs --dec K")
        return nullcontext()
    if loaded.kind != "quantized":
        raise AnybitError("--dec needs a quantized directory (with residuals)")
    residuals, means, meta = load_residuals(loaded.source)
    if meta.get("model_fingerprint") != packed_fingerprint(loaded.model):
        raise AnybitError(
            f"the residuals in {loaded.source} were not computed for this quantized model; "
            f"run `anybit residual {loaded.source}` again"
        )
    if "fit_k" in meta and (static or DecPlan.parse(meta["fit_k"]) != plan):
        warnings.warn(
            f"anybit: the residuals of {loaded.source} were fitted for dynamic --dec {meta['fit_k']}, "
            f"not {'static ' if static else ''}--dec {plan}",
            stacklevel=2,
        )
    layers = dict(quant_linears(loaded.model))
    shapes = {name: (layer.out_features, layer.in_features) for name, layer in layers.items()}
    if shapes != {name: (r.out_features, r.in_features) for name, r in residuals.items()}:
        raise AnybitError(f"residuals in {loaded.source} do not match its quantized layers")
    k_chunks = plan.for_layers(layers, get_adapter(loaded.model))
    return compensation(layers, residuals, k_chunks, means if static else None, score)


def _source_skeleton(spec: str) -> Skeleton:
    """The weightless skeleton of an original (unquantized) model, its weights to be read one linear at a time."""
    kind, path = resolve_spec(spec)
    if kind == "quantized":
        raise AnybitError(f"{spec} is a quantized directory; the residuals need the original model")
    with gguf_parsed_once():
        return open_skeleton(kind, path)


def _source_weight(original: Skeleton, adapter, name: str, spec: str) -> torch.Tensor:
    """The fp16 (out, in) weight of linear `name`, read from the original model's files."""
    try:
        module = original.model.get_submodule(name)
    except AttributeError:
        raise AnybitError(f"{spec} has no layer {name}: it is not the source of this quantized model") from None
    original.materialize(module)
    try:
        return adapter.weight_of(module).half()
    finally:
        original.release(module)


@torch.inference_mode()
def build_residuals(
    quant_dir: str | Path,
    source: str | None = None,
    nsamples: int = 8,
    seqlen: int = 2048,
    calib: str = "wikitext2-valid",
    dtype: str = "auto",
    progress: bool = True,
    fit_k: DecPlan | int | str | None = None,
    ridge: float = FIT_RIDGE,
) -> dict:
    """Compute and store the 4-bit residuals W − Q(W) of a quantized directory, plus the calibration
    mean |x| per input channel (for the static-selection baseline). Returns the residual metadata.

    With `fit_k` (a k_chunk or a `DecPlan`), each stored matrix is instead the correction fitted on the
    calibration data for dynamic selection at that plan (`anybit.runtime.dec.fit_correction`)."""
    fit_k = dec_plan(fit_k, "--fit")
    loaded = load_model(str(quant_dir))
    check_writable_dir(Path(quant_dir))  # before the calibration pass, not after it
    if loaded.kind != "quantized":
        raise AnybitError(f"{quant_dir} is not a quantized directory")
    source = source or loaded.quant_info.get("source")
    if source is None:
        raise AnybitError(f"{quant_dir} does not record its source model; pass --source")
    original = _source_skeleton(source)
    adapter = get_adapter(original.model.config.model_type)
    layers = dict(quant_linears(loaded.model))
    residuals, errors = {}, {}  # errors: float32 R = W − Ŵ, kept only to be fitted after the calibration pass
    try:
        for name, layer in tqdm(layers.items(), desc="residuals", unit="linear", disable=not progress):
            W = _source_weight(original, adapter, name, source)
            if W.shape != (layer.out_features, layer.in_features):
                raise AnybitError(f"{source} does not match {quant_dir}: {name} has shape {tuple(W.shape)}")
            R = W.float() - layer.dequantize().float()
            if fit_k is None:
                residuals[name] = quantize_residual(R)
            else:
                errors[name] = R
    finally:
        original.source.close()
    ids = corpus_ids(loaded, calib)
    windows = calibration_windows(ids, nsamples, seqlen, seed=0)
    model = loaded.model.to(dtype=getattr(torch, compute_dtype(dtype)))
    stats = CalibrationStats(layers, None if fit_k is None else fit_k.for_layers(layers, adapter))
    try:
        with dense_weights(model, skip_kernel_layers=True):
            for window in tqdm(windows, desc="activation statistics", unit="window", disable=not progress):
                model(window[None], use_cache=False)
    finally:
        stats.remove()
    for name, R in errors.items():
        residuals[name] = stats.fit(name, R, ridge)
    means = stats.mean_abs()
    info = {
        "model_fingerprint": packed_fingerprint(loaded.model),
        "source": source,
        "bits": RESIDUAL_BITS,
        "calib": calib,
        "nsamples": nsamples,
        "seqlen": seqlen,
    }
    if fit_k is not None:
        info |= {"fit_k": fit_k.to_json(), "ridge": ridge}
    return save_residuals(quant_dir, residuals, means, info)
