"""Quantization primitives: pure functions on tensors, on whatever device the tensors live."""
