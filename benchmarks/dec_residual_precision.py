"""Does the residual's precision matter, at equal host-memory traffic? An experiment, not a format.

Usage: python benchmarks/dec_residual_precision.py DIR [--variants s4:8,exact:8,s8:4,s3:10,s2:15,m4:8,m3:10]
       [--windows 5] [--dtype float32]
For the quantized model in DIR (and its source model), the plain residual R = W − Q(W) of every linear is
held in memory in one of these forms, then perplexity with dynamic compensation at the variant's k_chunk
is measured on the first `windows` windows of WikiText-2 validation (the test set is not used):
  exact:K   R itself, in float32
  sB:K      B-bit symmetric, levels −(2^(B−1)−1)..2^(B−1)−1 times one scale per output channel (s4 is the
            stored format, but with its scale kept in float32)
  mB:K      B-bit mid-rise: 2^B levels, the odd multiples of half a step, no zero level
Each scale minimises its channel's squared error over the same 32-point grid as `quantize_residual`.
B bits at k_chunk K read as many residual bytes per token as 4 bits at K·B/4, so s2:15, s3:10 and s8:4
cost at most the traffic of s4:8. One JSON line per variant to benchmarks/results/dec_residual_precision.jsonl.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass

import torch

from _common import log_result
from anybit.data import eval_windows, load_corpus, tokenize_corpus
from anybit.eval.perplexity import evaluate
from anybit.model.adapters import get_adapter
from anybit.model.loading import load_model
from anybit.runtime.dec import SCALE_CANDIDATES, chunk_budgets, compensation
from anybit.runtime.qlinear import quant_linears


@dataclass
class HeldResidual:
    """Residual rows (in, out) held as float32, with the reading interface `Compensator` uses."""

    t: torch.Tensor

    @property
    def in_features(self) -> int:
        return self.t.shape[0]

    @property
    def out_features(self) -> int:
        return self.t.shape[1]

    def rows(self, channels: torch.Tensor) -> torch.Tensor:
        return self.t.index_select(0, channels)


def fake_quantize(R: torch.Tensor, bits: int, midrise: bool) -> torch.Tensor:
    """R rounded to `bits`-bit levels with one squared-error-minimising scale per output channel (row)."""
    top = 2**bits - 1 if midrise else 2 ** (bits - 1) - 1  # largest level, in steps (half steps: mid-rise)
    peak = R.abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / top
    best, best_err = None, None
    for t in range(1, SCALE_CANDIDATES + 1):
        scale = peak * (t / SCALE_CANDIDATES)
        levels = 2 * torch.floor(R / (2 * scale)) + 1 if midrise else torch.round(R / scale)
        approx = levels.clamp(-top, top) * scale
        err = (R - approx).square().sum(dim=1, keepdim=True)
        if best is None:
            best, best_err = approx, err
        else:
            best, best_err = torch.where(err < best_err, approx, best), torch.minimum(err, best_err)
    return best


def held(R: torch.Tensor, form: str) -> HeldResidual:
    if form == "exact":
        return HeldResidual(R.t().contiguous())
    return HeldResidual(fake_quantize(R, int(form[1:]), form[0] == "m").t().contiguous())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dir")
    parser.add_argument("--variants", default="s4:8,exact:8,s8:4,s3:10,s2:15,m4:8,m3:10")
    parser.add_argument("--windows", type=int, default=5)
    parser.add_argument("--dtype", default="float32")
    args = parser.parse_args()
    variants = [(form, int(k)) for form, k in (v.split(":") for v in args.variants.split(","))]
    for form, _ in variants:
        if not (form == "exact" or (form[0] in "sm" and form[1:].isdigit() and 1 < int(form[1:]) <= 8)):
            raise SystemExit(f"unknown residual form {form!r}: exact, s2..s8 or m2..m8")
    loaded = load_model(args.dir)
    original = load_model(loaded.quant_info["source"])
    adapter = get_adapter(original.model.config.model_type)
    layers = dict(quant_linears(loaded.model))
    errors = {
        name: adapter.weight_of(original.model.get_submodule(name)).half().float() - layer.dequantize().float()
        for name, layer in layers.items()
    }
    del original
    windows = eval_windows(tokenize_corpus(loaded.tokenizer, load_corpus("wikitext2-valid")), 2048, args.windows)
    model = loaded.model.to(dtype=getattr(torch, args.dtype))
    for form, k in variants:
        residuals = {name: held(R, form) for name, R in errors.items()}
        bits = 32 if form == "exact" else int(form[1:])
        kept = {name: sum(n for _, _, n in chunk_budgets(layer.in_features, k)) for name, layer in layers.items()}
        start = time.perf_counter()
        with compensation(layers, residuals, k):
            ppl = evaluate(model, windows, progress=False).ppl
        log_result(
            "dec_residual_precision",
            {
                "dir": args.dir,
                "residual": form,
                "k_chunk": k,
                "residual_bits": bits,
                "fetch_bytes_per_token": sum(kept[n] * layers[n].out_features * bits / 8 for n in layers),
                "dataset": "wikitext2-valid",
                "windows": args.windows,
                "ppl": ppl,
                "seconds": time.perf_counter() - start,
            },
        )


if __name__ == "__main__":
    main()
