"""Experiment (tried and dropped, see RESULTS.md): residuals fitted for dynamic selection one decoder
layer at a time, each linear's statistics taken with every earlier linear already compensated
(the activations decoding will see), and optionally towards the unquantized model's output:
the target is R x + alpha · W (x̄ − x), x̄ the fp model's input to the same linear.

Usage: python benchmarks/dec_fit_sequential.py QDIR OUTDIR ALPHA [K] [NSAMPLES] [EVAL_WINDOWS]
Writes OUTDIR (links to QDIR's files plus the fitted residuals) and prints the perplexity with
--dec K on the first EVAL_WINDOWS windows of WikiText-2 test (float32).
"""

import contextlib
import os
import sys
import time
from pathlib import Path

import torch

from anybit.calibrate import _run_layer, capture_layer_inputs
from anybit.data import calibration_windows, load_corpus, tokenize_corpus
from anybit.format.io import save_residuals
from anybit.model.adapters import get_adapter, get_submodule
from anybit.model.loading import load_model
from anybit.pipeline import evaluate_spec
from anybit.runtime.dec import FIT_RIDGE, compensation, quantize_residual, select_channels
from anybit.runtime.qlinear import dense_weights

qdir, outdir, alpha = sys.argv[1], Path(sys.argv[2]), float(sys.argv[3])
K = int(sys.argv[4]) if len(sys.argv) > 4 else 8
nsamples = int(sys.argv[5]) if len(sys.argv) > 5 else 8
evalwin = int(sys.argv[6]) if len(sys.argv) > 6 else 10
outdir.mkdir(parents=True, exist_ok=True)
for f in Path(qdir).iterdir():
    if f.name != "residuals.safetensors" and not (outdir / f.name).exists():
        os.symlink(f.resolve(), outdir / f.name)

torch.set_grad_enabled(False)
start = time.time()
loaded = load_model(qdir)
original = load_model(loaded.quant_info["source"])
qmodel, fmodel = loaded.model.to(torch.float32), original.model.to(torch.float32)
adapter = get_adapter(qmodel)
windows = calibration_windows(tokenize_corpus(loaded.tokenizer, load_corpus("wikitext2-valid")), nsamples, 2048, seed=0)
cpu = torch.device("cpu")
qh, args, kwargs = capture_layer_inputs(qmodel, adapter, windows, cpu, torch.float32)
fh, _, _ = capture_layer_inputs(fmodel, adapter, windows, cpu, torch.float32)
print("inputs equal:", torch.equal(qh, fh), flush=True)
names = {id(m): n for n, m in qmodel.named_modules()}
residuals, means = {}, {}
with dense_weights(qmodel):
    for index, (qlayer, flayer) in enumerate(zip(adapter.layers(qmodel), adapter.layers(fmodel), strict=True)):
        prefix = names[id(qlayer)]
        finputs = {g: [] for g in range(len(adapter.groups))}
        handles = [
            get_submodule(flayer, group[0]).register_forward_pre_hook(
                lambda _m, a, g=g, finputs=finputs: finputs[g].append(a[0][0].float().clone())
            )
            for g, group in enumerate(adapter.groups)
        ]
        fnext = _run_layer(flayer, fh, args, kwargs)
        for h in handles:
            h.remove()
        with contextlib.ExitStack() as stack:
            for g, group in enumerate(adapter.groups):
                sums = {}
                count = [0]

                def hook(_m, a, g=g, sums=sums, count=count, finputs=finputs):
                    x = a[0][0].float()
                    xbar = finputs[g][count[0]]
                    count[0] += 1
                    idx = select_channels(x, K)
                    z = torch.zeros_like(x).scatter_(1, idx, x.gather(1, idx))
                    inc = {
                        "A": x.t() @ z,
                        "B": xbar.t() @ z,
                        "G": z.t() @ z,
                        "D": x.square().sum(0),
                        "abs": x.abs().sum(0),
                    }
                    for k, v in inc.items():
                        v = v.double()
                        sums[k] = sums[k] + v if k in sums else v

                first = get_submodule(qlayer, group[0])
                h = first.register_forward_pre_hook(hook)
                _run_layer(qlayer, qh, args, kwargs)
                h.remove()
                ntok = count[0] * qh.shape[1]
                fitted = {}
                for name in group:
                    full = f"{prefix}.{name}"
                    module = get_submodule(qlayer, name)
                    W = adapter.weight_of(get_submodule(flayer, name)).half().double()
                    What = module.dequantize().double()
                    R = W - What
                    reg = FIT_RIDGE * sums["D"] + 1e-12 * sums["D"].mean().clamp(min=1e-30)
                    T = R @ sums["A"] + alpha * W @ (sums["B"] - sums["A"])
                    rhs = T + R * reg[None, :]
                    lhs = sums["G"] + torch.diag(reg)
                    C = torch.linalg.solve(lhs, rhs.t()).t().float()
                    residuals[full] = quantize_residual(C)
                    means[full] = (sums["abs"] / ntok).float()
                    fitted[full] = module
                stack.enter_context(compensation(fitted, {n: residuals[n] for n in fitted}, K, overlap=False))
            qh = _run_layer(qlayer, qh, args, kwargs)
        fh = fnext
        print(f"layer {index} done {time.time() - start:.0f}s", flush=True)

info = {
    "source": loaded.quant_info["source"],
    "bits": 4,
    "calib": "wikitext2-valid",
    "nsamples": nsamples,
    "seqlen": 2048,
    "fit_k": K,
    "ridge": FIT_RIDGE,
    "scratch_sequential_alpha": alpha,
}
save_residuals(outdir, residuals, means, info)
print(f"fit {time.time() - start:.0f}s", flush=True)
del original, fmodel
loaded = load_model(str(outdir))
r = evaluate_spec(loaded, "wikitext2", max_windows=evalwin, dtype="float32", dec=K, progress=False)
print("RESULT", outdir.name, alpha, K, evalwin, r.to_dict(), flush=True)
