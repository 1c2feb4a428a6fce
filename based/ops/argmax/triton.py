"""Triton kernel of argmax_rows: one program per row, a running (value, index) per lane over the row."""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _argmax_rows_kernel(x, s_x, out, N, BLOCK: tl.constexpr):
    i_row = tl.program_id(0).to(tl.int64)
    p_x = x + i_row * s_x
    o = tl.arange(0, BLOCK)
    best_v = tl.full([BLOCK], float("-inf"), tl.float32)
    best_i = tl.zeros([BLOCK], tl.int32)
    for c0 in range(0, N, BLOCK):
        cols = c0 + o
        b_x = tl.load(p_x + cols, mask=cols < N, other=float("-inf")).to(tl.float32)
        b_x = tl.where(b_x != b_x, float("inf"), b_x)  # NaN is the largest, as in torch.argmax
        # Strictly greater: each lane keeps the first column of its maximum.
        better = b_x > best_v
        best_v = tl.where(better, b_x, best_v)
        best_i = tl.where(better, cols, best_i)
    b_max = tl.max(best_v, 0)
    # Lanes still at -inf never saw a larger value: column 0 is then a valid (first) answer.
    first = tl.min(tl.where(best_v == b_max, best_i, N), 0)
    tl.store(out + i_row, first.to(tl.int64))


@torch.compiler.disable
def triton_argmax_rows(logits: torch.Tensor) -> torch.Tensor:
    """argmax_rows on CUDA; the rows may be strided (a view of a padded LM-head output)."""
    B, N = logits.shape
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    out = torch.empty(B, dtype=torch.long, device=logits.device)
    if B:
        _argmax_rows_kernel[(B,)](logits, logits.stride(0), out, N, BLOCK=2048, num_warps=8)
    return out
