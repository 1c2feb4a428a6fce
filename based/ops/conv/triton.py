"""Triton kernel of short_conv_step for tap-major states: one pass that shifts, convolves and gates.

Each thread owns a few channels across all K taps, so it can read taps 1..K-1 and write them one tap
down without racing another thread. Compiled PyTorch cannot express that: it must stage the shifted
state in a temporary (the shift reads what other elements write), moving the state twice.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _short_conv_step_kernel(
    x, s_x, gate, s_g, state, s_s, w, bias, y, B, C,
    K: tl.constexpr, BC: tl.constexpr, ROWS: tl.constexpr,
    HAS_BIAS: tl.constexpr, SILU: tl.constexpr, HAS_GATE: tl.constexpr,
):
    o_c = tl.program_id(0) * BC + tl.arange(0, BC)
    m_c = o_c < C
    b_bias = tl.load(bias + o_c, mask=m_c, other=0.0).to(tl.float32) if HAS_BIAS else tl.zeros([BC], tl.float32)
    b_wlast = tl.load(w + o_c * K + (K - 1), mask=m_c, other=0.0).to(tl.float32)
    # ROWS sequences per program: the weights are read once for all of them.
    for r in range(ROWS):
        i_b = tl.program_id(1).to(tl.int64) * ROWS + r
        m = m_c & (tl.full([BC], 0, tl.int64) + i_b < B)  # a [BC] mask (the interpreter takes no scalar)
        b_x = tl.load(x + i_b * s_x + o_c, mask=m, other=0.0).to(state.dtype.element_ty)
        p_s = state + i_b * s_s + o_c  # tap k of this row at p_s + k * C
        b_y = b_bias + b_x.to(tl.float32) * b_wlast
        for k in tl.static_range(K - 1):
            b_s = tl.load(p_s + (k + 1) * C, mask=m, other=0.0)
            b_y += b_s.to(tl.float32) * tl.load(w + o_c * K + k, mask=m_c, other=0.0).to(tl.float32)
            tl.store(p_s + k * C, b_s, mask=m)  # after its load: the same thread read tap k+1 above
        tl.store(p_s + (K - 1) * C, b_x, mask=m)
        if SILU:
            b_y = b_y * tl.sigmoid(b_y)
        if HAS_GATE:
            b_y = b_y * tl.load(gate + i_b * s_g + o_c, mask=m, other=0.0).to(tl.float32)
        tl.store(y + i_b * C + o_c, b_y.to(y.dtype.element_ty), mask=m)


# A graph break where a compiled block calls it (as for the other Triton ops): the launch is host Python.
@torch.compiler.disable
def triton_short_conv_step(x, conv_state, weight, bias=None, activation=None, gate=None, rows=None) -> torch.Tensor:
    """short_conv_step for a tap-major conv_state ([B, C, K] stored as contiguous [B, K, C]). rows: sequences
    per program (default 8 from batch 1024, else 1)."""
    B, C, K = conv_state.shape
    y = torch.empty(B, C, dtype=conv_state.dtype, device=conv_state.device)
    BC = min(1024, triton.next_power_of_2(C))
    ROWS = rows or (8 if B >= 1024 else 1)  # few rows: every program to its own row, for parallelism
    grid = (triton.cdiv(C, BC), triton.cdiv(B, ROWS))
    w = weight.contiguous()
    _short_conv_step_kernel[grid](
        x, x.stride(0), gate if gate is not None else x, gate.stride(0) if gate is not None else 0,
        conv_state, conv_state.stride(0), w, bias if bias is not None else w, y, B, C,
        K=K, BC=BC, ROWS=ROWS, HAS_BIAS=bias is not None, SILU=activation == "silu", HAS_GATE=gate is not None,
        num_warps=4,
    )
    return y
