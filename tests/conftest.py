"""Shared fixtures: seeding, a tiny tokenizer, and tiny random models of every supported family."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    # Triton kernels (tests/test_kernels.py) run in the interpreter on CPU; triton reads this on import
    os.environ.setdefault("TRITON_INTERPRET", "1")

TINY_TEXT = (Path(__file__).resolve().parents[1] / "data" / "wiki.valid.tokens").read_text()[:200_000]


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def corpus_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "text.txt"
    path.write_text(TINY_TEXT[:60_000])
    return path


@pytest.fixture(scope="session")
def tiny_tokenizer():
    """A byte-level BPE tokenizer trained here on WikiText-2 validation text (no network)."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator([TINY_TEXT], vocab_size=320, min_frequency=2, special_tokens=["<|endoftext|>"])
    return PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, eos_token="<|endoftext|>")


def tiny_config(family: str, vocab_size: int):
    """A two-layer config of `family` whose dimensions are multiples of 32."""
    import transformers as tf

    common = dict(
        vocab_size=vocab_size,
        num_hidden_layers=2,
        hidden_size=64,
        intermediate_size=96,
        num_attention_heads=4,
        max_position_embeddings=256,
    )
    if family == "llama":
        return tf.LlamaConfig(**common, num_key_value_heads=2, tie_word_embeddings=True)
    if family == "mistral":
        return tf.MistralConfig(**common, num_key_value_heads=2, sliding_window=None)
    if family == "qwen2":
        return tf.Qwen2Config(**common, num_key_value_heads=2, tie_word_embeddings=True)
    if family == "qwen3":
        return tf.Qwen3Config(**common, num_key_value_heads=2, head_dim=16, tie_word_embeddings=True)
    if family == "gemma3_text":
        layer_types = ["sliding_attention", "full_attention"]
        return tf.Gemma3TextConfig(
            **common, num_key_value_heads=2, head_dim=16, sliding_window=32, layer_types=layer_types
        )
    if family == "phi3":
        return tf.Phi3Config(**common, num_key_value_heads=4, pad_token_id=0)
    if family == "gpt2":
        return tf.GPT2Config(vocab_size=vocab_size, n_layer=2, n_embd=64, n_head=4, n_positions=256)
    raise ValueError(family)


FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma3_text", "phi3", "gpt2")


def _build_tiny_model(family: str, path: Path, tokenizer) -> Path:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config(family, len(tokenizer)))
    model.save_pretrained(path, max_shard_size="100KB" if family == "llama" else "1GB")
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session", params=FAMILIES)
def tiny_model_dir(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer) -> Path:
    """A tiny random model of each family saved as a HF directory (llama's in several shards)."""
    return _build_tiny_model(request.param, tmp_path_factory.mktemp(f"tiny-{request.param}"), tiny_tokenizer)


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer) -> Path:
    return _build_tiny_model("llama", tmp_path_factory.mktemp("tiny-llama-cli"), tiny_tokenizer)


@pytest.fixture(scope="session")
def tiny_gguf(tmp_path_factory) -> Path:
    """A small Llama GGUF with a vocabulary, written with gguf-py."""
    import gguf
    import numpy as np

    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    vocab, hidden, ffn, layers = 64, 32, 64, 2
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(layers)
    writer.add_context_length(128)
    writer.add_embedding_length(hidden)
    writer.add_feed_forward_length(ffn)
    writer.add_head_count(4)
    writer.add_head_count_kv(2)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_tokenizer_model("gpt2")
    tokens = ["<s>", "</s>", "a", "b", "ab"] + [chr(ord("c") + i) for i in range(vocab - 5)]
    writer.add_token_list(tokens)
    writer.add_token_types([1] * vocab)
    writer.add_token_merges(["a b"])
    writer.add_bos_token_id(0)
    writer.add_eos_token_id(1)
    rng = np.random.default_rng(0)
    shapes = {"token_embd.weight": (vocab, hidden), "output_norm.weight": (hidden,)}
    for i in range(layers):
        shapes |= {
            f"blk.{i}.attn_norm.weight": (hidden,), f"blk.{i}.ffn_norm.weight": (hidden,),
            f"blk.{i}.attn_q.weight": (hidden, hidden), f"blk.{i}.attn_k.weight": (hidden // 2, hidden),
            f"blk.{i}.attn_v.weight": (hidden // 2, hidden), f"blk.{i}.attn_output.weight": (hidden, hidden),
            f"blk.{i}.ffn_gate.weight": (ffn, hidden), f"blk.{i}.ffn_up.weight": (ffn, hidden),
            f"blk.{i}.ffn_down.weight": (hidden, ffn),
        }  # fmt: skip
    for name, shape in shapes.items():
        writer.add_tensor(name, rng.standard_normal(shape).astype(np.float32) * 0.02)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
