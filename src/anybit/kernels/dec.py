"""Triton kernel for dynamic error compensation: out[t] += Σ_{j ∈ S_t} x[t, j] · R̂[j, :].

The selected channels S_t (exact per-chunk top-|x|, chosen on the GPU with torch.topk) index rows of
the 4-bit residual in the `anybit.runtime.dec` layout: (in, ceil(out / 2)) uint8, two codes per byte,
one fp16 scale per output channel. A program takes one token and a block of output channels, reads
the selected channels' packed rows (only those), dequantizes and accumulates in fp32.

On CUDA the residual can stay in pinned host memory: the kernel reads it across the bus without a GPU
copy (zero-copy through unified addressing). That placement, and overlapping this kernel with the
base product on a second stream, are untested here: no GPU machine was lent to the session that
wrote this. The tests run the kernel in Triton's interpreter on the CPU.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_OUT = 128  # output channels per program (64 bytes of each selected row)


@triton.jit
def _dec_kernel(
    x_ptr, idx_ptr, codes_ptr, scales_ptr, out_ptr,
    n_sel, n_out, row_bytes, stride_x, stride_idx, stride_out,
    BLOCK: tl.constexpr,
):  # fmt: skip
    token = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    col_ok = cols < n_out
    scale = tl.load(scales_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for s in range(n_sel):
        channel = tl.load(idx_ptr + token * stride_idx + s)
        xv = tl.load(x_ptr + token * stride_x + channel).to(tl.float32)
        byte = tl.load(codes_ptr + channel * row_bytes + cols // 2, mask=col_ok, other=0x88).to(tl.int32)
        nibble = (byte >> ((cols % 2) * 4)) & 0xF
        acc += xv * (nibble - 8).to(tl.float32)
    acc = acc * scale
    prev = tl.load(out_ptr + token * stride_out + cols, mask=col_ok, other=0.0)
    tl.store(out_ptr + token * stride_out + cols, prev + acc, mask=col_ok)


def dec_accumulate(
    out: torch.Tensor, x: torch.Tensor, idx: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor
) -> torch.Tensor:
    """Add the compensation of channels `idx` (tokens, k) for inputs x (tokens, in) to out (tokens, out), fp32."""
    tokens, k = idx.shape
    n_out = scales.numel()
    idx = idx.to(torch.int32).contiguous()
    x = x.contiguous()
    grid = (tokens, triton.cdiv(n_out, BLOCK_OUT))
    _dec_kernel[grid](
        x, idx, codes, scales, out, k, n_out, codes.shape[1], x.stride(0), idx.stride(0), out.stride(0),
        BLOCK=BLOCK_OUT,
    )  # fmt: skip
    return out
