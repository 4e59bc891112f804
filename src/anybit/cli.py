"""The `anybit` command line."""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import click

from anybit.config import (
    AUTO_DTYPE_HELP,
    DTYPES,
    E2E_LR,
    MAX_TUNE_STEPS,
    OPTIONS,
    QuantConfig,
    compute_dtype,
    option_users,
)
from anybit.errors import AnybitError
from anybit.kernels.cpu_fast import TABLES
from anybit.methods import METHODS
from anybit.options import Option
from anybit.quant.groups import DEFAULT_GROUP
from anybit.runtime.dec.compensate import DEC_SCORES
from anybit.runtime.head import HEAD_CHOICES
from anybit.runtime.qlinear import KERNELS

if TYPE_CHECKING:
    from anybit.runtime.dec import DecPlan


class _UsageLine(click.ClickException):
    """A bad command line, shown in one line like every other error (exit status 2, as click's)."""

    exit_code = 2


class _Group(click.Group):
    """Turns an AnybitError (exit status 1) or a bad option value (2) anywhere below into a one-line message."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except AnybitError as exc:
            raise click.ClickException(str(exc)) from None
        except click.UsageError as exc:
            raise _UsageLine(exc.format_message()) from None


POSITIVE = click.IntRange(min=1)


class _FiniteFloat(click.FloatRange):
    """A float option that is a number: nan and inf are refused like any value out of range."""

    def _describe_range(self) -> str:
        return "" if self.min is None and self.max is None else super()._describe_range()

    def convert(self, value, param, ctx):
        number = click.FLOAT.convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        return super().convert(number, param, ctx)


FLOAT = _FiniteFloat()


def _dtype_option(name: str, what: str):
    """A dtype option whose default, auto, picks bfloat16 only where the hardware multiplies it natively."""
    return click.option(
        name,
        type=click.Choice(DTYPES),
        default="auto",
        show_default=True,
        help=f"{what}; {AUTO_DTYPE_HELP}",
    )


@click.group(cls=_Group)
@click.version_option(package_name="anybit")
def main() -> None:
    """anybit: quantize causal language models to any average bit-width."""


def _apply_options(options: list, f):
    for option in reversed(options):
        f = option(f)
    return f


class _DecPlanType(click.ParamType):
    """A k_chunk, or one per layer type: "8", "qkv=4,o=8,gu=8,down=16", "8,down=16"."""

    name = "K"

    def convert(self, value, param, ctx):
        from anybit.runtime.dec import DecPlan

        if isinstance(value, DecPlan):
            return value
        try:
            return DecPlan.parse(value)
        except ValueError as exc:
            self.fail(str(exc), param, ctx)


DEC_PLAN = _DecPlanType()


def _quant_options(f):
    """The options of a quantization run, one per `config.OPTIONS` declaration, then --config."""
    options = [_click_option(option) for option in OPTIONS]
    options.append(
        click.option(
            "--config",
            "config_file",
            type=click.Path(dir_okay=False),
            default=None,
            help="TOML file with these settings (keys as the option names with underscores); flags given "
            "explicitly win.",
        )
    )
    return _apply_options(options, f)


def _click_option(option: Option):
    """The command-line form of one declared option: its flag, type, bounds, default and help."""
    spelling = option.cli_flag
    kwargs: dict[str, object] = {"default": option.default}
    if option.kind is bool:
        if option.negatable:
            spelling = f"{spelling}/{option.cli_off_flag}"
        else:
            kwargs["is_flag"] = True
    elif option.choices:
        kwargs["type"] = click.Choice(option.choices)
    elif option.kind in (int, float):
        bounds = {"min": option.low, "max": option.high, "min_open": option.low_open, "max_open": option.high_open}
        bounded = option.low is not None or option.high is not None
        if option.kind is int:
            kwargs["type"] = click.IntRange(**bounds) if bounded else click.INT
        else:
            kwargs["type"] = _FiniteFloat(**bounds) if bounded else FLOAT
    help_text = option.help
    users = option_users(option)
    if len(users) < len(METHODS):
        help_text = f"({', '.join(users)}) {help_text}"
    if option.method_default:
        help_text += f" [default: {_method_defaults(option, users)}]"
    elif option.default is not None and not kwargs.get("is_flag"):
        kwargs["show_default"] = True
    if option.name == "method":
        help_text += f" One of: {', '.join(METHODS)}."
    return click.option(spelling, option.name, help=help_text, **kwargs)


def _method_defaults(option: Option, users: list[str]) -> str:
    """ "3.25 for skim, anybit; 4 for rtn, gptq, ..." from the recipes' own defaults."""
    by_value: dict[object, list[str]] = {}
    for name in users:
        by_value.setdefault(METHODS[name].option_default(option), []).append(name)
    if len(by_value) == 1:
        return _option_value_text(next(iter(by_value)))
    return "; ".join(f"{_option_value_text(value)} for {', '.join(names)}" for value, names in by_value.items())


