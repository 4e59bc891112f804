"""Triton kernel for dynamic error compensation: out[t] += Σ_{j ∈ S_t} x[t, j] · R̂[j, :].

The selected channels S_t (exact per-chunk top-|x|, chosen on the GPU with torch.topk) index rows of
the 4-bit residual in the `anybit.runtime.dec` layout: (in, ceil(out / 2)) uint8, two codes per byte,
one fp16 scale per output channel. A program takes one token, a block of output channels and a
block of selected channels, reads that tile of the selected rows in one parallel load (only those
rows), dequantizes, reduces over its channels and adds its partial sums atomically.

On CUDA the residual stays in pinned host memory: the kernel reads it across the bus without a GPU
copy (zero-copy through unified addressing). `anybit.runtime.dec.launch_compensation` queues it on a
second stream, concurrent with the base product. The tests run the kernel in Triton's interpreter on
the CPU.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_OUT = 256  # output channels per program (128 bytes of each selected row)
BLOCK_SEL = 16  # selected channels per program: their rows are fetched in one parallel load


@triton.jit
def _dec_kernel(
    x_ptr, idx_ptr, codes_ptr, scales_ptr, out_ptr,
    n_sel, n_out, row_bytes, stride_x, stride_idx, stride_out,
    BLOCK: tl.constexpr, SEL: tl.constexpr,
):  # fmt: skip
    token = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    col_ok = cols < n_out
    s = tl.program_id(2) * SEL + tl.arange(0, SEL)
    s_ok = s < n_sel
    channel = tl.load(idx_ptr + token * stride_idx + s, mask=s_ok, other=0).to(tl.int64)
    xv = tl.load(x_ptr + token * stride_x + channel, mask=s_ok, other=0.0).to(tl.float32)
    byte = tl.load(
        codes_ptr + channel[:, None] * row_bytes + (cols // 2)[None, :],
        mask=s_ok[:, None] & col_ok[None, :],
        other=0x88,
    ).to(tl.int32)
    nibble = (byte >> ((cols % 2) * 4)[None, :]) & 0xF
    acc = tl.sum(xv[:, None] * (nibble - 8).to(tl.float32), axis=0)
    scale = tl.load(scales_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    tl.atomic_add(out_ptr + token * stride_out + cols, acc * scale, mask=col_ok, sem="relaxed")


def dec_accumulate(
    out: torch.Tensor, x: torch.Tensor, idx: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor
) -> torch.Tensor:
    """Add the compensation of channels `idx` (tokens, k) for inputs x (tokens, in) to out (tokens, out), fp32."""
    tokens, k = idx.shape
    n_out = scales.numel()
    idx = idx.to(torch.int32).contiguous()
    x = x.contiguous()
    grid = (tokens, triton.cdiv(n_out, BLOCK_OUT), triton.cdiv(k, BLOCK_SEL))
    _dec_kernel[grid](
        x, idx, codes, scales, out, k, n_out, codes.shape[1], x.stride(0), idx.stride(0), out.stride(0),
        BLOCK=BLOCK_OUT, SEL=BLOCK_SEL,
    )  # fmt: skip
    return out
