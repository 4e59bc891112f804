"""The native decoder (each step in C) against the eager Hugging Face model on the same fast kernel, and the
8-bit embedding and head."""

import dataclasses
import warnings

import pytest
import torch
import transformers as tf

from anybit.bench import _cache_argument, decode_speed
from anybit.format.rotation import InputRotation
from anybit.generate import _native_tokens
from anybit.kernels import cpu_fast
from anybit.model.checkpoint import load_quantized, save_quantized
from anybit.quant.uniform import rtn_quantize
from anybit.runtime.dec import compensation, quantize_residual
from anybit.runtime.head import QuantEmbedding, quantize_head
from anybit.runtime.native import (
    LINEARS,
    PATHS,
    NativeDecoder,
    attention,
    cache_halves,
    native_or_warn,
    native_unavailable,
)
from anybit.runtime.native_model import load_native
from anybit.runtime.qlinear import QuantLinear, quant_linears
from conftest import tiny_config
from qtensors import codebook_tensor, column_tensor, vector_tensor

if reason := cpu_fast.unavailable(codebook_tensor(8, 64, 64, (2,))):
    pytest.skip(f"no fast CPU kernel here: {reason}", allow_module_level=True)

VOCAB = 300
INFO = {"method": "test", "source": "random", "config": {}}  # what anybit.json needs beyond the layers
WIDE = dict(hidden_size=128, intermediate_size=256)  # multiples of 64: every linear on the fast kernel


INPUT_GROUPS = {"q": "qkv", "k": "qkv", "v": "qkv", "o": "o", "gate": "gate_up", "up": "gate_up", "down": "down"}


