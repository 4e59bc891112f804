"""What narrower grids for the embedding and output head would cost in perplexity: is 8 bits the floor?

Usage: python benchmarks/head_width.py DIR [--grids dense,8:row,7:row,6:row,6:64,4:64] [--max-windows 20]

On SmolLM2 the 8-bit head is a fifth of a decode step's time on the native decoder (it reads 28 MB a token,
more than the quantized decoder linears' codes at 3.25 bits), so a narrower grid would decode faster. For each
grid BITS:GROUP (GROUP `row` for one grid per row, as `--head int8` uses), the directory's embedding (and the
head tied to it, or the model's own head) is rounded to nearest on min-max grids of that width and group, the
decoder linears kept as stored, and the model scored by anybit's protocol (WikiText-2 test, windows of 2048,
exact products, float32). `dense` keeps the stored embedding. One JSON line per grid to
benchmarks/results/head_width.jsonl, with its relative mean squared error and its perplexity change against the
first grid.
"""

from __future__ import annotations

import argparse
import time

import torch

from _common import log_result
from anybit.data import eval_windows
from anybit.eval.perplexity import evaluate
from anybit.model.loading import load_model
from anybit.pipeline import corpus_ids
from anybit.quant.uniform import rtn_quantize


def rounded(weight: torch.Tensor, bits: int, group: int) -> torch.Tensor:
    """`weight` rounded to nearest on min-max grids of `bits` bits per group of `group` columns."""
    rows, cols = weight.shape
    widths = torch.full((rows, cols // group), bits, dtype=torch.uint8)
    return rtn_quantize(weight, group, widths).dequantize(torch.float32)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dir")
    parser.add_argument("--grids", default="dense,8:row,7:row,6:row,6:64,4:64")
    parser.add_argument("--max-windows", type=int, default=20)
    args = parser.parse_args()
    loaded = load_model(args.dir, torch.float32, "dense")
    model = loaded.model
    matrices = {id(m.weight): m.weight for m in (model.get_input_embeddings(), model.get_output_embeddings()) if m}
    stored = {key: w.data.float().clone() for key, w in matrices.items()}
    windows = eval_windows(corpus_ids(loaded, "wikitext2"), 2048, args.max_windows)
    first = None
    for grid in args.grids.split(","):
        start = time.perf_counter()
        error = 0.0
        for key, weight in matrices.items():
            if grid == "dense":
                weight.data.copy_(stored[key])
                continue
            bits, group = grid.split(":")
            original = stored[key]
            new = rounded(original, int(bits), original.shape[1] if group == "row" else int(group))
            error = max(error, float((new - original).pow(2).mean() / original.pow(2).mean()))
            weight.data.copy_(new)
        ppl = evaluate(model, windows, progress=False).ppl
        first = ppl if first is None else first
        log_result(
            "head_width",
            {
                "dir": args.dir, "grid": grid, "tied": len(matrices) == 1, "windows": len(windows), "ppl": ppl,
                "relative_mse": error, "change_vs_first": ppl / first - 1, "seconds": time.perf_counter() - start,
            },
        )  # fmt: skip


if __name__ == "__main__":
    main()
