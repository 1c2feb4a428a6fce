"""Triton kernel of decode_attn: one program per (sequence, head), an online softmax over ring blocks.

Rows are visited in storage order; softmax does not care about order, only about which rows count
(written ones, position >= 0). A full-attention ring never wraps, so rows past `last` are skipped
outright: the loop stops at min(last + 1, L), and a short context costs what it holds, not the ring.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..launch import pdl_options, wait_for_inputs


@triton.jit
def _online_softmax_start(BDV: tl.constexpr):
    """The running max, normaliser and output [BDV] before any row."""
    return tl.full([], float("-inf"), tl.float32), tl.zeros([], tl.float32), tl.zeros([BDV], tl.float32)


@triton.jit
def _online_softmax_step(b_s, m_r, p_vt, m_dv, b_m, b_l, b_acc):
    """Fold a block of scores b_s [BL] (rows m_r are real) into the running max b_m, normaliser b_l and
    output b_acc [BDV]; the block's values are loaded here from p_vt [BL, BDV], once the weights are known."""
    b_s = tl.where(m_r, b_s, float("-inf"))
    b_m_new = tl.maximum(b_m, tl.max(b_s, 0))
    b_p = tl.exp(b_s - b_m_new)
    alpha = tl.exp(b_m - b_m_new)
    b_vt = tl.load(p_vt, mask=m_r[:, None] & m_dv[None, :], other=0.0)
    b_acc = b_acc * alpha + tl.sum(b_p[:, None] * b_vt.to(tl.float32), 0)
    b_l = b_l * alpha + tl.sum(b_p, 0)
    return b_m_new, b_l, b_acc


@triton.jit
def _decode_attn_kernel(
    q, k, v, last, o, scale, L,
    s_kb, s_kl, s_vb, s_vl,
    H: tl.constexpr, D: tl.constexpr, DV: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr, BL: tl.constexpr,
):
    # Heads fastest: programs running side by side read neighbouring slices of the same cache rows, so
    # DRAM bursts that straddle two heads' slices (112 bf16 = 224 bytes) are used by both.
    i_bh = tl.program_id(0).to(tl.int64)
    i_b, i_h = i_bh // H, i_bh % H
    o_d, o_dv = tl.arange(0, BD), tl.arange(0, BDV)
    m_d, m_dv = o_d < D, o_dv < DV
    b_q = tl.load(q + (i_b * H + i_h) * D + o_d, mask=m_d, other=0.0).to(tl.float32) * scale
    b_last = tl.load(last + i_b)
    n_rows = tl.minimum(b_last + 1, L)  # rows >= last + 1 are unwritten until the ring wraps
    p_k = k + i_b * s_kb + i_h * D
    p_v = v + i_b * s_vb + i_h * DV
    b_m, b_l, b_acc = _online_softmax_start(BDV)
    for r0 in range(0, n_rows, BL):
        o_r = r0 + tl.arange(0, BL)
        m_r = o_r < n_rows
        b_k = tl.load(p_k + o_r[:, None] * s_kl + o_d[None, :], mask=m_r[:, None] & m_d[None, :], other=0.0)
        b_s = tl.sum(b_k.to(tl.float32) * b_q[None, :], 1)  # [BL]
        p_vt = p_v + o_r[:, None] * s_vl + o_dv[None, :]
        b_m, b_l, b_acc = _online_softmax_step(b_s, m_r, p_vt, m_dv, b_m, b_l, b_acc)
    tl.store(o + (i_b * H + i_h) * DV + o_dv, (b_acc / b_l).to(o.dtype.element_ty), mask=m_dv)