def _option_value_text(value: object) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    return f"{value:g}" if isinstance(value, float) else str(value)


def _make_config(ctx: click.Context, config_file: str | None, **values: object) -> QuantConfig:
    if config_file is None:
        return QuantConfig(**values)
    explicit = {
        k: v for k, v in values.items() if ctx.get_parameter_source(k) == click.core.ParameterSource.COMMANDLINE
    }
    return QuantConfig.from_toml(config_file, **explicit)


_PROMPT_PATHS = {"tiles": ", on AMX tiles", "registers": ", in blocks of rows"}  # `anybit bench`'s line


def _mb(n_bytes: int) -> str:
    return f"{n_bytes / 1e6:.1f} MB"


@main.command()
@click.argument("model")
@_quant_options
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), help="Output directory.")
@click.option("--force", is_flag=True, help="Replace an existing output directory.")
@click.option("--residual", is_flag=True, help="Also store 4-bit residuals for --dec (as `anybit residual`).")
@click.pass_context
def quantize(
    ctx: click.Context,
    model: str,
    out_dir: str,
    force: bool,
    residual: bool,
    config_file: str | None,
    **values: object,
) -> None:
    """Quantize MODEL (HF directory, .gguf file or alias) and write DIR."""
    from anybit.pipeline import build_residuals, quantize_to_dir

    config = _make_config(ctx, config_file, **values)
    outcome = quantize_to_dir(model, config, out_dir, force=force)
    if residual:
        _echo_residual(build_residuals(out_dir, seqlen=config.seqlen, calib=config.calib))
    click.echo(
        f"wrote {outcome.out_dir}: {config.method} {config.bits:g}-bit, "
        f"{outcome.meta['nominal_bits_per_weight']:.4f} nominal and {outcome.bits_per_weight:.4f} counted bits/weight, "
        f"{_mb(outcome.file_bytes)}, "
        f"{outcome.report.seconds:.1f} s"
    )


def _echo_residual(meta: dict) -> None:
    fitted = f" fitted for --dec {meta['fit_k']}" if "fit_k" in meta else ""
    click.echo(
        f"wrote residuals{fitted}: "
        f"{meta['bits_per_weight']:.4f} bits/weight in host memory "
        f"({_mb(meta['storage_bits'] // 8)}), not counted in the model's bits"
    )


@main.command()
@click.argument("directory", type=click.Path(file_okay=False))
@click.option("--source", default=None, help="The unquantized model (default: the one DIR was made from).")
@click.option(
    "--nsamples", type=POSITIVE, default=8, show_default=True, help="Calibration windows (means; --fit statistics)."
)
@click.option("--seqlen", type=POSITIVE, default=2048, show_default=True)
@click.option("--calib", default="wikitext2-valid", show_default=True, help="Calibration corpus name or text file.")
@click.option(
    "--fit",
    "fit_k",
    type=DEC_PLAN,
    default=None,
    help="Store, instead of W − Q(W), the correction fitted on the calibration data to predict each layer's "
    "whole error from the channels --dec K selects (best used with the same --dec K).",
)
def residual(directory: str, source: str | None, nsamples: int, seqlen: int, calib: str, fit_k: DecPlan | None) -> None:
    """Store the 4-bit residuals W − Q(W) of a quantized DIR, for dynamic error compensation (--dec)."""
    from anybit.pipeline import build_residuals

    meta = build_residuals(directory, source, nsamples=nsamples, seqlen=seqlen, calib=calib, fit_k=fit_k)
    _echo_residual(meta)


