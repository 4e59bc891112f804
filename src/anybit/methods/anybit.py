"""anybit's own recipe: SKIM's per-row codebooks and model-wide widths, Fisher-weighted, with GPTQ-style
error feedback onto the codebooks."""

from __future__ import annotations

from anybit.methods.base import ACT_ORDER, ROTATE
from anybit.methods.skim import SKIM


class AnyBit(SKIM):
    """anybit's recipe: SKIM's per-row widths from one model-wide budget, rows compared by their
    Fisher-estimated effect on the loss and clustered with Fisher weights, then GPTQ-style rounding
    of each column onto its row's codebook with error feedback through H⁻¹ (kept when it lowers the
    layer-wise error), optionally alternated with least-squares codebook refits (`--refine`). Settings
    chosen by the ablations in RESULTS.md: without Fisher, raw layer-wise errors of different layers are
    not comparable and the model-wide budget goes wrong.
    """

    name = "anybit"
    options = (*SKIM.options, ACT_ORDER, ROTATE)
    default_scope = "model"
    default_weighting = "fisher"
    default_scaling = False
    error_feedback = True
    default_act_order = True
    default_refine = 1
