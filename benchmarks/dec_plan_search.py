"""Search a per-layer-type DEC plan (k_chunk for qkv, o, gu, down) within the host-memory traffic of
uniform `--dec K`, judged on calibration text (WikiText-2 validation), never on the test set.

Usage: python benchmarks/dec_plan_search.py DIR --budget K [--rounds 4] [--windows 5] [--dtype float32]
Greedy over the residuals stored in DIR: starting from no compensation, each round tries, for every
layer type, raising its k_chunk until it reads `budget / rounds` more bytes per token (the last round:
all that is left), evaluates each candidate's perplexity on the search windows, and keeps the best.
One JSON line per evaluation to benchmarks/results/dec_plan_search.jsonl; the last line printed is the
plan, to pass as `--dec PLAN` (and `anybit residual DIR --fit PLAN`).
"""

from __future__ import annotations

import argparse

from _common import log_result
from anybit.model.adapters import Adapter, get_adapter
from anybit.model.checkpoint import load_residuals
from anybit.model.loading import load_model
from anybit.pipeline import evaluate_spec
from anybit.runtime.dec import CHUNK, DEC_ROLES, DecPlan

SEARCH_CORPUS = "wikitext2-valid"


class Traffic:
    """Residual bytes per token of the plan with these k_chunks (all 0: none)."""

    def __init__(self, residuals: dict, adapter: Adapter) -> None:
        self.residuals, self.adapter = residuals, adapter

    def of(self, ks: tuple[int, ...]) -> int:
        return DecPlan(ks).fetch_bytes(self.residuals, self.adapter) if max(ks) else 0


def raise_type(ks: tuple[int, ...], i: int, traffic: Traffic, step: int, limit: int) -> tuple[int, ...] | None:
    """`ks` with type i's k_chunk raised by the least that adds `step` bytes, or the most within `limit`."""
    base, best = traffic.of(ks), None
    for k in range(ks[i] + 1, CHUNK + 1):
        candidate = (*ks[:i], k, *ks[i + 1 :])
        cost = traffic.of(candidate)
        if cost > limit:
            break
        if cost > base:
            best = candidate
        if cost - base >= step:
            break
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dir")
    parser.add_argument("--budget", type=int, required=True, help="uniform k_chunk whose traffic is the budget")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--windows", type=int, default=5, help="search windows of the validation text")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    residuals, _, meta = load_residuals(args.dir)
    if "fit_k" in meta:
        raise SystemExit(
            f"{args.dir} holds residuals fitted for --dec {meta['fit_k']}; `anybit residual {args.dir}` first"
        )
    loaded = load_model(args.dir)
    traffic = Traffic(residuals, get_adapter(loaded.model))
    limit = traffic.of((args.budget,) * len(DEC_ROLES))
    step = -(-limit // args.rounds)

    def ppl(ks: tuple[int, ...]) -> float:
        plan = DecPlan(ks) if max(ks) else None
        result = evaluate_spec(
            loaded,
            SEARCH_CORPUS,
            max_windows=args.windows,
            dtype=args.dtype,
            device=args.device,
            dec=plan,
            progress=False,
        )
        log_result(
            "dec_plan_search",
            {"dir": args.dir, "budget": args.budget, "budget_bytes": limit, "plan": None if plan is None else str(plan),
             "bytes": traffic.of(ks), "search_windows": args.windows, "ppl": result.ppl},
        )  # fmt: skip
        return result.ppl

    current = (0,) * len(DEC_ROLES)
    best_ppl = ppl(current)
    uniform_ppl = ppl((args.budget,) * len(DEC_ROLES))
    for _ in range(args.rounds):
        candidates = [raise_type(current, i, traffic, step, limit) for i in range(len(DEC_ROLES))]
        scored = [(ppl(c), c) for c in dict.fromkeys(c for c in candidates if c is not None)]
        if not scored or min(scored)[0] >= best_ppl:
            break
        best_ppl, current = min(scored)
    print(f"uniform {args.budget}: {uniform_ppl:.3f}; plan {DecPlan(current)}: {best_ppl:.3f} "
          f"({traffic.of(current)} of {limit} bytes per token)")  # fmt: skip
    print(DecPlan(current))


if __name__ == "__main__":
    main()
