"""Triton rotation of q or k for prefill and decode (no gradient): one pass, fp32 math, rounded once.

apply_rotary's PyTorch form converts x to fp32, multiplies and adds the two halves (four products, two sums),
concatenates them and converts back: about nine kernels and several fp32 copies per tensor. Here each program
reads BR rows ([B * T] tokens) of every head once, rotates them in registers and writes them in x's dtype.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_R, NUM_WARPS = 16, 4


@triton.jit
def _rotary_kernel(x, s_xb, s_xt, s_xh, cos, sin, s_cb, s_ct, y, T, H, HALF, R,
                   BR: tl.constexpr, BH: tl.constexpr):
    o_r = tl.program_id(0) * BR + tl.arange(0, BR)  # token rows b * T + t
    o_h = tl.arange(0, BH)
    m_r = o_r < R
    b, t = (o_r // T).to(tl.int64), (o_r % T).to(tl.int64)
    c_off = b * s_cb + t * s_ct  # cos, sin [B or 1, T, HALF] (s_cb 0 when shared)
    x_off = b * s_xb + t * s_xt
    y_off = o_r.to(tl.int64) * H * 2 * HALF
    for h in range(H):
        for i0 in range(0, HALF, BH):
            o_i = i0 + o_h
            m = m_r[:, None] & (o_i < HALF)[None, :]
            c = tl.load(cos + c_off[:, None] + o_i[None, :], mask=m, other=0.0).to(tl.float32)
            s = tl.load(sin + c_off[:, None] + o_i[None, :], mask=m, other=0.0).to(tl.float32)
            p = x + x_off[:, None] + h * s_xh + o_i[None, :]
            x1 = tl.load(p, mask=m, other=0.0).to(tl.float32)
            x2 = tl.load(p + HALF, mask=m, other=0.0).to(tl.float32)
            q = y + y_off[:, None] + h * 2 * HALF + o_i[None, :]
            tl.store(q, (x1 * c - x2 * s).to(y.dtype.element_ty), mask=m)
            tl.store(q + HALF, (x2 * c + x1 * s).to(y.dtype.element_ty), mask=m)


def triton_apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """apply_rotary (rotate-half) of x [B, T, H, D] (any strides but a unit one along D) by cos, sin
    [B or 1, T, D/2]: a new contiguous tensor in x's dtype."""
    if x.stride(-1) != 1:
        x = x.contiguous()
    B, T, H, D = x.shape
    half = D // 2
    cos, sin = cos.contiguous(), sin.contiguous()
    y = torch.empty(B, T, H, D, dtype=x.dtype, device=x.device)
    R = B * T
    s_cb = 0 if cos.shape[0] == 1 else cos.stride(0)
    _rotary_kernel[(triton.cdiv(R, BLOCK_R),)](
        x, x.stride(0), x.stride(1), x.stride(2), cos, sin, s_cb, cos.stride(1), y, T, H, half, R,
        BR=BLOCK_R, BH=min(64, triton.next_power_of_2(half)), num_warps=NUM_WARPS,
    )
    return y
