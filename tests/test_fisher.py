import torch

from anybit.fisher import fisher_diagonal
from anybit.model import get_adapter


def test_fisher_is_mean_squared_gradient(tiny_tokenizer) -> None:
    from transformers import AutoModelForCausalLM

    from conftest import tiny_config

    model = AutoModelForCausalLM.from_config(tiny_config("gpt2", len(tiny_tokenizer))).eval()
    adapter = get_adapter(model)
    windows = torch.randint(0, len(tiny_tokenizer), (3, 16))
    fisher = fisher_diagonal(model, adapter, windows, progress=False)
    assert set(fisher) == {f"{i}.{n}" for i in range(2) for n in adapter.linear_names}
    assert not any(p.requires_grad for p in model.parameters())

    weight = model.transformer.h[1].mlp.c_fc.weight  # Conv1D: stored (in, out)
    expected = torch.zeros_like(weight)
    for w in windows:
        weight.requires_grad_(True)
        loss = model(w[None], labels=w[None]).loss
        (grad,) = torch.autograd.grad(loss, weight)
        expected += grad**2 / len(windows)
    torch.testing.assert_close(fisher["1.mlp.c_fc"], expected.t())  # reported as (out, in)


def test_fisher_accumulators_spill_to_a_mapped_file_alike(tiny_tokenizer, monkeypatch) -> None:
    """Accumulators too large for memory live in a memory-mapped file; the values are the same."""
    from transformers import AutoModelForCausalLM

    import anybit.fisher as fisher_module
    from conftest import tiny_config

    model = AutoModelForCausalLM.from_config(tiny_config("llama", len(tiny_tokenizer))).eval()
    adapter = get_adapter(model)
    windows = torch.randint(0, len(tiny_tokenizer), (2, 16))
    in_memory = fisher_diagonal(model, adapter, windows, progress=False)
    monkeypatch.setattr(fisher_module, "RESIDENT_ACCUMULATOR_BYTES", 0)
    monkeypatch.setattr(fisher_module, "STORED_INPUT_BYTES", 1)  # one window per batch
    mapped = fisher_diagonal(model, adapter, windows, progress=False)
    assert in_memory.keys() == mapped.keys()
    for key in in_memory:
        assert torch.equal(in_memory[key], mapped[key]), key


def test_error_tables_from_the_fisher_pass_match_a_separate_table_pass(tiny_llama_dir, corpus_file, monkeypatch):
    """Where the Fisher pass keeps every layer's input, its recomputation of each layer collects the error tables;
    forced into one window per batch, a separate statistics pass collects them: same quantized model."""
    import anybit.fisher as fisher_module
    from anybit.calibrate import _TableCollector, quantize_model
    from anybit.config import QuantConfig
    from anybit.data import calibration_windows, load_corpus, tokenize_corpus
    from anybit.model import load_model
    from anybit.runtime import quant_linears

    config = QuantConfig(
        method="anybit", bits=3.3, nsamples=3, fisher_nsamples=2, seqlen=32, calib_dtype="float32",
        calib=str(corpus_file),
    )  # fmt: skip
    observed = []
    original_after = _TableCollector.after
    monkeypatch.setattr(_TableCollector, "after", lambda self, i, *a: (observed.append(i), original_after(self, i, *a)))
    runs = []
    for stored_bytes in (fisher_module.STORED_INPUT_BYTES, 1):
        monkeypatch.setattr(fisher_module, "STORED_INPUT_BYTES", stored_bytes)
        loaded = load_model(str(tiny_llama_dir))
        ids = tokenize_corpus(loaded.tokenizer, load_corpus(str(corpus_file)))
        quantize_model(loaded.model, config, calibration_windows(ids, 3, 32, 0), progress=False)
        runs.append({name: layer.dequantize() for name, layer in quant_linears(loaded.model)})
        observed.append("run")
    assert observed == [1, 0, "run", "run"]  # the Fisher pass saw both layers, last first, only in the first run
    merged, separate = runs
    assert merged.keys() == separate.keys()
    for name in merged:
        assert torch.equal(merged[name], separate[name]), name


def test_statistics_pass_stops_before_the_last_group_product(tiny_llama_dir) -> None:
    """The committing driver's statistics pass gives the XᵀX of a full forward without the down-projection."""
    from anybit.calibrate import _collect_stats, _collect_stats_only
    from anybit.config import QuantConfig
    from anybit.layerwise import capture_layer_inputs
    from anybit.methods import get_method
    from anybit.model import load_model

    model = load_model(str(tiny_llama_dir)).model
    adapter = get_adapter(model)
    hidden, args, kwargs = capture_layer_inputs(
        model, adapter, torch.randint(0, 100, (2, 16)), torch.device("cpu"), torch.float32
    )
    layer, method = adapter.layers(model)[0], get_method("anybit")
    config = QuantConfig(method="anybit")
    full, _ = _collect_stats(layer, adapter, hidden, args, kwargs, method, config)
    calls = []
    handle = layer.mlp.down_proj.register_forward_hook(lambda *_: calls.append(1))
    try:
        only = _collect_stats_only(layer, adapter, hidden, args, kwargs, method, config)
    finally:
        handle.remove()
    assert not calls
    assert full.keys() == only.keys()
    for name in full:
        assert full[name].hessian.tokens == only[name].hessian.tokens == 32
        assert torch.equal(full[name].hessian.XtX, only[name].hessian.XtX), name
