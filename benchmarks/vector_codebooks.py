"""Vector codebooks at 2-2.5 bits (issue 23, item 5), simulated end to end (the stored recipe that came of it is
`anybit quantize --method vq`; this script keeps the simulation its first records came from).

Each linear's weight, its input dimension rotated (`--rotate`, as `anybit quantize --rotate` does), is cut
into d-dimensional pieces along each row (d consecutive input columns, after act-order), and each piece is
coded as s_r · c_k: a per-row fp16 scale s_r and one entry of a K = 2^(d·bits)-entry codebook of d-vectors.
The codebook is either one fixed table fitted once to Gaussian samples (`--codebook gaussian`: rotated rows
are close to Gaussian, so it needs no storage beyond a seed, as in HIGGS) or one per matrix fitted by
weighted K-means to that matrix's scaled pieces (`--codebook matrix`, K·d fp16 values counted). The pieces
are rounded in order with GPTQ's error feedback generalized to blocks of d columns (GPTVQ): a piece v takes
the entry minimizing ‖(v − s c) A‖² with A the inverse of the d×d diagonal block of the upper Cholesky
factor of H⁻¹, and its error (v − s c) A is fed to the columns after it. With `--refit-scales` each row's
scale is then refitted in closed form under the layer objective (XᵀX-weighted), codes fixed.

The rounding, the Gaussian table and the scale refit are `anybit.quant.vector_codebooks` (tested there). This is
a simulation: the coded weights are kept dense (a forward pre-rotation and a float matmul), not in
anybit's stored format, and no kernel reads them. The counted bits are computed from what the format would
store: the codes (d·bits per piece), the scales (16 bits a row), the codebook (matrix: K·d·16 bits), the
act-order permutation (32 bits a column, as anybit stores it) and the rotation (`rotation_bits`).

Usage: python benchmarks/vector_codebooks.py --bits 2 --dim 4 [--codebook gaussian|matrix] [--no-rotate]
One JSON line per corpus goes to benchmarks/results/vector_codebooks.jsonl.
"""

from __future__ import annotations

import argparse
import functools
import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import anybit.calibrate as calibrate
from _common import evaluate_corpora, log_result
from anybit.config import QuantConfig
from anybit.format.rotation import InputRotation, rotation_bits
from anybit.methods import METHODS
from anybit.methods.base import ACT_ORDER, DAMP, ROTATE, LayerStats, Method
from anybit.model.loading import load_model
from anybit.pipeline import _calibration
from anybit.quant.gptq import act_order_perm
from anybit.quant.vector_codebooks import gaussian_codebook, refit_row_scales, vector_gptq, weighted_kmeans

SETTINGS = {"dim": 4, "codebook": "gaussian", "refit_scales": True, "kmeans_iters": 20}


_gaussian_codebook = functools.cache(gaussian_codebook)  # one table per width for the whole model


@dataclass(frozen=True)
class SimulatedTensor:
    """A vector-coded matrix kept dense (see the module doc), with the bits its stored form would take."""

    values: torch.Tensor  # (out, in), float32, in the rotated input basis
    bits: int
    rotation: InputRotation | None = None

    def dequantize(self) -> torch.Tensor:
        return self.values

    def storage_bits(self) -> int:
        return self.bits + (rotation_bits(self.values.shape[1]) if self.rotation is not None else 0)


