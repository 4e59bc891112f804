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
