"""Running quantized models: `QuantLinear` and its helpers."""

from anybit.runtime.qlinear import QuantLinear, dense_weights, quant_linears

__all__ = ["QuantLinear", "dense_weights", "quant_linears"]
