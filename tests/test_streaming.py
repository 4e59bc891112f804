"""Streaming quantization: layers read from the source files one at a time give exactly the tensors of the
in-memory path, the output may be sharded, and peak memory follows one layer, not the model."""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from anybit.config import QuantConfig
from anybit.format.shards import INDEX_FILE, WEIGHTS_FILE, weight_files
from anybit.model import load_model
from anybit.pipeline import quantize_to_dir


def _stored(directory: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for name, file in weight_files(directory).items():
        with safe_open(directory / file, framework="pt") as f:
            tensors[name] = f.get_tensor(name)
    return tensors


def _assert_same_output(a: Path, b: Path) -> None:
    ta, tb = _stored(a), _stored(b)
    assert ta.keys() == tb.keys()
    differ = [k for k in ta if ta[k].dtype != tb[k].dtype or not torch.equal(ta[k], tb[k])]
    assert not differ, f"streamed and in-memory tensors differ: {differ[:5]}"
    ia, ib = (json.loads((d / "anybit.json").read_text()) for d in (a, b))
    for key in ("layers", "aliases", "storage_bits", "bits_per_weight"):
        assert ia[key] == ib[key], key


@pytest.mark.parametrize(
    "method,extra",
    [
        ("rtn", {"bits": 3, "group_size": 32}),
        ("gptq", {"bits": 4, "act_order": True, "group_size": 32}),
        ("anybit", {"bits": 3.3}),  # Fisher pass, model-wide allocation (two passes), error feedback
    ],
)
def test_streamed_quantization_is_bit_identical_to_in_memory(tiny_model_dir, corpus_file, tmp_path, method, extra):
    config = QuantConfig(method=method, nsamples=4, seqlen=64, calib=str(corpus_file), **extra)
    streamed = quantize_to_dir(str(tiny_model_dir), config, tmp_path / "streamed", progress=False)
    resident = load_model(str(tiny_model_dir))
    in_memory = quantize_to_dir(str(tiny_model_dir), config, tmp_path / "mem", progress=False, loaded=resident)
    _assert_same_output(streamed.out_dir, in_memory.out_dir)
    assert streamed.bits_per_weight == in_memory.bits_per_weight


def test_streamed_gguf_is_bit_identical_to_in_memory(tiny_gguf, corpus_file, tmp_path):
    config = QuantConfig(method="anybit", bits=3.3, nsamples=2, seqlen=64, calib=str(corpus_file))
    streamed = quantize_to_dir(str(tiny_gguf), config, tmp_path / "streamed", progress=False)
    in_memory = quantize_to_dir(
        str(tiny_gguf), config, tmp_path / "mem", progress=False, loaded=load_model(str(tiny_gguf))
    )
    _assert_same_output(streamed.out_dir, in_memory.out_dir)


def test_shard_writer_writes_safetensors_that_safetensors_reads(tmp_path) -> None:
    """Every dtype the format stores, scalars and empty tensors, over several shards: read back equal by
    safetensors itself, each tensor aligned to its element size, no spill file left."""
    from anybit.format.shards import ShardWriter

    torch.manual_seed(0)
    tensors = {
        "codes": torch.randint(0, 255, (37, 5), dtype=torch.uint8),
        "books": torch.randn(37, 3).half(),
        "scale": torch.randn(7),
        "bf": torch.randn(3, 3).bfloat16(),
        "index": torch.arange(5, dtype=torch.int64),
        "i32": torch.arange(11, dtype=torch.int32),
        "flags": torch.tensor([True, False, True]),
        "scalar": torch.tensor(2.5),
        "empty": torch.zeros(0, 4),
        "odd": torch.randint(0, 9, (3,), dtype=torch.uint8),
    }
    writer = ShardWriter(tmp_path, {"format": "pt"}, shard_bytes=120)
    for name, tensor in tensors.items():
        writer.add(name, tensor)
    with pytest.raises(ValueError, match="written twice"):
        writer.add("codes", tensors["codes"])
    names = writer.finish()
    assert INDEX_FILE in names and len(names) > 3
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(names)
    read = {}
    for name, file in weight_files(tmp_path).items():
        with safe_open(tmp_path / file, framework="pt") as f:
            read[name] = f.get_tensor(name)
        raw = (tmp_path / file).read_bytes()
        header = json.loads(raw[8 : 8 + int.from_bytes(raw[:8], "little")])
        start = 8 + int.from_bytes(raw[:8], "little") + header[name]["data_offsets"][0]
        assert start % read[name].element_size() == 0, name
    assert read.keys() == tensors.keys()
    for name, tensor in tensors.items():
        assert read[name].dtype == tensor.dtype and torch.equal(read[name], tensor), name


def test_large_outputs_are_sharded_and_load_alike(tiny_llama_dir, corpus_file, tmp_path, monkeypatch):
    import anybit.format.shards as shards

    config = QuantConfig(method="gptq", bits=4, group_size=32, nsamples=2, seqlen=64, calib=str(corpus_file))
    whole = quantize_to_dir(str(tiny_llama_dir), config, tmp_path / "whole", progress=False)
    monkeypatch.setattr(shards, "SHARD_BYTES", 4096)
    sharded = quantize_to_dir(str(tiny_llama_dir), config, tmp_path / "sharded", progress=False)
    files = sorted(p.name for p in sharded.out_dir.iterdir())
    assert INDEX_FILE in files and WEIGHTS_FILE not in files
    assert len(set(weight_files(sharded.out_dir).values())) > 2
    assert set(json.loads((sharded.out_dir / "anybit.json").read_text())["files"]) == set(files)
    _assert_same_output(whole.out_dir, sharded.out_dir)
    ids = torch.randint(0, 300, (1, 16))
    a, b = (load_model(str(d)).model for d in (whole.out_dir, sharded.out_dir))
    with torch.inference_mode():
        assert torch.equal(a(ids).logits, b(ids).logits)


# Peak memory: models of the same width, SHALLOW and DEEP decoder layers of LAYER_BYTES each in float32, quantized
# in fresh processes. Streaming keeps one layer at a time: the peak must not grow with depth (the in-memory path
# would add (DEEP - SHALLOW) layers), and stays within a few layers' worth above the imports.
HIDDEN, INTERMEDIATE, SHALLOW, DEEP = 1024, 2816, 3, 12
LAYER_BYTES = (4 * HIDDEN * HIDDEN + 3 * HIDDEN * INTERMEDIATE) * 4

_MEASURE = textwrap.dedent(
    """
    import json, resource, sys
    from anybit.config import QuantConfig
    from anybit.pipeline import quantize_to_dir
    config = QuantConfig(method=sys.argv[3], bits=4, group_size=64, nsamples=2, seqlen=32, calib=sys.argv[4])
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    quantize_to_dir(sys.argv[1], config, sys.argv[2], progress=False)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"growth": (after - before) * 1024}))
    """
)


def _write_wide_llama(path: Path, layers: int, tokenizer) -> Path:
    """Random float16 weights written shard by shard (one per layer), never the whole model in memory."""
    import transformers as tf
    from safetensors.torch import save_file

    config = tf.LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=HIDDEN,
        intermediate_size=INTERMEDIATE,
        num_hidden_layers=layers,
        num_attention_heads=8,
        num_key_value_heads=8,
        max_position_embeddings=64,
    )
    with torch.device("meta"):
        skeleton = tf.AutoModelForCausalLM.from_config(config)
    params = dict(skeleton.named_parameters())
    weight_map = {}
    for layer in [*range(layers), None]:
        prefix = f"model.layers.{layer}."
        names = (
            [n for n in params if n.startswith(prefix)]
            if layer is not None
            else [n for n in params if not n.startswith("model.layers.")]
        )
        file = f"model-{'rest' if layer is None else layer}.safetensors"
        tensors = {n: (torch.randn(params[n].shape) * 0.02).half() for n in names}
        save_file(tensors, path / file, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, file))
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    config.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def _peak_growth(model: Path, out: Path, method: str, corpus: Path) -> int:
    proc = subprocess.run(
        [sys.executable, "-c", _MEASURE, str(model), str(out), method, str(corpus)],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(proc.stdout.strip().splitlines()[-1])["growth"]


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_peak_memory_is_flat_in_depth(tmp_path_factory, tiny_tokenizer, corpus_file, tmp_path, method):
    shallow = _write_wide_llama(tmp_path_factory.mktemp("shallow"), SHALLOW, tiny_tokenizer)
    deep = _write_wide_llama(tmp_path_factory.mktemp("deep"), DEEP, tiny_tokenizer)
    grown = {n: _peak_growth(m, tmp_path / f"q{n}", method, corpus_file) for n, m in ((SHALLOW, shallow), (DEEP, deep))}
    mib = {n: f"{g / 2**20:.0f} MiB" for n, g in grown.items()}
    # allocator noise moves the peak by a layer or so; the in-memory path would add DEEP - SHALLOW = 9 layers
    assert grown[DEEP] - grown[SHALLOW] < 3 * LAYER_BYTES, f"peak growth by depth {mib}; a layer is 49 MiB"
    assert grown[DEEP] < (DEEP / 2) * LAYER_BYTES + (300 << 20), mib  # the whole model alone is DEEP layers


def test_outside_modules_read_onto_the_input_device_stay_tied(tiny_llama_dir) -> None:
    """The streamed embedding is read onto its input's device (a GPU run) with the head still tied to it, so
    a later pass reads no `lm_head.weight` that the tied source does not hold ("meta" stands in for the GPU)."""
    from anybit.layerwise import Streamed
    from anybit.model.sources import open_skeleton

    skeleton = open_skeleton("hf", Path(tiny_llama_dir))
    model = skeleton.model
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight  # a tied model
    supply = Streamed(skeleton)
    layers = model.model.layers
    for _ in range(2):  # two passes: the second reads what the first released
        supply.outside(model, layers)
        model.model.embed_tokens(torch.zeros(1, 3, dtype=torch.long, device="meta"))  # read on the first call
        embedding = model.get_input_embeddings().weight
        assert embedding.device.type == "meta" and model.get_output_embeddings().weight is embedding
        supply.release_outside(model, layers)
    assert [name for name, _ in model.named_parameters() if "lm_head" in name] == []
