"""Storage: bit packing, `QuantizedTensor` and `VectorTensor`, and the quantized model directory."""

from anybit.format.qtensor import QuantizedTensor, SparseOutliers
from anybit.format.vector import VectorTensor

__all__ = ["QuantizedTensor", "SparseOutliers", "VectorTensor"]