@main.command()
@click.argument("directory", type=click.Path(file_okay=False))
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), help="Output directory.")
@click.option("--steps", type=click.IntRange(1, MAX_TUNE_STEPS), default=28, show_default=True,
              help="Adam steps, one calibration window each.")  # fmt: skip
@click.option("--lr", type=_FiniteFloat(min=0), default=E2E_LR, show_default=True, help="Adam learning rate.")
@click.option("--nsamples", type=POSITIVE, default=32, show_default=True,
              help="Calibration windows; the last 4 (at most half) only judge the result.")  # fmt: skip
@click.option("--seqlen", type=POSITIVE, default=2048, show_default=True)
@click.option("--calib", default="wikitext2-valid", show_default=True, help="Calibration corpus name or text file.")
@click.option("--source", default=None, help="The unquantized model (default: the one DIR was made from).")
@click.option("--device", default="cpu", show_default=True, help="cpu or cuda[:N] (the tuning runs in float32).")
@click.option("--force", is_flag=True, help="Replace an existing output directory.")
def tune(directory: str, out_dir: str, steps: int, lr: float, nsamples: int, seqlen: int, calib: str,
         source: str | None, device: str, force: bool) -> None:  # fmt: skip
    """Tune a quantized DIR end to end toward its source model's next-token distributions (KL) and write
    OUT: codes fixed, codebooks or scales and norms trained, the same counted bits."""
    from anybit.pipeline import check_device, tune_to_dir

    if not 0 < lr < 1:
        raise AnybitError(f"--lr must be in (0, 1), got {lr}")
    check_device(device)
    meta = tune_to_dir(directory, out_dir, steps, lr, nsamples, seqlen, calib, source, force, device=device)
    record = meta["end_to_end_tuning"]
    verdict = "kept" if record["kept"] else "not kept: the model is written as it was"
    click.echo(
        f"wrote {out_dir}: held-out KL {record['before']:.4f} -> {record['after']:.4f} ({verdict}), "
        f"{meta['bits_per_weight']:.4f} counted bits/weight, {record['seconds']:.0f} s"
    )


def _dec_options(f):
    options = [
        click.option(
            "--dec",
            type=DEC_PLAN,
            default=None,
            help="Dynamic error compensation: add back the residual rows of the K largest-|x| input channels "
            "per 1024 (needs `anybit residual DIR`). K per layer type: qkv=4,o=8,gu=8,down=16 (unnamed "
            "types off) or 8,down=16 (8 for the others).",
        ),
        click.option("--dec-static", is_flag=True, help="With --dec: fixed channels from calibration (baseline)."),
        click.option(
            "--dec-score",
            type=click.Choice(DEC_SCORES),
            default="activation",
            show_default=True,
            help="With --dec: rank channels by |x| (the paper's) or by |x| times the residual row's norm.",
        ),
    ]
    return _apply_options(options, f)


def _dec_note(plan: object, static: bool, score: str) -> str:
    return f", DEC k_chunk {plan}" + (" (static channels)" if static else "") + f", ranked by {score}"


def _runtime_options(kernel: str, head: str, decoder: bool):
    """--kernel, --head and --tables (and --decoder): how a loaded model runs (`pipeline.configure_runtime`)."""

    def apply(f):
        options = [
            click.option(
                "--kernel",
                type=click.Choice(KERNELS),
                default=kernel,
                show_default=True,
                help="Products of the quantized linears: fast (CPU: int8 activations and tables), exact (CPU: "
                "the stored values), triton, reference; auto: triton on CUDA, else fast where it serves.",
            ),
            click.option(
                "--head",
                type=click.Choice(HEAD_CHOICES),
                default=head,
                show_default=True,
                help="A quantized directory's embedding and output head: packed to 8 bits per weight (one "
                "grid per row), or as stored.",
            ),
            click.option(
                "--tables",
                type=click.Choice(TABLES),
                default="int8",
                show_default=True,
                help="The fast kernel's codebook tables: each entry one int8 (less work per weight), or "
                "two int8 parts (AVX2: one 12-bit integer).",
            ),
        ]
        if decoder:
            options.append(
                click.option(
                    "--decoder",
                    type=click.Choice(["native", "eager"]),
                    default="native",
                    show_default=True,
                    help="CPU: each decode step in C (Llama family, fast kernel), else Hugging Face's loop.",
                )
            )
        return _apply_options(options, f)

    return apply


