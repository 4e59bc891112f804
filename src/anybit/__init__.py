"""anybit: post-training weight quantization of causal LMs to any average bit-width."""

__version__ = "0.1.0"
