"""Text generation with a (quantized) model, streaming tokens as they are produced."""

from __future__ import annotations

import sys
from typing import TextIO

import torch

from anybit.data import check_token_ids
from anybit.errors import AnybitError
from anybit.model.loading import LoadedModel


def check_prompt(prompt: str) -> None:
    """An AnybitError for a prompt with no text."""
    if not prompt.strip():
        raise AnybitError("the prompt is empty: give --prompt some text")


def build_prompt(tokenizer, prompt: str, chat: bool) -> torch.Tensor:
    """Token ids of the prompt; with `chat`, wrapped in the tokenizer's chat template as a user turn."""
    check_prompt(prompt)
    if chat:
        if not getattr(tokenizer, "chat_template", None):
            raise AnybitError("--chat needs a tokenizer with a chat template; this model has none")
        messages = [{"role": "user", "content": prompt}]
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    if ids.numel() == 0:
        raise AnybitError("the prompt holds no tokens: give --prompt some text")
    return ids


@torch.inference_mode()
def generate(
    loaded: LoadedModel,
    prompt: str,
    max_new_tokens: int = 64,
    chat: bool = False,
    device: str = "cpu",
    temperature: float = 0.0,
    seed: int = 0,
    stream: TextIO | None = None,
    quiet: bool = False,
    native: bool = True,
) -> str:
    """Generate a continuation (greedy when temperature is 0) and return the new text.

    The text is streamed to `stream` (default: the current stdout) unless `quiet`. With `native` on the
    CPU, each step runs in C where the model is served (`runtime.native`), else Hugging Face's loop.
    """
    from transformers import TextStreamer

    if max_new_tokens < 1:
        raise AnybitError("--max-new-tokens must be positive")
    tokenizer = loaded.tokenizer
    ids = check_token_ids(build_prompt(tokenizer, prompt, chat), loaded.model.get_input_embeddings().num_embeddings)
    ids = ids.to(device)
    model = loaded.model.to(device)
    streamer = None
    if not quiet:
        stream = stream or sys.stdout
        streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
        streamer.on_finalized_text = lambda text, stream_end=False: print(
            text, end="\n" if stream_end else "", file=stream, flush=True
        )
    torch.manual_seed(seed)
    decoder = None
    if native and torch.device(device).type == "cpu":
        from anybit.runtime.native import native_or_warn

        decoder = native_or_warn(model, ids.shape[1] + max_new_tokens)
    if decoder is not None:
        new = _native_tokens(decoder, ids, max_new_tokens, temperature, _eos_ids(model, tokenizer), streamer)
        return tokenizer.decode(new, skip_special_tokens=True)
    sampling = {"do_sample": True, "temperature": temperature} if temperature > 0 else {"do_sample": False}
    out = model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=max_new_tokens,
        streamer=streamer,
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
        **sampling,
    )
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)


def _eos_ids(model: torch.nn.Module, tokenizer) -> set[int]:
    """The token ids that end a generation: the model's generation config's, else the tokenizer's."""
    config = getattr(model, "generation_config", None)
    eos = getattr(config, "eos_token_id", None)
    if eos is None:
        eos = tokenizer.eos_token_id
    return set(eos if isinstance(eos, list) else [] if eos is None else [eos])


def _native_tokens(
    decoder, ids: torch.Tensor, max_new_tokens: int, temperature: float, eos: set[int], streamer
) -> list[int]:
    """New token ids from the native decoder: greedy, or sampled at `temperature` (torch's seeded generator)."""
    from anybit.runtime.native import greedy_token

    logits = decoder.forward(ids[0])
    if streamer is not None:
        streamer.put(ids)  # the prompt, which the streamer skips (as in model.generate)
    new: list[int] = []
    for _ in range(max_new_tokens):
        if temperature > 0:
            token = int(torch.multinomial(torch.softmax(logits / temperature, dim=-1), 1))
        else:
            token = greedy_token(logits)
        new.append(token)
        if streamer is not None:
            streamer.put(torch.tensor([token]))
        if token in eos or len(new) == max_new_tokens:
            break
        logits = decoder.forward(torch.tensor([token]))
    if streamer is not None:
        streamer.end()
    return new