def _eval_options(f):
    options = [
        click.option("--dataset", default="wikitext2", show_default=True, help="Corpus name or text file."),
        click.option("--seqlen", type=POSITIVE, default=2048, show_default=True, help="Window length in tokens."),
        click.option("--max-windows", type=POSITIVE, default=None, help="Score only the first N windows."),
        click.option("--device", default="cpu", show_default=True),
        _dtype_option("--dtype", "Compute dtype"),
    ]
    return _apply_options(options, f)


@main.command("eval")
@click.argument("model")
@_eval_options
@click.option("--kl", is_flag=True, help="Also KL divergence and top-1 agreement against the unquantized model.")
@click.option("--reference", default=None, help="Reference model for --kl (default: the source of a quantized DIR).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout.")
@_dec_options
@_runtime_options(kernel="exact", head="dense", decoder=False)
def eval_cmd(model: str, kl: bool, reference: str | None, as_json: bool, **kwargs: object) -> None:
    """Perplexity of MODEL (a model spec or a quantized DIR)."""
    from anybit.model.loading import load_model
    from anybit.pipeline import check_device, evaluate_spec

    check_device(kwargs["device"])
    loaded = load_model(model, head=kwargs["head"])
    ref = None
    if kl or reference:
        source = reference or (loaded.quant_info or {}).get("source")
        if source is None:
            raise AnybitError("--kl needs --reference for a model that is not a quantized directory")
        ref = load_model(source)
    result = evaluate_spec(loaded, reference=ref, **kwargs)
    out = {"model": model, **result.to_dict()}
    if loaded.quant_info is not None:
        out["bits_per_weight"] = loaded.quant_info["bits_per_weight"]
        out["method"] = loaded.quant_info["method"]
    if kwargs["kernel"] != "exact" or kwargs["head"] != "dense":
        out.update(kernel=kwargs["kernel"], head=kwargs["head"], tables=kwargs["tables"])
    if kwargs["dec"] is not None:
        out["dec"] = kwargs["dec"].to_json()
        out["dec_static"] = kwargs["dec_static"]
        out["dec_score"] = kwargs["dec_score"]
    if as_json:
        click.echo(json.dumps(out))
        return
    line = f"{model}: ppl {result.ppl:.3f} over {result.windows} windows of {result.seqlen} ({result.tokens} tokens)"
    if "bits_per_weight" in out:
        line += f", {out['bits_per_weight']:.4f} bits/weight"
    if "dec" in out:
        line += _dec_note(kwargs["dec"], out["dec_static"], out["dec_score"])
    if result.kl is not None:
        line += f", KL {result.kl:.4f}, top-1 agreement {result.top1_agreement:.4f}"
    click.echo(line)


def _load_to_decode(
    spec: str, dtype, head: str, kernel: str, device: str, native: bool, tokenizer: bool = True
) -> tuple[object, str]:
    """The model to decode and which loader read it: for the native CPU decoder, without transformers' model
    code where the directory allows (`runtime.native_model`: about 100 MB less), else through transformers."""
    from anybit.model.loading import load_model

    if native and device == "cpu":
        from anybit.runtime.native_model import load_for_native

        loaded = load_for_native(spec, dtype, head, kernel, tokenizer=tokenizer)
        if loaded is not None:
            return loaded, "native"
    return load_model(spec, dtype=dtype, head=head), "transformers"


