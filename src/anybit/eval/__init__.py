"""Evaluation: perplexity by the GPTQ protocol, and agreement with the unquantized model."""

from anybit.eval.perplexity import EvalResult, evaluate

__all__ = ["EvalResult", "evaluate"]
