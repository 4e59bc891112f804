"""The GPTQ checkpoint layout (as AutoGPTQ/GPTQModel write it, `checkpoint_format` "gptq" or "gptq_v2"), for export.

Per quantized linear with `out` outputs, `in` inputs, width b and groups of g inputs:
- `qweight` int32 (in·b/32, out): each output's codes, input by input, as one little-endian bit stream of
  b-bit values cut into 32-bit words (for b = 2, 4, 8 that is 32/b codes per word, the first in the low
  bits; for b = 3, 32 codes span three words);
- `qzeros` int32 (groups, out·b/32): each group's zero points, output by output, packed the same way; "gptq"
  (v1, what every reader takes) stores zero − 1 and readers add 1 back, so a zero point of 0 has no v1 form;
  "gptq_v2" (GPTQModel, vLLM since late 2025) stores the zero point itself;
- `scales` fp16 (groups, out); `g_idx` int32 (in,): the group of each input (not monotone under act-order);
- weight = scales[g_idx[i], o] · (q[i, o] − zero[g_idx[i], o]).
Storage only: packing of integer tensors, no model code.
"""

from __future__ import annotations

import torch

from anybit.format.packing import unpack_codes
from anybit.format.qtensor import QuantizedTensor

WORD_BITS = 32
ZERO_OFFSETS = {"gptq": 1, "gptq_v2": 0}  # checkpoint_format -> what is subtracted from a zero point when stored


def pack_bitstream(values: torch.Tensor, bits: int) -> torch.Tensor:
    """int32 words (n·bits/32, m) holding each column of `values` (n, m; integers in [0, 2**bits)) as one
    little-endian stream of `bits`-bit fields."""
    n, m = values.shape
    if (n * bits) % WORD_BITS:
        raise ValueError(f"{n} values of {bits} bits do not fill whole 32-bit words")
    v = values.to(torch.int64)
    stream = (v[:, None, :] >> torch.arange(bits)[None, :, None]) & 1  # (n, bits, m): each value's bits, low first
    stream = stream.reshape(n * bits // WORD_BITS, WORD_BITS, m)
    words = (stream << torch.arange(WORD_BITS)[None, :, None]).sum(dim=1)  # 0 <= words < 2**32
    return torch.where(words >= 1 << 31, words - (1 << 32), words).to(torch.int32)


def why_not_exportable(qt: QuantizedTensor) -> str:
    """Why the GPTQ layout cannot hold this tensor ("" when it can)."""
    if qt.kind != "uniform":
        return "it holds codebooks, not a uniform grid (GPTQ export takes rtn and gptq directories)"
    if qt.axis != 0:
        return "its groups run along the output dimension"
    if len(qt.widths) != 1:
        return f"its groups have different widths ({', '.join(map(str, qt.widths))})"
    if qt.outliers is not None or qt.col_scale is not None:
        return "it stores outliers or a column scaling, which the GPTQ layout has no place for"
    if qt.rotation is not None:
        return "it stores an input rotation (--rotate), which the GPTQ layout has no place for"
    out_features, in_features = qt.shape
    bits = qt.widths[0]
    if (in_features * bits) % WORD_BITS or (out_features * bits) % WORD_BITS:
        return f"its shape {qt.shape} does not fill whole 32-bit words at {bits} bits"
    return ""


def has_zero_point_zero(qt: QuantizedTensor) -> bool:
    """Whether some group of a uniform tensor has zero point 0, which the v1 ("gptq") layout cannot store."""
    bits = qt.widths[0]
    return bool((unpack_codes(qt.zeros[bits], bits, qt.bitmap.numel()) == 0).any())


def gptq_tensors(qt: QuantizedTensor, checkpoint_format: str = "gptq") -> tuple[dict[str, torch.Tensor], int, int]:
    """The GPTQ tensors (qweight, qzeros, scales, g_idx) of an exportable uniform tensor in `checkpoint_format`,
    its width and its group size. The exported weight equals `qt.dequantize()` exactly (same integers, same
    fp16 scales)."""
    offset = ZERO_OFFSETS[checkpoint_format]
    problem = why_not_exportable(qt)
    if problem:
        raise ValueError(problem)
    out_features, in_features = qt.shape
    bits, gs = qt.widths[0], qt.group_size
    groups = in_features // gs
    codes = unpack_codes(qt.codes[bits], bits, out_features * in_features).view(out_features, in_features).long()
    zeros = unpack_codes(qt.zeros[bits], bits, out_features * groups).view(out_features, groups).long()
    if offset and bool((zeros == 0).any()):
        raise ValueError("a group has zero point 0, which the gptq (v1) layout cannot store; use gptq_v2 or --sym")
    group_of_position = torch.arange(in_features) // gs  # codes are stored in the (act-order) permuted order
    # input i sits at permuted position position[i]
    position = torch.arange(in_features) if qt.perm is None else torch.argsort(qt.perm.to(torch.int64))
    tensors = {
        "qweight": pack_bitstream(codes[:, position].t(), bits),
        "qzeros": pack_bitstream(zeros - offset, bits).t().contiguous(),
        "scales": qt.scales.t().contiguous().to(torch.float16),
        "g_idx": group_of_position[position].to(torch.int32),
    }
    return tensors, bits, gs