# A graph break where a compiled block calls it, as for the Taylor kernels: the launch is host-side Python.
@torch.compiler.disable
def triton_decode_attn(
    q, k_cache, v_cache, last, scale: float | None = None, block_l: int | None = None,
    num_warps: int | None = None, num_stages: int | None = None,
) -> torch.Tensor:
    """Same contract as decode_attn. The caches' last two dims must be contiguous ([..., H, D] rows).
    block_l (rows per iteration), num_warps and num_stages are tuning knobs (benchmarks/decode_attn.py --sweep).
    With thousands of programs, 16 rows a step on one warp keeps the most loads in flight per SM (H200, batch
    2048 x 16 heads of 112, ring 128: 3.5 TB/s against 2.2 TB/s at 64 rows on 4 warps, SDPA 2.3 TB/s;
    benchmarks/results/decode-attn-sweep-h200-2026-11-29.json); few programs keep 4 warps each busy."""
    B, H, D = q.shape
    L, DV = k_cache.shape[1], v_cache.shape[-1]
    if k_cache.stride()[2:] != (D, 1) or v_cache.stride()[2:] != (DV, 1):
        raise ValueError("decode_attn: each cache row [H, D] must be contiguous (allocate_inference_cache layout)")
    q = q.contiguous()
    o = torch.empty(B, H, DV, dtype=q.dtype, device=q.device)
    BD, BDV = triton.next_power_of_2(D), triton.next_power_of_2(DV)
    many = B * H >= 2048
    BL = block_l or (16 if many else max(16, min(64, 8192 // max(BD, BDV))))
    num_warps = num_warps or (1 if many else 4)
    extra = {} if num_stages is None else {"num_stages": num_stages}
    _decode_attn_kernel[(B * H,)](
        q, k_cache, v_cache, last.to(torch.int64).contiguous(), o, D**-0.5 if scale is None else scale, L,
        k_cache.stride(0), k_cache.stride(1), v_cache.stride(0), v_cache.stride(1),
        H=H, D=D, DV=DV, BD=BD, BDV=BDV, BL=BL, num_warps=num_warps, **extra,
    )
    return o


@triton.jit
def _decode_attn_step_kernel(
    q, k, v, s_q, s_k, s_v, inv_freq, k_cache, v_cache, pos, o, scale, L,
    s_kb, s_kl, s_vb, s_vl,
    H: tl.constexpr, D: tl.constexpr, DV: tl.constexpr, BH: tl.constexpr, BDV: tl.constexpr, BL: tl.constexpr,
    ROTARY: tl.constexpr, PDL: tl.constexpr,
):
    """decode_attn with the new token's work folded in: rotate q and k at their position (rotate-half
    pairs (i, i + D/2), math in fp32 rounded to the input dtype as apply_rotary does), write k and v into
    ring row pos % L, then the online softmax of _decode_attn_kernel over the written rows. Head dims are
    handled as two halves so that the rotation needs no shuffle."""
    wait_for_inputs(PDL)
    i_bh = tl.program_id(0).to(tl.int64)
    i_b, i_h = i_bh // H, i_bh % H
    HALF: tl.constexpr = D // 2
    o_h, o_dv = tl.arange(0, BH), tl.arange(0, BDV)
    m_h, m_dv = o_h < HALF, o_dv < DV
    b_pos = tl.load(pos + i_b)
    p_q, p_k = q + i_b * s_q + i_h * D, k + i_b * s_k + i_h * D
    b_q1 = tl.load(p_q + o_h, mask=m_h, other=0.0)
    b_q2 = tl.load(p_q + HALF + o_h, mask=m_h, other=0.0)
    b_k1 = tl.load(p_k + o_h, mask=m_h, other=0.0)
    b_k2 = tl.load(p_k + HALF + o_h, mask=m_h, other=0.0)
    b_v = tl.load(v + i_b * s_v + i_h * DV + o_dv, mask=m_dv, other=0.0)
    if ROTARY:
        b_ang = b_pos.to(tl.float32) * tl.load(inv_freq + o_h, mask=m_h, other=0.0)
        b_cos, b_sin = tl.cos(b_ang), tl.sin(b_ang)
        q1, q2, k1, k2 = b_q1.to(tl.float32), b_q2.to(tl.float32), b_k1.to(tl.float32), b_k2.to(tl.float32)
        b_q1 = (q1 * b_cos - q2 * b_sin).to(b_q1.dtype)
        b_q2 = (q2 * b_cos + q1 * b_sin).to(b_q2.dtype)
        b_k1 = (k1 * b_cos - k2 * b_sin).to(b_k1.dtype)
        b_k2 = (k2 * b_cos + k1 * b_sin).to(b_k2.dtype)
    row = b_pos % L
    p_kc = k_cache + i_b * s_kb + i_h * D
    p_vc = v_cache + i_b * s_vb + i_h * DV
    tl.store(p_kc + row * s_kl + o_h, b_k1.to(k_cache.dtype.element_ty), mask=m_h)
    tl.store(p_kc + row * s_kl + HALF + o_h, b_k2.to(k_cache.dtype.element_ty), mask=m_h)
    tl.store(p_vc + row * s_vl + o_dv, b_v.to(v_cache.dtype.element_ty), mask=m_dv)
    tl.debug_barrier()  # the row just written is read back below, possibly by other threads
    b_q1 = b_q1.to(tl.float32) * scale
    b_q2 = b_q2.to(tl.float32) * scale
    n_rows = tl.minimum(b_pos + 1, L)  # rows >= pos + 1 are unwritten until the ring wraps
    b_m, b_l, b_acc = _online_softmax_start(BDV)
    for r0 in range(0, n_rows, BL):
        o_r = r0 + tl.arange(0, BL)
        m_r = o_r < n_rows
        m_k = m_r[:, None] & m_h[None, :]
        b_kt1 = tl.load(p_kc + o_r[:, None] * s_kl + o_h[None, :], mask=m_k, other=0.0)
        b_kt2 = tl.load(p_kc + o_r[:, None] * s_kl + HALF + o_h[None, :], mask=m_k, other=0.0)
        b_s = tl.sum(b_kt1.to(tl.float32) * b_q1[None, :], 1) + tl.sum(b_kt2.to(tl.float32) * b_q2[None, :], 1)
        p_vt = p_vc + o_r[:, None] * s_vl + o_dv[None, :]
        b_m, b_l, b_acc = _online_softmax_step(b_s, m_r, p_vt, m_dv, b_m, b_l, b_acc)
    tl.store(o + i_bh * DV + o_dv, (b_acc / b_l).to(o.dtype.element_ty), mask=m_dv)


@torch.compiler.disable
def triton_decode_attn_step(
    q, k, v, k_cache, v_cache, positions, inv_freq=None, scale: float | None = None,
    block_l: int | None = None, num_warps: int | None = None,
) -> torch.Tensor:
    """Same contract as decode_attn_step. q, k [B, H, D] and v [B, H, Dv] may be strided views (e.g. of
    one fused projection) whose last two dims are contiguous; the caches' [H, D] rows must be contiguous."""
    B, H, D = q.shape
    L, DV = k_cache.shape[1], v_cache.shape[-1]
    if k_cache.stride()[2:] != (D, 1) or v_cache.stride()[2:] != (DV, 1):
        raise ValueError("decode_attn_step: each cache row [H, D] must be contiguous (allocate_inference_cache layout)")
    q, k, v = (t if t.stride()[1:] == (t.shape[-1], 1) else t.contiguous() for t in (q, k, v))
    o = torch.empty(B, H, DV, dtype=q.dtype, device=q.device)
    BH, BDV = triton.next_power_of_2(D // 2), triton.next_power_of_2(DV)
    many = B * H >= 2048  # as in triton_decode_attn
    BL = block_l or (16 if many else max(16, min(64, 8192 // max(2 * BH, BDV))))
    rotary = inv_freq is not None
    launch = pdl_options(q.device, B * H)  # batch 1: the next kernel loads its weights during this one
    _decode_attn_step_kernel[(B * H,)](
        q, k, v, q.stride(0), k.stride(0), v.stride(0), inv_freq.contiguous() if rotary else q, k_cache, v_cache,
        positions.to(torch.int64).contiguous(), o, D**-0.5 if scale is None else scale, L,
        k_cache.stride(0), k_cache.stride(1), v_cache.stride(0), v_cache.stride(1),
        H=H, D=D, DV=DV, BH=BH, BDV=BDV, BL=BL, ROTARY=rotary, PDL=bool(launch),
        num_warps=num_warps or (1 if many else 4), **launch,
    )
    return o