@main.command()
@click.argument("model")
@click.option("--prompt", required=True, help="Text to continue (or the user message with --chat).")
@click.option("--max-new-tokens", type=POSITIVE, default=64, show_default=True)
@click.option("--chat", is_flag=True, help="Wrap the prompt in the tokenizer's chat template.")
@click.option("--temperature", type=_FiniteFloat(min=0), default=0.0, show_default=True, help="0: greedy decoding.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--device", default="cpu", show_default=True)
@click.option(
    "--dense-cache",
    is_flag=True,
    help="Decode every quantized weight once before generating (dense memory; eager decoding).",
)
@_dec_options
@_runtime_options(kernel="auto", head="int8", decoder=True)
def generate(
    model: str,
    prompt: str,
    max_new_tokens: int,
    chat: bool,
    temperature: float,
    seed: int,
    device: str,
    dense_cache: bool,
    dec: DecPlan | None,
    dec_static: bool,
    dec_score: str,
    kernel: str,
    head: str,
    tables: str,
    decoder: str,
) -> None:
    """Generate text with MODEL (a model spec or a quantized DIR), streaming it to stdout."""
    from contextlib import nullcontext

    import torch

    from anybit.generate import check_prompt
    from anybit.generate import generate as run_generation
    from anybit.pipeline import check_device, configure_runtime, dec_compensation
    from anybit.runtime.qlinear import dense_weights

    check_device(device)
    check_prompt(prompt)
    native = decoder == "native" and not dense_cache
    loaded, _ = _load_to_decode(model, torch.float32, head, kernel, device, native)
    loaded.model.to(device)
    configure_runtime(loaded, kernel, head, tables)
    dec_context = dec_compensation(loaded, dec, dec_static, dec_score)
    native = decoder == "native" and not dense_cache
    with dense_weights(loaded.model) if dense_cache else nullcontext(), dec_context:
        run_generation(loaded, prompt, max_new_tokens, chat, device, temperature, seed, native=native)


@main.command()
@click.argument("model")
@click.option("--prompt-tokens", type=POSITIVE, default=128, show_default=True, help="Length of the (random) prompt.")
@click.option("--new-tokens", type=POSITIVE, default=32, show_default=True, help="Greedy decode steps, one token each.")
@click.option("--repeats", type=POSITIVE, default=3, show_default=True, help="Timed runs after one warm-up (median).")
@click.option("--device", default="cpu", show_default=True)
@_dtype_option("--dtype", "Compute dtype")
@click.option(
    "--dense-cache", is_flag=True, help="Decode every quantized weight once first (dense memory, a little faster)."
)
@click.option("--cuda-graph", is_flag=True, help="CUDA: static KV cache, each decode step replayed from a graph.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout.")
@_dec_options
@_runtime_options(kernel="auto", head="int8", decoder=True)
def bench(
    model: str,
    prompt_tokens: int,
    new_tokens: int,
    repeats: int,
    device: str,
    dtype: str,
    dense_cache: bool,
    cuda_graph: bool,
    as_json: bool,
    dec: DecPlan | None,
    dec_static: bool,
    dec_score: str,
    kernel: str,
    head: str,
    tables: str,
    decoder: str,
) -> None:
    """Prefill and decode speed of MODEL (a model spec or a quantized DIR), batch 1 with a KV cache."""
    from contextlib import nullcontext

    import torch

    from anybit.bench import decode_speed
    from anybit.pipeline import check_device, configure_runtime, dec_compensation
    from anybit.runtime.qlinear import dense_weights

    check_device(device)
    if cuda_graph and not device.startswith("cuda"):
        raise AnybitError("--cuda-graph needs --device cuda")
    native = decoder == "native" and not (dense_cache or cuda_graph)
    torch_dtype = getattr(torch, compute_dtype(dtype, device))
    loaded, loader = _load_to_decode(model, torch_dtype, head, kernel, device, native, tokenizer=False)
    loaded.model.to(device)
    head_info = configure_runtime(loaded, kernel, head, tables)
    dec_context = dec_compensation(loaded, dec, dec_static, dec_score)
    with dense_weights(loaded.model) if dense_cache else nullcontext(), dec_context:
        result = decode_speed(
            loaded.model, prompt_tokens, new_tokens, repeats, device, cuda_graph=cuda_graph,
            decoder="eager" if dense_cache else decoder,
        )  # fmt: skip
    out = {"model": model, **result.to_dict(), "dense_cache": dense_cache, "kernel": kernel, "tables": tables}
    out["loader"] = loader
    out.update(head=head_info.kind, head_bits_per_weight=head_info.bits_per_weight, head_weights=head_info.weights)
    out.update(dec=None if dec is None else dec.to_json(), dec_static=dec_static, dec_score=dec_score)
    if as_json:
        click.echo(json.dumps(out))
        return
    line = (
        f"{model} on {result.device} ({result.dtype}): prefill {result.prefill_tokens_per_s:.1f} tokens/s "
        f"({prompt_tokens} tokens{_PROMPT_PATHS.get(result.prompt_path, '')}), decode "
        f"{result.decode_tokens_per_s:.2f} tokens/s "
        f"({result.decode_ms_per_token:.1f} ms/token, {result.decoder}), {_mb(result.tensor_bytes)} of tensors"
    )
    if result.kernel_bytes:
        line += f" + {_mb(result.kernel_bytes)} re-laid for the kernel"
    if result.kv_cache_bytes:
        line += f" + {_mb(result.kv_cache_bytes)} of float16 KV cache"
    if head_info.kind != "dense":
        line += f"; embedding and head at {head_info.bits_per_weight:.2f} bits/weight"
    if result.peak_gpu_bytes is not None:
        line += f", peak GPU {_mb(result.peak_gpu_bytes)}"
    if dec is not None:
        line += _dec_note(dec, dec_static, dec_score)
    click.echo(line)


