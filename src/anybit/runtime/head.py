"""The token embedding and the output head, quantized for inference.

On a small model these two matrices are the largest: SmolLM2's tied 49152×576 embedding is more bytes
in float32 than all its quantized decoder linears, and the head multiplies it on every token. For
generation they are quantized to 8 bits per weight with one min-max grid per row (round to nearest):
the head becomes a `QuantLinear` (served by the fast CPU kernel), the embedding a `QuantEmbedding` that
decodes only the rows it looks up, both holding one shared `QuantizedTensor` where the model ties them.
Their bits are reported apart from the decoder linears' counted bits; `benchmarks/fast_path_quality.py`
measures the perplexity they cost. Nothing here is written to disk.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from anybit.format.qtensor import QuantizedTensor
from anybit.quant.uniform import rtn_quantize
from anybit.runtime.qlinear import PackedModule, QuantLinear

HEAD_CHOICES = ("int8", "dense")  # the embedding and output head at run time


class QuantEmbedding(PackedModule):
    """An embedding lookup from a packed (vocabulary, hidden) tensor of one width; `scale` multiplies the
    result (Gemma scales its embeddings by √hidden)."""

    def __init__(self, qtensor: QuantizedTensor, dtype: torch.dtype, scale: torch.Tensor | None = None) -> None:
        super().__init__(qtensor)  # the head's own tensors where the two are tied
        self.num_embeddings, self.embedding_dim = qtensor.shape
        self.dtype = dtype
        self.scale = scale

    def _apply(self, fn, recurse=True):
        """A dtype cast changes the output dtype (the packed buffers keep theirs)."""
        self.dtype = fn(torch.empty(0, dtype=self.dtype)).dtype
        return super()._apply(fn, recurse)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        out = self.qtensor.dequantize_rows(ids)
        if self.scale is not None:
            out = out * self.scale.to(out.dtype)
        return out.to(self.dtype)

    @property
    def weight(self) -> torch.Tensor:
        """The dense weight, decoded (for code that inspects it; lookups never build it)."""
        return self.qtensor.dequantize(torch.float32)


class HeadLinear(QuantLinear):
    """The packed output head: a `QuantLinear` made at run time, not part of the stored model."""

    stored = False


@dataclass
class HeadInfo:
    """What `quantize_head` replaced, and at what size."""

    kind: str  # "int8" or "dense"
    tied: bool
    weights: int  # weights in the embedding and the head, a tied matrix counted once
    bits_per_weight: float  # stored bits of those matrices per weight (16 or 32 when dense)


def quantize_head(model: nn.Module, kind: str = "int8", dtype: torch.dtype | None = None) -> HeadInfo:
    """Replace the output head and token embedding of a Hugging Face causal LM by 8-bit packed ones
    (`kind="int8"`; lookups then return `dtype`, by default the embedding's), or keep them (`"dense"`);
    returns what they hold. A model packed already is left as it is."""
    if kind not in HEAD_CHOICES:
        raise ValueError(f"head must be one of {', '.join(HEAD_CHOICES)}, got {kind!r}")
    embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
    if isinstance(embedding, QuantEmbedding):
        if kind != "int8":
            raise ValueError("the embedding and head are packed already")
        return _packed_info(embedding, head)
    tied = head is not None and getattr(head, "weight", None) is getattr(embedding, "weight", None)
    if kind == "dense" or not isinstance(embedding, nn.Embedding):
        matrices = [embedding.weight] if tied or head is None else [embedding.weight, head.weight]
        weights = sum(w.numel() for w in matrices)
        return HeadInfo("dense", tied, weights, 8.0 * matrices[0].element_size())
    packed_embedding = _per_row_8bit(embedding.weight)
    scale = getattr(embedding, "embed_scale", None)
    scale = None if scale is None else torch.as_tensor(scale, dtype=torch.float32)
    model.set_input_embeddings(QuantEmbedding(packed_embedding, dtype or embedding.weight.dtype, scale))
    if isinstance(head, nn.Linear):
        packed_head = packed_embedding if tied else _per_row_8bit(head.weight)
        model.set_output_embeddings(HeadLinear(packed_head, head.bias))
    return _packed_info(model.get_input_embeddings(), model.get_output_embeddings())


def _packed_info(embedding: QuantEmbedding, head: nn.Module | None) -> HeadInfo:
    """What a packed embedding and head hold, a shared (tied) tensor counted once."""
    tensors = [embedding.qtensor]
    tied = isinstance(head, HeadLinear) and head.qtensor.codes[8].data_ptr() == tensors[0].codes[8].data_ptr()
    if isinstance(head, HeadLinear) and not tied:
        tensors.append(head.qtensor)
    weights = sum(t.numel for t in tensors)
    return HeadInfo("int8", tied, weights, sum(t.storage_bits() for t in tensors) / weights)


def _per_row_8bit(weight: torch.Tensor) -> QuantizedTensor:
    """Round to nearest on one 8-bit min-max grid per row."""
    rows, cols = weight.shape
    return rtn_quantize(weight, cols, torch.full((rows, 1), 8, dtype=torch.uint8))