class SimulatedLinear(torch.nn.Module):
    """y = W (R x) + b with the simulated weight kept dense (a buffer: never rounded as a parameter)."""

    def __init__(self, qtensor: SimulatedTensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.qtensor = qtensor
        self.in_features, self.out_features = qtensor.values.shape[1], qtensor.values.shape[0]
        self.register_buffer("weight", qtensor.values.clone())
        self.register_buffer("bias", None if bias is None else bias.clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.qtensor.rotation is not None:
            x = self.qtensor.rotation.apply(x)
        return F.linear(x, self.weight.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))


class VectorCodebooks(Method):
    """The simulated recipe (benchmark only; see the module doc)."""

    name = "vq-simulated"  # beside the stored recipe `vq`, never in its place
    options = (DAMP, ACT_ORDER, ROTATE)
    integer_bits = False
    bit_range = (1, 4)
    default_act_order = True

    def quantize(self, W: torch.Tensor, stats: LayerStats | None, config: QuantConfig) -> SimulatedTensor:
        dim = SETTINGS["dim"]
        index_bits = round(config.bits * dim)
        if not math.isclose(index_bits, config.bits * dim) or W.shape[1] % dim:
            raise ValueError(f"{config.bits} bits in pieces of {dim} is not a whole index width")
        entries = 1 << index_bits
        H = stats.hessian.hessian()
        scales = W.square().mean(dim=1).sqrt().clamp_min(1e-8).half().float()
        codebook = _gaussian_codebook(entries, dim)
        codebook_bits = 0
        if SETTINGS["codebook"] == "matrix":  # fitted to the pieces as they will be cut (act-order)
            order = act_order_perm(H) if config.act_order else torch.arange(W.shape[1])
            codebook = self._fit_codebook(W[:, order], torch.diagonal(H)[order], scales, codebook)
            codebook_bits = entries * dim * 16
        _, chosen, perm = vector_gptq(W, H, codebook, scales, config.damp, config.act_order)
        if SETTINGS["refit_scales"]:
            Wp, Hp = (W, H) if perm is None else (W[:, perm], H[perm[:, None], perm[None, :]])
            scales = refit_row_scales(Wp, chosen, Hp, scales).half().float()
        values = scales[:, None] * chosen
        if perm is not None:
            values = values[:, torch.argsort(perm)]
        rows, columns = W.shape
        bits = (
            rows * columns // dim * index_bits + rows * 16 + codebook_bits + (columns * 32 if perm is not None else 0)
        )
        return SimulatedTensor(values.contiguous(), bits)

    @staticmethod
    def _fit_codebook(W: torch.Tensor, h: torch.Tensor, scales: torch.Tensor, init: torch.Tensor) -> torch.Tensor:
        """K-means of W's scaled d-column pieces, each coordinate weighted by its column's diag(H) entry `h`."""
        dim = init.shape[1]
        pieces = (W / scales[:, None]).reshape(-1, dim)
        weights = h.clamp_min(1e-8).repeat(W.shape[0]).reshape(-1, dim)
        return weighted_kmeans(pieces, weights, init, SETTINGS["kmeans_iters"]).half().float()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bits", type=float, default=2.0, help="code bits per weight (dim × bits: whole)")
    parser.add_argument("--dim", type=int, default=4)
    parser.add_argument("--codebook", choices=("gaussian", "matrix"), default="gaussian")
    parser.add_argument("--no-rotate", action="store_true")
    parser.add_argument("--no-refit-scales", action="store_true")
    parser.add_argument("--nsamples", type=int, default=32)
    parser.add_argument("--max-windows", type=int, default=40)
    parser.add_argument("--datasets", default="wikitext2")
    parser.add_argument("--kl", action="store_true")
    args = parser.parse_args()
    SETTINGS.update(dim=args.dim, codebook=args.codebook, refit_scales=not args.no_refit_scales)

    METHODS[VectorCodebooks.name] = VectorCodebooks()
    loaded = load_model("smollm2-135m", dtype=torch.float32)
    config = QuantConfig(
        method=VectorCodebooks.name,
        bits=args.bits,
        nsamples=args.nsamples,
        calib_dtype="float32",
        rotate=not args.no_rotate,
    )
    windows = _calibration(loaded.tokenizer, loaded.model, config)
    calibrate.QuantLinear = SimulatedLinear  # the driver swaps in the simulated linears
    start = time.perf_counter()
    calibrate.quantize_model(loaded.model, config, windows)
    quantize_seconds = time.perf_counter() - start
    linears = [m for m in loaded.model.modules() if isinstance(m, SimulatedLinear)]
    bits = sum(m.qtensor.storage_bits() for m in linears) / sum(m.in_features * m.out_features for m in linears)
    for evaluated in evaluate_corpora(loaded, "smollm2-135m", args.datasets, args.max_windows, args.kl):
        log_result(
            "vector_codebooks",
            {
                "bits": args.bits,
                "dim": args.dim,
                "codebook": args.codebook,
                "rotate": not args.no_rotate,
                "refit_scales": not args.no_refit_scales,
                "act_order": config.act_order,
                "nsamples": args.nsamples,
                "calib_dtype": "float32",
                "bits_per_weight": bits,
                "linears": len(linears),
                "quantize_seconds": quantize_seconds,
                **evaluated,
            },
        )


if __name__ == "__main__":
    main()