@main.command()
@click.argument("directory", type=click.Path(file_okay=False))
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["gptq", "gptq_v2"]),
    default="gptq",
    show_default=True,
    help="gptq: zero points stored minus one (read everywhere), or as gptq_v2 where a zero point is 0; "
    "gptq_v2: stored as they are (GPTQModel, vLLM since late 2025).",
)
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), help="New output directory.")
def export(directory: str, fmt: str, out_dir: str) -> None:
    """Write a quantized DIR (rtn or gptq) in the GPTQ layout that vLLM, SGLang, GPTQModel and transformers load."""
    from anybit.model.export import export_gptq

    config = export_gptq(directory, out_dir, fmt)
    written = config["checkpoint_format"]
    overrides = len(config.get("dynamic", {}))
    group = "per channel" if config["group_size"] == -1 else f"group {config['group_size']}"
    click.echo(
        f"wrote {out_dir}: {written} {config['bits']}-bit {group}"
        + (f", {overrides} linears with their own width or group (dynamic)" if overrides else "")
    )
    if written != fmt:
        click.echo(
            f"note: {written}, not {fmt}: a group has zero point 0, which {fmt} stores as -1 (use --sym for {fmt})"
        )


@main.command()
@click.argument("directory", type=click.Path(file_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout.")
@click.option("--plot", "plot_file", type=click.Path(dir_okay=False), default=None, help="Also draw the bit map (PNG).")
@click.option("--force", is_flag=True, help="Replace an existing --plot file.")
def inspect(directory: str, as_json: bool, plot_file: str | None, force: bool) -> None:
    """Per-linear shape, layout, counted bits and bytes of a quantized DIR (read from its file)."""
    from anybit.report import check_picture_output, inspect_directory, plot_bit_map

    if plot_file:
        check_picture_output(Path(plot_file), force)
    table = inspect_directory(Path(directory))
    if plot_file:
        plot_bit_map(Path(directory), Path(plot_file))
    if as_json:
        click.echo(json.dumps(table))
        return
    click.echo(f"{'linear':48} {'shape':>12} {'kind':>9} {'group':>6} {'nominal':>8} {'bits/w':>8} {'bytes':>10}")
    for row in table["layers"]:
        shape = "x".join(map(str, row["shape"]))
        click.echo(
            f"{row['name']:48} {shape:>12} {row['kind']:>9} {row['group_size']:>6} "
            f"{row['nominal_bits']:>8.3f} {row['bits_per_weight']:>8.4f} {row['bytes']:>10}"
        )
    click.echo(
        f"total: {table['quantized_weights']} quantized weights, {table['bits_per_weight']:.4f} counted bits/weight, "
        f"{table['quantized_bytes']} bytes of quantized linears; file {table['file_bytes']} bytes; "
        f"method {table['method']}"
    )
    for note in table["notes"]:
        click.echo(f"note: {note}")


@main.command()
@click.argument("results", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.option("--out", default="quality_vs_bits.png", show_default=True, type=click.Path(dir_okay=False))
@click.option("--title", default="Perplexity against counted bits per weight", show_default=True)
@click.option("--force", is_flag=True, help="Replace an existing --out file.")
def plot(results: tuple[str, ...], out: str, title: str, force: bool) -> None:
    """Draw perplexity against counted bits from RESULTS files of `anybit eval --json` lines: one series per
    method, each unquantized model as a line."""
    from anybit.report import check_picture_output, plot_quality, quality_series, read_results

    check_picture_output(Path(out), force)
    series, references = quality_series(read_results([Path(r) for r in results]))
    click.echo(plot_quality(series, references, Path(out), title))


@main.command()
@click.argument("model", default="smollm2-135m")
@_quant_options
@click.option(
    "--out",
    "out_dir",
    default=None,
    type=click.Path(file_okay=False),
    help="Output directory (default: under the cache).",
)
@click.option("--force", is_flag=True, help="Replace an existing --out directory (one anybit wrote).")
@click.option("--dataset", default="wikitext2", show_default=True, help="Evaluation corpus.")
@click.option("--max-windows", type=POSITIVE, default=None, help="Evaluate only the first N windows.")
@_dtype_option("--dtype", "Evaluation compute dtype")
@click.pass_context
def compare(
    ctx: click.Context,
    model: str,
    out_dir: str | None,
    force: bool,
    dataset: str,
    max_windows: int | None,
    dtype: str,
    config_file: str | None,
    **values: object,
) -> None:
    """Quantize MODEL, evaluate it and the original, and print a table (the main job).

    --seqlen sets both the calibration and the evaluation window length.
    """
    from anybit.cache import cache_dir
    from anybit.format.directory import check_output
    from anybit.methods import get_method
    from anybit.model.loading import load_model, resolve_spec
    from anybit.pipeline import evaluate_spec, quantize_to_dir
    from anybit.report import format_table

    config = _make_config(ctx, config_file, **values)
    label = f"{config.method} {config.bits:g}-bit"
    if get_method(config.method).takes("group_size"):
        label += f" g{DEFAULT_GROUP if config.group_size is None else config.group_size}"
    name = f"{Path(model).name}-{label.replace(' ', '-')}"
    out = Path(out_dir) if out_dir else cache_dir() / "runs" / name
    force = force or out_dir is None  # the default lies in anybit's own cache, one per model and recipe
    check_output(out, force, sources=(resolve_spec(model)[1],))  # before evaluating the original, not after
    eval_kwargs = {
        "dataset": dataset,
        "seqlen": config.seqlen,
        "max_windows": max_windows,
        "device": config.device,
        "dtype": dtype,
    }
    original = load_model(model)
    n_weights = sum(p.numel() for p in original.model.parameters())
    base = evaluate_spec(original, **eval_kwargs)
    del original  # evaluation cast it to --dtype in place; quantize a fresh copy
    outcome = quantize_to_dir(model, config, out, force=force)
    quantized = evaluate_spec(load_model(str(out)), **eval_kwargs)
    rows = [
        {"model": model, "method": "none (fp16)", "bits_per_weight": 16.0, "size": _mb(2 * n_weights), "ppl": base.ppl},
        {
            "model": str(out),
            "method": label,
            "bits_per_weight": outcome.bits_per_weight,
            "size": _mb(outcome.file_bytes),
            "ppl": quantized.ppl,
        },
    ]
    click.echo(format_table(rows, title=f"{dataset}, {base.windows} windows of {base.seqlen} tokens"))


def run() -> None:
    """Console-script entry point."""
    _keep_triton_out_without_gpu()
    main(prog_name="anybit")


GPU_DEVICE_FILES = ("/dev/nvidiactl", "/dev/kfd")  # NVIDIA's driver, AMD's (ROCm)


def _keep_triton_out_without_gpu() -> None:
    """On a machine without a GPU driver, keep triton out of the process: torch's compiler stack loads it (about
    70 MB resident) as soon as transformers' modelling code is imported, and the CPU paths never use it.
    `TRITON_INTERPRET=1` (the Triton kernels run by its interpreter on the CPU) keeps it. Decided from the
    driver's device files, not by importing torch (which `anybit --help` does not need)."""
    if os.environ.get("TRITON_INTERPRET") != "1" and not any(map(os.path.exists, GPU_DEVICE_FILES)):
        sys.modules.setdefault("triton", None)  # `import triton` then raises ImportError; find_spec gives None


if __name__ == "__main__":
    sys.exit(run())
