"""Model loading (HF directories, GGUF files, the reference alias, quantized directories) and adapters."""

from anybit.model.adapters import ADAPTERS, Adapter, get_adapter
from anybit.model.loading import LoadedModel, load_model

__all__ = ["ADAPTERS", "Adapter", "LoadedModel", "get_adapter", "load_model"]
