"""Experiment (kept in this commit only): how much of the fitted correction's gain 4-bit storage loses.

Usage: python benchmarks/dec_fit_storage.py DIR K
Fits C on 8 WikiText-2 validation windows (seed 0) for k_chunk K and prints, per layer type, the output
error left, Σ‖R x − M z‖² / Σ‖R x‖², on 4 other validation windows (seed 1) for M = 0, R, 4-bit R,
C, 4-bit C with plain scales and 4-bit C with scales weighted by G_jj + λ D_j.
"""

import sys
from collections import defaultdict

import torch

from anybit.data import calibration_windows, load_corpus, tokenize_corpus
from anybit.model.adapters import get_adapter
from anybit.model.loading import load_model
from anybit.runtime.dec import fit_correction, quantize_residual, select_channels
from anybit.runtime.qlinear import dense_weights, quant_linears

torch.set_grad_enabled(False)
qdir, K = sys.argv[1], int(sys.argv[2])
loaded = load_model(qdir)
original = load_model(loaded.quant_info["source"])
adapter = get_adapter(original.model.config.model_type)
layers = dict(quant_linears(loaded.model))
R = {}
for name, layer in layers.items():
    W = adapter.weight_of(original.model.get_submodule(name)).half()
    R[name] = W.float() - layer.dequantize().float()
del original
ids = tokenize_corpus(loaded.tokenizer, load_corpus("wikitext2-valid"))
fitw = calibration_windows(ids, 8, 2048, seed=0)
evalw = calibration_windows(ids, 4, 2048, seed=1)
model = loaded.model.float()


class Stats:
    def __init__(self, with_h):
        self.s = defaultdict(dict)
        self.with_h = with_h
        self.last = None
        self.h = [m.register_forward_pre_hook(self.hook(n)) for n, m in layers.items()]

    def hook(self, name):
        def f(_m, args):
            x = args[0]
            if self.last is None or self.last[0] is not x:
                flat = x.reshape(-1, x.shape[-1]).double()
                idx = select_channels(flat, K)
                z = torch.zeros_like(flat).scatter_(1, idx, flat.gather(1, idx))
                inc = {"A": flat.t() @ z, "G": z.t() @ z, "D": flat.square().sum(0)}
                if self.with_h:
                    inc["H"] = flat.t() @ flat
                self.last = (x, inc)
            for k, v in self.last[1].items():
                st = self.s[name]
                st[k] = st[k] + v if k in st else v.clone()

        return f

    def remove(self):
        for h in self.h:
            h.remove()
        self.last = None


def run(windows, with_h):
    st = Stats(with_h)
    with dense_weights(model):
        for w in windows:
            model(w[None], use_cache=False)
    st.remove()
    return st.s


fit = run(fitw, False)
ev = run(evalw, True)


def err(name, M):
    e = ev[name]
    Rd, Md = R[name].double(), M.double()
    return (
        torch.trace(Rd @ e["H"] @ Rd.t()) - 2 * torch.trace(Rd @ e["A"] @ Md.t()) + torch.trace(Md @ e["G"] @ Md.t())
    ).item()


def quant_weighted(C, w):
    """per-row scale search minimising Σ_j w_j (C_ij − q)²"""
    peak = C.abs().amax(1).clamp(min=1e-12) / 7
    best = torch.full_like(peak, float("inf"))
    bs = peak.clone()
    for t in range(1, 33):
        s = (peak * t / 32).half().float()
        q = torch.clamp(torch.round(C / s[:, None]), -7, 7) * s[:, None]
        e = ((C - q).square() * w[None, :]).sum(1)
        b = e < best
        best = torch.where(b, e, best)
        bs = torch.where(b, s, bs)
    return torch.clamp(torch.round(C / bs[:, None]), -7, 7) * bs[:, None]


tot = defaultdict(lambda: defaultdict(float))
for name in layers:
    kind = name.split(".")[-1]
    C = fit_correction(R[name], fit[name]["A"], fit[name]["G"], fit[name]["D"], 0.1)
    w = fit[name]["G"].diagonal().float()
    variants = {
        "none": torch.zeros_like(R[name]),
        "R": R[name],
        "Rq": quantize_residual(R[name]).dense(),
        "C": C,
        "Cq": quantize_residual(C).dense(),
        "Cq_w": quant_weighted(C, w + 1e-3 * w.mean()),
    }
    for v, M in variants.items():
        e = err(name, M)
        tot[kind][v] += e
        tot["all"][v] += e
for kind, d in tot.items():
    base = d["none"]
    print(kind, " ".join(f"{v}={d[v] / base:.3f}" for v in d))
