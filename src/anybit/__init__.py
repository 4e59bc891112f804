"""anybit: post-training weight quantization of causal LMs to any average bit-width.

Importing anybit registers its directory format with transformers, so that
`AutoModelForCausalLM.from_pretrained(DIR)` loads an anybit directory (`anybit.model.hf_quantizer`). The
registration waits until transformers' quantizers are imported, so `import anybit` itself stays light.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys

__version__ = "0.1.0"

_QUANTIZERS = "transformers.quantizers.auto"
_REGISTRATION = "anybit.model.hf_quantizer"


class _RegisterWithTransformers(importlib.abc.MetaPathFinder):
    """Imports anybit's transformers quantizer right after transformers' quantizer registry is imported."""

    def find_spec(self, name, path, target=None):
        if name != _QUANTIZERS:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def exec_then_register(module) -> None:
            exec_module(module)
            importlib.import_module(_REGISTRATION)

        spec.loader.exec_module = exec_then_register
        return spec


if _QUANTIZERS in sys.modules:
    importlib.import_module(_REGISTRATION)
elif not any(isinstance(finder, _RegisterWithTransformers) for finder in sys.meta_path):
    sys.meta_path.insert(0, _RegisterWithTransformers())
