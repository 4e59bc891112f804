"""The layer-wise driver's calibration inputs: from the already-quantized layers (the default) or from the
original model (`--layer-inputs original`, one forward pass per layer)."""

import pytest
import torch

import anybit.calibrate as calibrate
from anybit.config import QuantConfig
from anybit.data import calibration_windows, load_corpus, tokenize_corpus
from anybit.model import load_model


@pytest.mark.parametrize("layer_inputs", ["quantized", "original"])
def test_layer_inputs_come_from_the_chosen_model(tiny_llama_dir, corpus_file, monkeypatch, layer_inputs):
    loaded = load_model(str(tiny_llama_dir))
    ids = tokenize_corpus(loaded.tokenizer, load_corpus(str(corpus_file)))
    windows = calibration_windows(ids, 2, 32, 0)
    with torch.inference_mode():
        states = [loaded.model(w[None], output_hidden_states=True).hidden_states for w in windows]
    original_inputs = [torch.cat([s[i] for s in states]) for i in range(len(states[0]) - 1)]

    seen, calls = [], []
    for name in ("_collect_stats", "_collect_stats_only"):
        real = getattr(calibrate, name)

        def spy(layer, adapter, hidden, *rest, _real=real):
            seen.append(hidden.clone())
            return _real(layer, adapter, hidden, *rest)

        monkeypatch.setattr(calibrate, name, spy)
    layers = loaded.model.model.layers
    handles = [layer.register_forward_pre_hook(lambda *_: calls.append(1)) for layer in layers]
    config = QuantConfig(method="gptq", bits=4, group_size=32, calib_dtype="float32", layer_inputs=layer_inputs)
    calibrate.quantize_model(loaded.model, config, windows, progress=False)
    for h in handles:
        h.remove()

    assert len(seen) == len(layers)
    torch.testing.assert_close(seen[0], original_inputs[0])  # the embedding's output either way
    later_match = all(torch.allclose(s, o, atol=1e-5) for s, o in zip(seen[1:], original_inputs[1:], strict=True))
    assert later_match == (layer_inputs == "original")
    passes = 1 if layer_inputs == "original" else 2  # the quantized layer runs again to feed the next one
    assert len(calls) == passes * len(layers) * len(windows)


def test_unknown_layer_inputs_are_refused():
    from anybit.errors import AnybitError

    with pytest.raises(AnybitError, match="layer_inputs must be one of"):
        QuantConfig(method="gptq", layer_inputs="teacher")
