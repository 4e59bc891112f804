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

from anybit.config import HEAD_CHOICES
from anybit.format.qtensor import QuantizedTensor
from anybit.quant.grid import minmax_params, quantize_to_grid
from anybit.runtime.qlinear import QuantLinear


class QuantEmbedding(nn.Module):
    """An embedding lookup from a packed (vocabulary, hidden) tensor of one width; `scale` multiplies the
    result (Gemma scales its embeddings by √hidden)."""

    def __init__(self, qtensor: QuantizedTensor, dtype: torch.dtype, scale: torch.Tensor | None = None) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim = qtensor.shape
        self.meta = qtensor.meta()
        self._buffer_names = list(qtensor.to_tensors())
        for name, tensor in qtensor.to_tensors().items():  # the head's own tensors where the two are tied
            self.register_buffer(name, tensor)
        self.dtype = dtype
        self.scale = scale

    def _apply(self, fn, recurse=True):
        """Device moves apply to the packed buffers; a dtype cast changes only the output dtype."""
        self.dtype = fn(torch.empty(0, dtype=self.dtype)).dtype

        def move_only(t: torch.Tensor) -> torch.Tensor:
            moved = fn(t)
            return moved if moved.dtype == t.dtype else t.to(moved.device)

        return super()._apply(move_only, recurse)

    @property
    def qtensor(self) -> QuantizedTensor:
        buffers = {name: getattr(self, name) for name in self._buffer_names}
        return QuantizedTensor.from_tensors(self.meta, buffers, check=False)

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


def quantize_head(model: nn.Module, kind: str = "int8") -> HeadInfo:
    """Replace the output head and token embedding of a Hugging Face causal LM by 8-bit packed ones
    (`kind="int8"`), or keep them (`"dense"`); returns what they hold."""
    if kind not in HEAD_CHOICES:
        raise ValueError(f"head must be one of {', '.join(HEAD_CHOICES)}, got {kind!r}")
    embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
    tied = head is not None and getattr(head, "weight", None) is getattr(embedding, "weight", None)
    if kind == "dense" or not isinstance(embedding, nn.Embedding):
        matrices = [embedding.weight] if tied or head is None else [embedding.weight, head.weight]
        weights = sum(w.numel() for w in matrices)
        return HeadInfo("dense", tied, weights, 8.0 * matrices[0].element_size())
    packed_embedding = _per_row_8bit(embedding.weight)
    scale = getattr(embedding, "embed_scale", None)
    scale = None if scale is None else torch.as_tensor(scale, dtype=torch.float32)
    model.set_input_embeddings(QuantEmbedding(packed_embedding, embedding.weight.dtype, scale))
    tensors = [packed_embedding]
    if isinstance(head, nn.Linear):
        packed_head = packed_embedding if tied else _per_row_8bit(head.weight)
        model.set_output_embeddings(HeadLinear(packed_head, head.bias))
        if not tied:
            tensors.append(packed_head)
    weights = sum(t.numel for t in tensors)
    return HeadInfo("int8", tied, weights, sum(t.storage_bits() for t in tensors) / weights)


CHUNK_ROWS = 4096  # rows rounded at once: bounds the float temporaries of a large vocabulary


def _per_row_8bit(weight: torch.Tensor) -> QuantizedTensor:
    """Round to nearest on one 8-bit min-max grid per row (as `rtn_quantize`), a chunk of rows at a time."""
    rows, cols = weight.shape
    codes = torch.empty(rows, cols, dtype=torch.uint8)
    scales, zeros = torch.empty(rows, 1), torch.empty(rows, 1, dtype=torch.int32)
    for start in range(0, rows, CHUNK_ROWS):
        chunk = weight[start : start + CHUNK_ROWS].detach().float()
        scale, zero = minmax_params(chunk, 8)
        codes[start : start + CHUNK_ROWS] = quantize_to_grid(chunk, scale[:, None], zero[:, None], 8).to(torch.uint8)
        scales[start : start + CHUNK_ROWS, 0], zeros[start : start + CHUNK_ROWS, 0] = scale, zero.to(torch.int32)
    bitmap = torch.full((rows, 1), 8, dtype=torch.uint8)
    return QuantizedTensor.from_uniform(codes, scales, zeros, bitmap, (rows, cols), cols)
