"""Resident memory: pages of a memory-mapped checkpoint handed back once copied, the 8-bit embedding and
head packed as they are read (never held in float32), finiteness checked a chunk at a time, and tensors spilled
to a temporary file read back as they were."""

import pytest
import torch
import transformers as tf
from click.testing import CliRunner
from safetensors import safe_open
from safetensors.torch import save_file

from anybit.cli import main
from anybit.format import qtensor
from anybit.memory import SpillFile, release_file_pages
from anybit.model.loading import load_model
from anybit.pipeline import configure_runtime
from anybit.runtime.head import QuantEmbedding, quantize_head
from conftest import tiny_config


def test_released_file_pages_read_back_the_same_values(tmp_path) -> None:
    values = torch.randn(256, 1024)
    save_file({"w": values}, str(tmp_path / "w.safetensors"))
    with safe_open(str(tmp_path / "w.safetensors"), framework="pt") as f:
        mapped = f.get_tensor("w")
    assert torch.equal(mapped, values)  # every page touched
    assert release_file_pages([mapped]) > 0
    assert torch.equal(mapped, values)  # read again from the file
    in_memory = values.clone()
    assert release_file_pages([in_memory]) == 0  # ordinary memory is left alone
    assert torch.equal(in_memory, values)


def test_spilled_tensors_read_back_as_they_were() -> None:
    tensors = [
        torch.randn(3, 5).half(),
        torch.randn(2, 7, dtype=torch.bfloat16),
        torch.arange(11),
        torch.randint(0, 255, (4, 4), dtype=torch.uint8),
        torch.randn(6, 4).t(),  # not contiguous
        torch.zeros(0, 8),
        torch.tensor(2.5),
    ]
    with SpillFile() as spill:
        handles = [spill.put(t) for t in tensors]
        for tensor, handle in zip(tensors, handles, strict=True):
            back = handle.load()
            assert back.dtype == tensor.dtype and back.shape == tensor.shape and torch.equal(back, tensor)


@pytest.mark.parametrize("position", [0, 20, 39])
def test_all_finite_checks_every_chunk(monkeypatch, position: int) -> None:
    monkeypatch.setattr(qtensor, "FINITE_CHUNK", 7)
    values = torch.ones(5, 8, dtype=torch.float16)
    assert qtensor.all_finite(values)
    values.view(-1)[position] = float("nan") if position % 2 else float("inf")
    assert not qtensor.all_finite(values)
    assert not qtensor.all_finite(values.t())  # not contiguous


@pytest.mark.parametrize("tied", [True, False])
def test_the_head_packed_while_loading_is_the_head_packed_after(tiny_tokenizer, tmp_path, tied: bool) -> None:
    """`load_model(head="int8")` packs the embedding and head from their stored float16 values: the same
    codes, scales and logits as packing the float32 model after loading, and no float16 weight is left."""
    torch.manual_seed(0)
    config = tiny_config("llama", len(tiny_tokenizer))
    config.tie_word_embeddings = tied
    source = tmp_path / "source"
    tf.AutoModelForCausalLM.from_config(config).save_pretrained(source)
    tiny_tokenizer.save_pretrained(source)
    out = str(tmp_path / "q")
    done = CliRunner().invoke(main, ["quantize", str(source), "--method", "rtn", "--bits", "4", "--out", out])
    assert done.exit_code == 0, done.output

    after = load_model(out)
    info_after = configure_runtime(after, head="int8")
    packed = load_model(out, head="int8")
    assert isinstance(packed.model.get_input_embeddings(), QuantEmbedding)
    assert all(p.dtype == torch.float32 for p in packed.model.parameters() if p.is_floating_point())
    assert configure_runtime(packed, head="int8") == info_after  # packing again changes nothing
    assert quantize_head(packed.model, "int8") == info_after
    with pytest.raises(ValueError, match="packed already"):
        quantize_head(packed.model, "dense")
    for a, b in zip(after.model.buffers(), packed.model.buffers(), strict=True):
        assert torch.equal(a, b)
    ids = torch.randint(0, len(tiny_tokenizer), (1, 12))
    with torch.inference_mode():
        assert torch.equal(after.model(ids).logits, packed.model(ids).logits)


def test_the_fast_kernel_reads_one_width_codes_where_they_are_stored() -> None:
    """On the AVX-512 path the stored stream of a one-width tensor is the kernel's layout: no copy is held.
    Mixed widths (and the other paths) are re-laid."""
    from anybit.kernels import cpu_fast
    from qtensors import codebook_tensor

    if reason := cpu_fast.unavailable(codebook_tensor(8, 64, 64, (2,))):
        pytest.skip(f"no fast CPU kernel here: {reason}")
    single, mixed = codebook_tensor(16, 128, 64, (8,)), codebook_tensor(16, 128, 64, (2, 3))
    one, two = cpu_fast.prepare(single), cpu_fast.prepare(mixed)
    avx512 = cpu_fast.code_path() == "avx512"
    assert one.owns_codes is not avx512 and two.owns_codes
    assert (one.codes.data_ptr() == single.codes[8].data_ptr()) is avx512
