"""Storage: bit packing, `QuantizedTensor`, and the quantized model directory."""

from anybit.format.qtensor import QuantizedTensor, SparseOutliers

__all__ = ["QuantizedTensor", "SparseOutliers"]
