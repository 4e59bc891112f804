"""Dynamic error compensation (QDEC / DecDEC, Park et al., 2024): the quantization residual
R = W − Q(W) of every linear, itself stored in 4 bits in host memory, and per token the residual rows
of the input channels with the largest |x| added back to the quantized product.

Residual format (per linear, PyTorch layout W: (out, in)): `codes` uint8 (in, ceil(out / 2)), two
4-bit codes per byte (even output channel in the low nibble), so the residual row of one input
channel is contiguous; `scales` fp16 (out,), one per output channel. A code c stands for
(c − 8) · scale, c in 1..15: symmetric, 15 levels, no zero point, as in the paper.

Selection: the input vector is cut into chunks of `CHUNK` channels; a chunk of length L keeps its
floor(k_chunk · L / CHUNK) channels of largest score (exact top-k). The paper's score is |x_j|
("activation"); "contribution" scores |x_j| · ‖R̂[:, j]‖, the size of the correction channel j would
add, which costs one precomputed norm per input channel. The static baseline keeps, in each chunk,
the same number of channels with the largest mean score over calibration data. k_chunk may differ by
layer type (`DecPlan`: qkv, o, gate/up, down, as the paper's tuner sets it); a token's compensation
reads the selected rows only, `Residual.fetch_bytes` of them.

Fitted residuals (`fit.fit_correction`, not in the paper) store, in the same format, the correction
that best predicts each layer's whole error from the channels a given k_chunk selects.

Modules: `residual` (the stored format), `select` (which channels), `plan` (k_chunk per layer type, the
`--dec` grammar), `compensate` (at run time, as hooks), `fit` (calibration statistics, fitted residuals).
"""

from anybit.runtime.dec.compensate import Compensator, compensation, join_compensation, launch_compensation
from anybit.runtime.dec.fit import FIT_RIDGE, CalibrationStats, fit_correction
from anybit.runtime.dec.plan import DEC_ROLES, DecPlan, layer_type, per_layer
from anybit.runtime.dec.residual import LEVELS, RESIDUAL_BITS, SCALE_CANDIDATES, Residual, quantize_residual
from anybit.runtime.dec.select import CHUNK, chunk_budgets, select_channels, static_channels

__all__ = [
    "CHUNK", "DEC_ROLES", "FIT_RIDGE", "LEVELS", "RESIDUAL_BITS", "SCALE_CANDIDATES", "CalibrationStats",
    "Compensator", "DecPlan", "Residual", "chunk_budgets", "compensation", "fit_correction", "join_compensation",
    "launch_compensation", "layer_type", "per_layer", "quantize_residual", "select_channels", "static_channels",
]  # fmt: skip