def _quantized(
    family: str, rotate: bool = False, vector: bool = False, columns: bool = False, **overrides
) -> torch.nn.Module:
    """A tiny random model of `family` whose decoder linears are 4-bit group-64 QuantLinears (a mix of
    uniform grids and, for the MLP, per-row codebooks of 2-4 bits), head and embedding packed to 8 bits; with
    `rotate`, every linear has an input rotation (one per group of linears sharing an input, as `--rotate`);
    with `vector`, every linear is vector-coded instead (random 9-bit indices, each row's scale its weight's
    spread, in a random column order); with `columns`, per-column codebooks of 2-4 bits (CLAQ's layout) in a
    random column order."""
    torch.manual_seed(0)
    config = tiny_config(family, VOCAB)
    for key, value in {**WIDE, **overrides}.items():
        setattr(config, key, value)
    model = tf.AutoModelForCausalLM.from_config(config).eval()
    generator = torch.Generator().manual_seed(2)
    for layer in model.model.layers:
        rotations = {}
        for name in LINEARS:
            path = PATHS[name]
            linear = layer.get_submodule(path)
            rows, cols = linear.weight.shape
            if vector:
                qt = vector_tensor(rows, cols, 9, row_scale=linear.weight.detach().std(dim=1) / 0.6)
            elif columns:
                scale = float(linear.weight.detach().std())
                qt = column_tensor(rows, cols, (2, 3, 4), scale=scale, perm=torch.randperm(cols, generator=generator))
            elif name in ("gate", "up", "down"):
                qt = codebook_tensor(rows, cols, cols, (2, 3, 4))
            else:
                qt = rtn_quantize(linear.weight.detach(), 64, torch.full((rows, cols // 64), 4, dtype=torch.uint8))
            if rotate:
                group = INPUT_GROUPS[name]
                rotations.setdefault(group, InputRotation.random(cols, generator))
                qt = dataclasses.replace(qt, rotation=rotations[group])
            parent, _, leaf = path.rpartition(".")
            setattr(layer.get_submodule(parent), leaf, QuantLinear(qt, linear.bias))
    return model


def _eager_greedy(model: torch.nn.Module, ids: torch.Tensor, steps: int) -> tuple[list[int], list[torch.Tensor]]:
    tokens, logits = [], []
    cache = _cache_argument(model)
    with torch.inference_mode():
        out = model(ids, use_cache=True)
        for _ in range(steps):
            step_logits = out.logits[0, -1].float()
            logits.append(step_logits)
            token = int(step_logits.argmax())
            tokens.append(token)
            out = model(torch.tensor([[token]]), use_cache=True, **{cache: getattr(out, cache)})
    return tokens, logits


SERVED = pytest.mark.parametrize(
    "family,overrides",
    [
        ("llama", {}),
        ("llama", {"tie_word_embeddings": True}),
        ("mistral", {"sliding_window": 6}),
        ("qwen2", {}),
        ("qwen3", {"head_dim": 32}),
        # heads of 64 and 128 floats take the blocked attention (int8_lut.c, attend_blocked)
        ("llama", {"num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 64}),
        ("mistral", {"sliding_window": 6, "num_attention_heads": 1, "num_key_value_heads": 1, "head_dim": 128}),
    ],
    ids=["llama", "llama-tied", "mistral-window", "qwen2-bias", "qwen3-qk-norm", "llama-head64", "mistral-head128"],
)


@SERVED
@pytest.mark.parametrize("rotate", [False, True], ids=["", "rotated"])
def test_native_decoding_gives_the_eager_models_greedy_tokens(family: str, overrides: dict, rotate: bool) -> None:
    model = _quantized(family, rotate, **overrides)
    quantize_head(model, "int8")
    assert native_unavailable(model) == ""
    prompt = torch.randint(0, VOCAB, (1, 9), generator=torch.Generator().manual_seed(1))
    expected, expected_logits = _eager_greedy(model, prompt, 12)
    decoder = NativeDecoder(model, 32)
    # a tied 8-bit embedding is looked up in C from the head's re-laid copy
    assert (decoder._embed_rows is not None) == bool(model.config.tie_word_embeddings)
    got = _native_tokens(decoder, prompt, 12, 0.0, set(), None)
    assert got == expected
    # The same products, but the norms and attention sum in another order: an activation that lands on the
    # other side of an int8 rounding boundary moves its block's product by one step, so the logits agree to
    # the rounding's scale (1/127 of the block's largest value), not to float precision.
    decoder.reset()
    first = decoder.forward(prompt[0])
    scale = expected_logits[0].abs().max()
    assert float((first - expected_logits[0]).abs().max()) <= scale / 127


@SERVED
def test_per_column_models_decode_natively(family: str, overrides: dict) -> None:
    """CLAQ's per-column codebooks on the native decoder: the eager model's greedy tokens, and its logits up to
    where a rounding boundary falls (the norms and attention sum in another order); Llama's with rotated inputs."""
    _decodes_as_eager(_quantized(family, rotate=family == "llama" and not overrides, columns=True, **overrides))


@SERVED
def test_vector_coded_models_decode_natively(family: str, overrides: dict) -> None:
    """Vector codebooks (`--method vq`) on the native decoder: their rows multiply the float input, so the
    logits agree with the eager model's (the same fast kernel, Python per layer) up to the 8-bit head's
    rounding of the final hidden state."""
    _decodes_as_eager(_quantized(family, rotate=True, vector=True, **overrides))


def _decodes_as_eager(model: torch.nn.Module) -> None:
    """With the 8-bit head, the native decoder serves `model` and gives its eager greedy tokens for a 20-token
    prompt (past a pass of 8), and its first logits within 1/127 of their largest magnitude."""
    quantize_head(model, "int8")
    assert native_unavailable(model) == ""
    prompt = torch.randint(0, VOCAB, (1, 20), generator=torch.Generator().manual_seed(1))
    expected, expected_logits = _eager_greedy(model, prompt, 12)
    decoder = NativeDecoder(model, 40)
    assert _native_tokens(decoder, prompt, 12, 0.0, set(), None) == expected
    decoder.reset()
    first = decoder.forward(prompt[0])
    assert float((first - expected_logits[0]).abs().max()) <= expected_logits[0].abs().max() / 127


def _attention_reference(q, k_cache, v_cache, pos: int, window: int) -> torch.Tensor:
    """Each query's softmax over its cached keys, in float64: a head per query, grouped heads sharing a KV head."""
    tokens, heads, head_dim = q.shape
    group = heads // k_cache.shape[0]
    out = torch.empty(q.shape, dtype=torch.float64)
    for t in range(tokens):
        p = pos + t
        lo = max(0, p - window + 1) if window else 0
        for h in range(heads):
            keys, values = k_cache[h // group, lo : p + 1].double(), v_cache[h // group, lo : p + 1].double()
            out[t, h] = torch.softmax(keys @ q[t, h].double() * head_dim**-0.5, 0) @ values
    return out


@pytest.mark.parametrize(
    "tokens,pos,heads,kv_heads,head_dim,window,threads",
    [
        (1, 0, 9, 3, 64, 0, 2),  # a first token: one key
        (1, 2047, 9, 3, 64, 0, 2),  # few query sets: the keys split over threads, then combined
        (1, 3000, 2, 2, 128, 0, 5),
        (1, 1000, 4, 2, 128, 0, 2),  # two queries of 128 floats in a pass
        (1, 2000, 8, 2, 64, 700, 2),  # split keys with a window: the first split holds no key of the query
        (5, 700, 9, 3, 64, 0, 2),  # keys in many blocks, the last one cut by causality per token
        (37, 100, 4, 1, 128, 0, 3),  # several sets of tokens (the cache widened to float once), some of one query
        (6, 1500, 16, 1, 128, 0, 4),  # widened, and too few sets: the keys split too
        (3, 1000, 20, 1, 64, 300, 2),  # a group larger than a set; a sliding window across blocks
        (2, 900, 8, 8, 64, 70, 1),  # no grouping, a window shorter than a block
        (17, 0, 6, 2, 32, 0, 2),  # heads of 32 floats: the scalar loop
    ],
)
def test_attention_matches_a_float64_softmax(tokens, pos, heads, kv_heads, head_dim, window, threads) -> None:
    """The decode step's attention in blocks of keys with a running softmax equals the softmax over all keys
    of the float16 cache within float32 summation error (outputs are averages of unit-scale values)."""
    generator = torch.Generator().manual_seed(tokens + pos)
    max_len = pos + tokens + 3  # positions past the last token hold values that must not count
    q = torch.randn(tokens, heads, head_dim, generator=generator) * 3
    k_cache, v_cache = (torch.randn(kv_heads, max_len, head_dim, generator=generator) for _ in range(2))
    k_cache[:, pos + tokens :], v_cache[:, pos + tokens :] = 1e4, 1e4
    k_cache, v_cache = k_cache.half(), v_cache.half()
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got = attention(q, k_cache, v_cache, pos, window)
    finally:
        torch.set_num_threads(previous)
    assert float((got.double() - _attention_reference(q, k_cache, v_cache, pos, window)).abs().max()) < 2e-5


def test_the_cache_rounds_to_float16_as_torch_does_and_saturates() -> None:
    """Every build's float-to-half conversion (F16C in blocks of 8, C for the rest: 8k + 5 values, and each edge
    alone) gives torch's bits: ties to even, subnormals, zeros; beyond the largest half it saturates instead of
    giving infinity."""
    smallest = 2.0**-24  # the smallest subnormal half
    edges = [0.0, -0.0, smallest / 2, smallest * 0.51, smallest * 1.5, 2.0**-14 * (1 - 2**-11), 1 + 2**-11,
             1 + 3 * 2**-11, 1 + 2**-11 + 2**-20, 65504.0, 65519.0, -65504.0, 1 / 3, -2.5e-6]  # fmt: skip
    values = torch.cat([torch.tensor(edges), torch.randn(4000) * torch.logspace(-9, 4, 4000)])[:4037]
    expected = values.half()
    assert torch.equal(cache_halves(values).view(torch.int16), expected.view(torch.int16))
    alone = torch.cat([cache_halves(torch.tensor([edge])) for edge in edges])
    assert torch.equal(alone.view(torch.int16), torch.tensor(edges).half().view(torch.int16))
    assert cache_halves(torch.tensor([65520.0, -1e9, 3e38])).tolist() == [65504.0, -65504.0, 65504.0]


def test_a_dense_head_multiplies_in_torch() -> None:
    model = _quantized("llama")
    prompt = torch.randint(0, VOCAB, (1, 5), generator=torch.Generator().manual_seed(2))
    expected, _ = _eager_greedy(model, prompt, 8)
    assert _native_tokens(NativeDecoder(model, 16), prompt, 8, 0.0, set(), None) == expected


def test_a_decoder_keeps_the_matrices_it_multiplies() -> None:
    """A decoder holds the prepared matrices its C structures point into: asking the layers for other tables
    afterwards (which drops their prepared views) changes nothing for it."""
    import gc

    from anybit.runtime.qlinear import set_kernel

    model = _quantized("llama")
    prompt = torch.randint(0, VOCAB, (5,), generator=torch.Generator().manual_seed(4))
    decoder = NativeDecoder(model, 16)
    expected = decoder.forward(prompt)
    set_kernel(model, "auto", "int16" if model.model.layers[0].mlp.up_proj.tables == "int8" else "int8")
    gc.collect()
    junk = [torch.randn(4096) for _ in range(64)]  # reuse what was freed, were anything freed
    decoder.reset()
    assert torch.equal(decoder.forward(prompt), expected)
    del junk


@pytest.mark.parametrize("family", ["gemma3_text", "phi3", "gpt2"])
def test_other_architectures_decode_eagerly_after_one_warning(family: str) -> None:
    model = tf.AutoModelForCausalLM.from_config(tiny_config(family, VOCAB)).eval()
    assert family in native_unavailable(model)
    with pytest.warns(UserWarning, match="decoding on the eager path") as caught:
        result = decode_speed(model, prompt_tokens=4, new_tokens=2, repeats=1)
    assert len(caught) == 1 and result.decoder == "eager"


def test_unserved_layers_and_hooks_are_named() -> None:
    dense = tf.AutoModelForCausalLM.from_config(tiny_config("llama", VOCAB)).eval()
    assert "self_attn.q_proj is not a quantized linear" in native_unavailable(dense)
    model = _quantized("llama")
    handle = model.model.layers[1].mlp.down_proj.register_forward_hook(lambda *args: None)
    assert "layer 1 mlp.down_proj has hooks" in native_unavailable(model)
    handle.remove()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert native_or_warn(model, 8) is not None
    decoder = NativeDecoder(model, 8)
    with pytest.raises(ValueError, match="pass the cache's 8 positions"):
        decoder.forward(torch.zeros(9, dtype=torch.long))


@pytest.mark.parametrize("mode", ["activation", "contribution", "static"])
def test_compensation_runs_in_the_native_step(mode: str) -> None:
    """--dec on the native decoder: the same channels and residual rows as the eager hooks, so the same greedy
    tokens; and the compensation changes them (the residuals are large enough to matter). The embedding stays
    dense: rows rounded to 8 bits repeat values, and top-k breaks ties in its own order on each side."""
    model = _quantized("llama")
    layers = dict(quant_linears(model))
    torch.manual_seed(4)
    residuals = {
        name: quantize_residual(torch.randn(m.out_features, m.in_features) * 0.2) for name, m in layers.items()
    }
    means = {name: torch.rand(m.in_features) for name, m in layers.items()} if mode == "static" else None
    prompt = torch.randint(0, VOCAB, (1, 9), generator=torch.Generator().manual_seed(1))
    plain = NativeDecoder(model, 32).forward(prompt[0])
    score = "contribution" if mode == "contribution" else "activation"
    with compensation(layers, residuals, 64, means, score):  # 8 of 128 channels, 16 of 256
        assert native_unavailable(model) == ""
        expected, _ = _eager_greedy(model, prompt, 12)
        got = _native_tokens(NativeDecoder(model, 32), prompt, 12, 0.0, set(), None)
        compensated = NativeDecoder(model, 32).forward(prompt[0])
    assert got == expected
    assert float((compensated - plain).abs().max()) > 0.01 * float(plain.abs().max())
    assert not any(hasattr(m, "compensator") for m in layers.values())  # the context took it away


def test_the_8bit_embedding_and_head() -> None:
    for tied in (True, False):
        torch.manual_seed(3)
        config = tiny_config("llama", VOCAB)
        config.tie_word_embeddings = tied
        model = tf.AutoModelForCausalLM.from_config(config).eval()
        weight = model.get_input_embeddings().weight.detach().clone()
        info = quantize_head(model)
        assert info.tied is tied and info.kind == "int8"
        assert info.weights == weight.numel() * (1 if tied else 2)
        # 8-bit codes, one fp16 scale and one 8-bit zero point per row (packed eight at a time), one byte for the
        # width of all rows
        rows = weight.shape[0]
        stored_bits = weight.numel() * 8 + rows * 16 + -(-rows // 8) * 64 + 8
        assert info.bits_per_weight == pytest.approx(stored_bits / weight.numel())
        embedding = model.get_input_embeddings()
        assert isinstance(embedding, QuantEmbedding)
        ids = torch.tensor([[0, 7, VOCAB - 1, 7]])
        looked_up = embedding(ids)
        assert torch.equal(looked_up[0], embedding.qtensor.dequantize()[ids[0]])
        step = (weight.amax(dim=1) - weight.amin(dim=1)) / 255  # each row's grid step
        assert bool(((looked_up[0] - weight[ids[0]]).abs() <= step[ids[0], None] / 2 * 1.01 + 1e-4).all())
        head = model.get_output_embeddings()
        assert isinstance(head, QuantLinear)
        shared = head.codes_8.data_ptr() == embedding.codes_8.data_ptr()
        assert shared is tied
    model.to(torch.bfloat16)
    assert embedding(ids).dtype == torch.bfloat16 and embedding.codes_8.dtype == torch.uint8
    kept = tf.AutoModelForCausalLM.from_config(tiny_config("llama", VOCAB))
    assert quantize_head(kept, "dense").kind == "dense"
    assert isinstance(kept.get_input_embeddings(), torch.nn.Embedding)


def test_rtn_rounds_a_chunk_of_rows_at_a_time_as_at_once(monkeypatch) -> None:
    from anybit.quant import uniform

    torch.manual_seed(4)
    weight = torch.randn(37, 64)
    bitmap = torch.full((37, 1), 8, dtype=torch.uint8)
    whole = rtn_quantize(weight, 64, bitmap)
    monkeypatch.setattr(uniform, "RTN_CHUNK_ROWS", 8)
    chunked = rtn_quantize(weight, 64, bitmap)
    assert torch.equal(chunked.dequantize(), whole.dequantize())
    assert chunked.to_tensors().keys() == whole.to_tensors().keys()


def test_generate_and_bench_run_native_by_default(tiny_tokenizer, corpus_file, tmp_path) -> None:
    """A quantized directory whose linears the fast kernel serves: `generate` (loaded without transformers'
    model code) gives the eager loop's greedy text (loaded through transformers), `bench` reports the native decoder, the fast kernel and the 8-bit head, loaded without transformers'
    model code, with and without dynamic error compensation."""
    import json

    from click.testing import CliRunner

    from anybit.cli import main

    torch.manual_seed(0)
    config = tiny_config("llama", len(tiny_tokenizer))
    for key, value in WIDE.items():
        setattr(config, key, value)
    source = tmp_path / "wide"
    tf.AutoModelForCausalLM.from_config(config).save_pretrained(source)
    tiny_tokenizer.save_pretrained(source)
    quantized = str(tmp_path / "q")
    runner = CliRunner()
    done = runner.invoke(main, ["quantize", str(source), "--method", "rtn", "--bits", "4", "--out", quantized,
                                "--residual", "--calib", str(corpus_file), "--seqlen", "32", "--nsamples", "2"])  # fmt: skip
    assert done.exit_code == 0, done.output
    prompt = ["--prompt", "The history of", "--max-new-tokens", "10"]
    native = runner.invoke(main, ["generate", quantized, *prompt])
    eager = runner.invoke(main, ["generate", quantized, *prompt, "--decoder", "eager"])
    assert native.exit_code == eager.exit_code == 0, native.output + eager.output
    assert native.stdout == eager.stdout and native.stdout.strip()
    bench = runner.invoke(main, ["bench", quantized, "--json", "--prompt-tokens", "8", "--new-tokens", "4",
                                 "--repeats", "1"])  # fmt: skip
    assert bench.exit_code == 0, bench.output
    result = json.loads(bench.stdout.strip().splitlines()[-1])
    assert (result["decoder"], result["kernel"], result["head"]) == ("native", "auto", "int8")
    assert result["loader"] == "native"  # no transformers model code for a served directory
    assert result["kernel_bytes"] > 0 and result["head_bits_per_weight"] > 8
    positions = 8 + 4 + 1  # the prompt, the new tokens and one to spare: float16 keys and values at each
    per_position = 2 * 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim
    assert result["kv_cache_bytes"] == positions * per_position
    bench = runner.invoke(main, ["bench", quantized, "--json", "--prompt-tokens", "8", "--new-tokens", "4",
                                 "--repeats", "1", "--dec", "8", "--tables", "int16"])  # fmt: skip
    assert bench.exit_code == 0, bench.output
    result = json.loads(bench.stdout.strip().splitlines()[-1])
    assert (result["decoder"], result["loader"], result["dec"], result["tables"]) == ("native", "native", 8, "int16")


@SERVED
def test_loading_without_transformers_decodes_as_the_full_loader(
    family: str, overrides: dict, tiny_tokenizer, tmp_path
) -> None:
    """`load_native` (plain modules, no Hugging Face model code) gives the parameters of transformers' model
    and, on the native decoder, the same logits bit for bit."""
    save_quantized(_quantized(family, **overrides), tiny_tokenizer, tmp_path / "q", INFO)
    light, _ = load_native(tmp_path / "q")
    full, _, _ = load_quantized(tmp_path / "q", head="int8")
    shapes = {name: tuple(t.shape) for name, t in full.state_dict().items()}
    assert {name: tuple(t.shape) for name, t in light.state_dict().items()} == shapes
    prompt = torch.randint(0, VOCAB, (7,), generator=torch.Generator().manual_seed(3))
    expected = NativeDecoder(full, 16).forward(prompt)
    assert torch.equal(NativeDecoder(light, 16).forward(prompt), expected)


def test_loading_without_transformers_checks_what_it_reads(tmp_path) -> None:
    """A damaged directory is refused by the light loader as by the full one; a config it does not compute
    (a scaled rope) or whose values it cannot use is left to transformers (and its checks)."""
    import json

    from anybit.errors import AnybitError
    from anybit.runtime.native_model import load_for_native

    directory = tmp_path / "q"
    save_quantized(_quantized("llama"), None, directory, INFO)
    weights = directory / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(AnybitError, match="corrupt"):
        load_native(directory)
    config = json.loads((directory / "config.json").read_text())
    unusual = [{"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, {"num_attention_heads": 0},
               {"head_dim": "16"}, {"rms_norm_eps": None}, {"num_key_value_heads": True},
               {"rope_parameters": "fast"}]  # fmt: skip
    for change in unusual:
        (directory / "config.json").write_text(json.dumps({**config, **change}))
        assert load_for_native(str(directory), torch.float32, "int8", "auto") is None, change
    (directory / "config.json").write_text("[1, 2]")
    with pytest.raises(AnybitError, match="not a JSON object"):
        load_for_native(str(directory), torch.float32, "int8", "auto")


def test_loading_for_the_native_decoder_imports_no_model_code(tiny_tokenizer, tmp_path) -> None:
    """The point of the light loader: neither transformers' model code nor what it drags in (sympy,
    torch._dynamo, about 100 MB resident) is imported; its tokenizer class is, which needs none of it."""
    import subprocess
    import sys

    save_quantized(_quantized("qwen3", head_dim=32), tiny_tokenizer, tmp_path / "q", INFO)
    script = (
        "import sys, torch; from anybit.runtime.native_model import load_for_native; "
        f"loaded = load_for_native({str(tmp_path / 'q')!r}, torch.float32, 'int8', 'auto', tokenizer=True); "
        "assert loaded is not None and loaded.tokenizer('the history of').input_ids; "
        "print(sorted(m for m in sys.modules if m in ('sympy', 'torch._dynamo') or '.modeling_' in m))"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
