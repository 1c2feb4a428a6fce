"""Triton kernel of swiglu (based/ops/swiglu.py): up * silu(gate) in one pass over the two halves."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_R, BLOCK_N, NUM_WARPS = 16, 256, 4


@triton.jit
def _swiglu_kernel(u, s_u, g, s_g, y, R, N, BR: tl.constexpr, BN: tl.constexpr):
    o_r = tl.program_id(0) * BR + tl.arange(0, BR)
    o_n = tl.program_id(1) * BN + tl.arange(0, BN)
    m = (o_r < R)[:, None] & (o_n < N)[None, :]
    r = o_r.to(tl.int64)[:, None]
    a = tl.load(u + r * s_u + o_n[None, :], mask=m, other=0.0).to(tl.float32)
    b = tl.load(g + r * s_g + o_n[None, :], mask=m, other=0.0).to(tl.float32)
    tl.store(y + r * N + o_n[None, :], (a * b * tl.sigmoid(b)).to(y.dtype.element_ty), mask=m)


def triton_swiglu(up: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """up * silu(gate) of two [..., N] tensors of one shape and dtype, unit stride along N: contiguous, fp32
    inside, rounded once."""
    # [R, N] views where the rows are evenly strided (a half of a projection is), else copies
    u, g = up.reshape(-1, up.shape[-1]), gate.reshape(-1, gate.shape[-1])
    R, N = u.shape
    y = torch.empty(R, N, dtype=up.dtype, device=up.device)
    _swiglu_kernel[(triton.cdiv(R, BLOCK_R), triton.cdiv(N, BLOCK_N))](
        u, u.stride(0), g, g.stride(0), y, R, N, BR=BLOCK_R, BN=BLOCK_N, num_warps=NUM_WARPS)
    return y.view(up.shape)
