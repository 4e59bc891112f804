"""End-to-end decode speed of a Llama-shaped model: fp16 dense against anybit's packed layers, and DEC.

Usage: python benchmarks/decode_speed.py [--shape llama-7b|smollm2-135m|tiny] [--bits 3] [--device cuda]
                                         [--dec 0,4,8,16,32] [--overlap 0,1] [--cuda-graph]
                                         [--prompt-tokens 128] [--new-tokens 64]
Random weights (speed does not depend on the values): the model in fp16, then the same model with
every decoder linear replaced by a per-row-codebook `QuantLinear` of mixed widths (a third of the
rows at bits - 1, bits, bits + 1), built from random codes on the device (no dense copy is kept),
then with random 4-bit residuals in host memory for each DEC k_chunk in --dec (0: none).
Decode is batch 1 with a KV cache (`anybit.bench.decode_speed`): median over 3 runs after a warm-up.
One JSON line per case goes to benchmarks/results/decode_speed.jsonl.
"""

from __future__ import annotations

import argparse
import gc

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from _common import log_result
from anybit.bench import decode_speed
from anybit.runtime.dec import Residual, compensation
from anybit.runtime.qlinear import QuantLinear, quant_linears
from kernel_speed import mixed_width_tensor

SHAPES = {  # hidden, intermediate, layers, heads, kv heads, vocab
    "llama-7b": (4096, 11008, 32, 32, 32, 32000),
    "smollm2-135m": (576, 1536, 30, 9, 3, 49152),
    "tiny": (64, 128, 2, 4, 2, 256),
}
DECODER_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def random_model(shape: str, device: str) -> LlamaForCausalLM:
    hidden, inter, layers, heads, kv, vocab = SHAPES[shape]
    config = LlamaConfig(
        hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers, num_attention_heads=heads,
        num_key_value_heads=kv, vocab_size=vocab, max_position_embeddings=4096, tie_word_embeddings=False,
    )  # fmt: skip
    with torch.device(device):
        return LlamaForCausalLM(config).to(torch.float16).eval()


def quantize_in_place(model: torch.nn.Module, bits: int, device: str) -> None:
    for name, module in list(model.named_modules()):
        if name.rsplit(".", 1)[-1] in DECODER_LINEARS:
            parent = model.get_submodule(name.rsplit(".", 1)[0])
            qt = mixed_width_tensor(module.out_features, module.in_features, bits, device)
            setattr(parent, name.rsplit(".", 1)[-1], QuantLinear(qt))
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


def random_residuals(model: torch.nn.Module) -> dict[str, Residual]:
    """Random 4-bit residuals, codes in host memory (pinned on first use by the CUDA path)."""
    out = {}
    for name, layer in quant_linears(model):
        codes = torch.randint(0, 256, (layer.in_features, (layer.out_features + 1) // 2), dtype=torch.uint8)
        out[name] = Residual(codes, torch.full((layer.out_features,), 1e-3, dtype=torch.float16))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="llama-7b")
    parser.add_argument("--bits", type=int, default=3)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dec", default="0", help="comma-separated DEC k_chunk values; 0 is without DEC")
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--overlap", default="1", help="with DEC: 1 second stream, 0 same stream, 0,1 both")
    parser.add_argument("--cuda-graph", action="store_true", help="static KV cache, decode steps replayed from a graph")
    args = parser.parse_args()
    timing = dict(
        prompt_tokens=args.prompt_tokens, new_tokens=args.new_tokens, repeats=args.repeats, cuda_graph=args.cuda_graph
    )
    common = {"shape": args.shape, "device": args.device}
    model = random_model(args.shape, args.device)
    log_result(
        "decode_speed", {**common, "variant": "fp16", **decode_speed(model, device=args.device, **timing).to_dict()}
    )
    quantize_in_place(model, args.bits, args.device)
    residuals = None
    for k in (int(v) for v in args.dec.split(",")):
        variant = {**common, "variant": f"anybit {args.bits}-bit mixed widths", "bits": args.bits, "dec": k}
        if k == 0:
            result = decode_speed(model, device=args.device, **timing)
            log_result("decode_speed", {**variant, **result.to_dict()})
            continue
        residuals = residuals or random_residuals(model)
        for overlap in (bool(int(v)) for v in args.overlap.split(",")):
            with compensation(dict(quant_linears(model)), residuals, k, overlap=overlap):
                result = decode_speed(model, device=args.device, **timing)
            log_result("decode_speed", {**variant, "overlap": overlap, **result.to_dict()})


if __name__ == "__main__":
    main()
