"""Triton kernel of decode_attn: one program per (sequence, head), an online softmax over ring blocks.

Rows are visited in storage order; softmax does not care about order, only about which rows count
(written ones, position >= 0). A full-attention ring never wraps, so rows past `last` are skipped
outright: the loop stops at min(last + 1, L), and a short context costs what it holds, not the ring.

The decode step (rotary, ring write, attention) has three forms: one program per (sequence, head) walking the
ring; at small batches, each head's ring split over programs whose partial softmaxes the last one merges, or
(short rings, the default there) the whole ring held by one program and read before the PDL wait.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..launch import grid_sms, pdl_options, ticket_counters, wait_for_inputs


@triton.jit
def _online_softmax_start(BDV: tl.constexpr):
    """The running max, normaliser and output [BDV] before any row."""
    return tl.full([], float("-inf"), tl.float32), tl.zeros([], tl.float32), tl.zeros([BDV], tl.float32)


@triton.jit
def _values(p_vt, m_r, m_dv):
    """The values [BL, BDV] of rows m_r at p_vt."""
    return tl.load(p_vt, mask=m_r[:, None] & m_dv[None, :], other=0.0)


@triton.jit
def _online_softmax_step(b_s, m_r, b_vt, b_m, b_l, b_acc):
    """Fold a block of scores b_s [BL] (rows m_r are real) and its values b_vt [BL, BDV] into the running
    max b_m, normaliser b_l and output b_acc [BDV]."""
    b_s = tl.where(m_r, b_s, float("-inf"))
    b_m_new = tl.maximum(b_m, tl.max(b_s, 0))
    b_p = tl.exp(b_s - b_m_new)
    alpha = tl.exp(b_m - b_m_new)
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
        b_vt = _values(p_v + o_r[:, None] * s_vl + o_dv[None, :], m_r, m_dv)  # after the scores: fewer live
        b_m, b_l, b_acc = _online_softmax_step(b_s, m_r, b_vt, b_m, b_l, b_acc)
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
def _rotated_token(q, k, v, s_q, s_k, s_v, inv_freq, b_pos, i_b, i_h, H: tl.constexpr, D: tl.constexpr,
                   DV: tl.constexpr, BH: tl.constexpr, BDV: tl.constexpr, ROTARY: tl.constexpr, WRITE):
    """The new token of head i_h: q and k halves rotated at b_pos (rotate-half pairs (i, i + D/2), math in fp32
    rounded to the input dtype as apply_rotary does) and v; k and v are read only where WRITE."""
    HALF: tl.constexpr = D // 2
    o_h, o_dv = tl.arange(0, BH), tl.arange(0, BDV)
    m_h, m_dv = o_h < HALF, o_dv < DV
    p_q, p_k = q + i_b * s_q + i_h * D, k + i_b * s_k + i_h * D
    b_q1 = tl.load(p_q + o_h, mask=m_h, other=0.0)
    b_q2 = tl.load(p_q + HALF + o_h, mask=m_h, other=0.0)
    # WRITE made a block before the &: TRITON_INTERPRET's mask of a block & a scalar is not boolean.
    m_kw = m_h & (o_h * 0 + WRITE.to(tl.int32) != 0)
    m_vw = m_dv & (o_dv * 0 + WRITE.to(tl.int32) != 0)
    b_k1 = tl.load(p_k + o_h, mask=m_kw, other=0.0)
    b_k2 = tl.load(p_k + HALF + o_h, mask=m_kw, other=0.0)
    b_v = tl.load(v + i_b * s_v + i_h * DV + o_dv, mask=m_vw, other=0.0)
    if ROTARY:
        b_ang = b_pos.to(tl.float32) * tl.load(inv_freq + o_h, mask=m_h, other=0.0)
        b_cos, b_sin = tl.cos(b_ang), tl.sin(b_ang)
        q1, q2, k1, k2 = b_q1.to(tl.float32), b_q2.to(tl.float32), b_k1.to(tl.float32), b_k2.to(tl.float32)
        b_q1 = (q1 * b_cos - q2 * b_sin).to(b_q1.dtype)
        b_q2 = (q2 * b_cos + q1 * b_sin).to(b_q2.dtype)
        b_k1 = (k1 * b_cos - k2 * b_sin).to(b_k1.dtype)
        b_k2 = (k2 * b_cos + k1 * b_sin).to(b_k2.dtype)
    return b_q1, b_q2, b_k1, b_k2, b_v, m_kw, m_vw


@triton.jit
def _write_row(p_kc, p_vc, row, s_kl, s_vl, b_k1, b_k2, b_v, m_kw, m_vw, HALF: tl.constexpr, BH: tl.constexpr,
               BDV: tl.constexpr):
    """k's halves and v into ring row `row` of one head's caches (where the masks allow), in their dtype."""
    o_h, o_dv = tl.arange(0, BH), tl.arange(0, BDV)
    tl.store(p_kc + row * s_kl + o_h, b_k1.to(p_kc.dtype.element_ty), mask=m_kw)
    tl.store(p_kc + row * s_kl + HALF + o_h, b_k2.to(p_kc.dtype.element_ty), mask=m_kw)
    tl.store(p_vc + row * s_vl + o_dv, b_v.to(p_vc.dtype.element_ty), mask=m_vw)


@triton.jit
def _new_token(q, k, v, s_q, s_k, s_v, inv_freq, k_cache, v_cache, b_pos, i_b, i_h, L, s_kb, s_kl, s_vb, s_vl,
               H: tl.constexpr, D: tl.constexpr, DV: tl.constexpr, BH: tl.constexpr, BDV: tl.constexpr,
               ROTARY: tl.constexpr, WRITE):
    """_rotated_token, with k and v written into ring row b_pos % L where WRITE. Returns q's halves in fp32 and
    the head's cache pointers."""
    HALF: tl.constexpr = D // 2
    b_q1, b_q2, b_k1, b_k2, b_v, m_kw, m_vw = _rotated_token(q, k, v, s_q, s_k, s_v, inv_freq, b_pos, i_b, i_h, H, D,
                                                             DV, BH, BDV, ROTARY, WRITE)
    p_kc = k_cache + i_b * s_kb + i_h * D
    p_vc = v_cache + i_b * s_vb + i_h * DV
    _write_row(p_kc, p_vc, b_pos % L, s_kl, s_vl, b_k1, b_k2, b_v, m_kw, m_vw, HALF, BH, BDV)
    tl.debug_barrier()  # the row just written is read back by the caller, possibly by other threads
    return b_q1.to(tl.float32), b_q2.to(tl.float32), p_kc, p_vc


@triton.jit
def _cache_scores(p_kc, o_r, m_r, b_q1, b_q2, s_kl, HALF: tl.constexpr, BH: tl.constexpr):
    """q . k of the cached keys in rows o_r [BL] (m_r: rows that count), the key halves read in place."""
    o_h = tl.arange(0, BH)
    m_k = m_r[:, None] & (o_h < HALF)[None, :]
    b_kt1 = tl.load(p_kc + o_r[:, None] * s_kl + o_h[None, :], mask=m_k, other=0.0)
    b_kt2 = tl.load(p_kc + o_r[:, None] * s_kl + HALF + o_h[None, :], mask=m_k, other=0.0)
    return tl.sum(b_kt1.to(tl.float32) * b_q1[None, :], 1) + tl.sum(b_kt2.to(tl.float32) * b_q2[None, :], 1)


@triton.jit
def _decode_attn_step_kernel(
    q, k, v, s_q, s_k, s_v, inv_freq, k_cache, v_cache, pos, o, scale, L,
    s_kb, s_kl, s_vb, s_vl,
    H: tl.constexpr, D: tl.constexpr, DV: tl.constexpr, BH: tl.constexpr, BDV: tl.constexpr, BL: tl.constexpr,
    ROTARY: tl.constexpr, PDL: tl.constexpr,
):
    """decode_attn with the new token's work folded in: rotate q and k at their position, write k and v
    into ring row pos % L, then the online softmax of _decode_attn_kernel over the written rows. Head dims
    are handled as two halves so that the rotation needs no shuffle."""
    wait_for_inputs(PDL)
    i_bh = tl.program_id(0).to(tl.int64)
    i_b, i_h = i_bh // H, i_bh % H
    o_dv = tl.arange(0, BDV)
    m_dv = o_dv < DV
    b_pos = tl.load(pos + i_b)
    b_q1, b_q2, p_kc, p_vc = _new_token(q, k, v, s_q, s_k, s_v, inv_freq, k_cache, v_cache, b_pos, i_b, i_h, L,
                                        s_kb, s_kl, s_vb, s_vl, H, D, DV, BH, BDV, ROTARY,
                                        b_pos >= 0)  # always true: this program writes the new token
    b_q1, b_q2 = b_q1 * scale, b_q2 * scale
    n_rows = tl.minimum(b_pos + 1, L)  # rows >= pos + 1 are unwritten until the ring wraps
    b_m, b_l, b_acc = _online_softmax_start(BDV)
    for r0 in range(0, n_rows, BL):
        o_r = r0 + tl.arange(0, BL)
        m_r = o_r < n_rows
        b_s = _cache_scores(p_kc, o_r, m_r, b_q1, b_q2, s_kl, D // 2, BH)
        b_vt = _values(p_vc + o_r[:, None] * s_vl + o_dv[None, :], m_r, m_dv)  # after the scores: fewer live
        b_m, b_l, b_acc = _online_softmax_step(b_s, m_r, b_vt, b_m, b_l, b_acc)
    tl.store(o + i_bh * DV + o_dv, (b_acc / b_l).to(o.dtype.element_ty), mask=m_dv)


@triton.jit
def _decode_attn_step_ring_kernel(
    q, k, v, s_q, s_k, s_v, inv_freq, k_cache, v_cache, pos, o, scale, L,
    s_kb, s_kl, s_vb, s_vl,
    H: tl.constexpr, D: tl.constexpr, DV: tl.constexpr, BH: tl.constexpr, BDV: tl.constexpr, BL: tl.constexpr,
    ROTARY: tl.constexpr, PDL: tl.constexpr,
):
    """_decode_attn_step_kernel for a short ring (BL >= L rows) held whole in registers, one program per head
    (small batches). The ring is read before the wait: only this layer's step a token ago wrote it, so under
    PDL the read overlaps the projection before, and what is left after the wait is the new token (from L2)
    and arithmetic; no split over programs, so no partial results to merge. Row pos % L is the new token's,
    put in place in registers (rounded to the cache's dtype, as a read back would give it) and written out."""
    i_bh = tl.program_id(0).to(tl.int64)
    i_b, i_h = i_bh // H, i_bh % H
    HALF: tl.constexpr = D // 2
    o_r, o_h, o_dv = tl.arange(0, BL), tl.arange(0, BH), tl.arange(0, BDV)
    m_r, m_h, m_dv = o_r < L, o_h < HALF, o_dv < DV
    p_kc = k_cache + i_b * s_kb + i_h * D
    p_vc = v_cache + i_b * s_vb + i_h * DV
    m_k = m_r[:, None] & m_h[None, :]
    b_kt1 = tl.load(p_kc + o_r[:, None] * s_kl + o_h[None, :], mask=m_k, other=0.0)
    b_kt2 = tl.load(p_kc + o_r[:, None] * s_kl + HALF + o_h[None, :], mask=m_k, other=0.0)
    b_vt = _values(p_vc + o_r[:, None] * s_vl + o_dv[None, :], m_r, m_dv)
    wait_for_inputs(PDL)
    b_pos = tl.load(pos + i_b)
    b_q1, b_q2, b_k1, b_k2, b_v, m_kw, m_vw = _rotated_token(q, k, v, s_q, s_k, s_v, inv_freq, b_pos, i_b, i_h, H, D,
                                                             DV, BH, BDV, ROTARY, b_pos >= 0)
    row = b_pos % L
    b_k1, b_k2 = b_k1.to(k_cache.dtype.element_ty), b_k2.to(k_cache.dtype.element_ty)
    b_v = b_v.to(v_cache.dtype.element_ty)
    _write_row(p_kc, p_vc, row, s_kl, s_vl, b_k1, b_k2, b_v, m_kw, m_vw, HALF, BH, BDV)
    new = (o_r == row)[:, None]
    b_kt1 = tl.where(new, b_k1[None, :], b_kt1)
    b_kt2 = tl.where(new, b_k2[None, :], b_kt2)
    b_vt = tl.where(new, b_v[None, :], b_vt)
    b_q1, b_q2 = b_q1.to(tl.float32) * scale, b_q2.to(tl.float32) * scale
    b_s = tl.sum(b_kt1.to(tl.float32) * b_q1[None, :], 1) + tl.sum(b_kt2.to(tl.float32) * b_q2[None, :], 1)
    m_s = o_r < tl.minimum(b_pos + 1, L)  # rows >= pos + 1 are unwritten until the ring wraps
    b_m, b_l, b_acc = _online_softmax_start(BDV)
    b_m, b_l, b_acc = _online_softmax_step(b_s, m_s, b_vt, b_m, b_l, b_acc)
    tl.store(o + i_bh * DV + o_dv, (b_acc / b_l).to(o.dtype.element_ty), mask=m_dv)


@triton.jit
def _decode_attn_step_split_kernel(
    q, k, v, s_q, s_k, s_v, inv_freq, k_cache, v_cache, pos, o, part, count, scale, L, RS,
    s_kb, s_kl, s_vb, s_vl,
    H: tl.constexpr, D: tl.constexpr, DV: tl.constexpr, BH: tl.constexpr, BDV: tl.constexpr, BL: tl.constexpr,
    NS: tl.constexpr, NSP: tl.constexpr, ROTARY: tl.constexpr, PDL: tl.constexpr,
):
    """_decode_attn_step_kernel with each head's ring split into NS ranges of RS rows, one program each (a
    small batch's 16 heads would leave the GPU idle and walk the window one load after another). The
    program whose range holds row pos % L writes the new token there; each keeps the softmax of its rows
    (max, normaliser, output) in part, and the head's last program to finish (an atomic ticket) merges them."""
    wait_for_inputs(PDL)
    i_bh = tl.program_id(0).to(tl.int64)
    i_s = tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    o_dv = tl.arange(0, BDV)
    m_dv = o_dv < DV
    b_pos = tl.load(pos + i_b)
    lo = i_s * RS
    hi = tl.minimum(lo + RS, tl.minimum(b_pos + 1, L))  # rows >= pos + 1 are unwritten until the ring wraps
    row = b_pos % L
    b_q1, b_q2, p_kc, p_vc = _new_token(q, k, v, s_q, s_k, s_v, inv_freq, k_cache, v_cache, b_pos, i_b, i_h, L,
                                        s_kb, s_kl, s_vb, s_vl, H, D, DV, BH, BDV, ROTARY,
                                        (row >= lo) & (row < lo + RS))
    b_q1, b_q2 = b_q1 * scale, b_q2 * scale
    b_m, b_l, b_acc = _online_softmax_start(BDV)
    for r0 in range(lo, hi, BL):
        o_r = r0 + tl.arange(0, BL)
        m_r = o_r < hi
        # Values loaded before the keys' scores are summed: one memory round trip for both, not two.
        b_vt = _values(p_vc + o_r[:, None] * s_vl + o_dv[None, :], m_r, m_dv)
        b_s = _cache_scores(p_kc, o_r, m_r, b_q1, b_q2, s_kl, D // 2, BH)
        b_m, b_l, b_acc = _online_softmax_step(b_s, m_r, b_vt, b_m, b_l, b_acc)
    # part [B*H, NS, BDV + 2]: the range's output (not yet divided), then its max and normaliser. A range
    # without rows leaves max -inf, normaliser 0.
    p_part = part + (i_bh * NS + i_s) * (BDV + 2)
    tl.store(p_part + o_dv, b_acc)
    tl.store(p_part + BDV, b_m)
    tl.store(p_part + BDV + 1, b_l)
    # acq_rel: the parts stored above are visible to whichever program takes the last ticket.
    if tl.atomic_add(count + i_bh, 1, sem="acq_rel") == NS - 1:
        o_s = tl.arange(0, NSP)
        p_all = part + (i_bh * NS + o_s) * (BDV + 2)  # [NSP]
        b_ms = tl.load(p_all + BDV, mask=o_s < NS, other=float("-inf"))
        b_max = tl.max(b_ms, 0)  # finite: range 0 holds row 0, written since position 0
        b_w = tl.exp(b_ms - b_max)  # 0 for ranges without rows
        b_den = tl.sum(b_w * tl.load(p_all + BDV + 1, mask=o_s < NS, other=0.0), 0)
        b_num = tl.sum(b_w[:, None] * tl.load(p_all[:, None] + o_dv[None, :], mask=(o_s < NS)[:, None], other=0.0), 0)
        tl.store(o + i_bh * DV + o_dv, (b_num / b_den).to(o.dtype.element_ty), mask=m_dv)
        tl.store(count + i_bh, 0)  # ready for the next launch (ticket_counters)


# Up to this many (sequence, head) pairs the step splits each ring over programs (as the Taylor step does
# its state rows): at batch 1 of the 1.3b preset, 16 programs on 132 SMs otherwise.
SPLIT_MAX_HEADS = 64
SPLIT_ROWS = 16  # rows per split program's load
# Rings of at most this many values (rows x (key + value columns), padded) are held whole by one program per head
# at small batches (_decode_attn_step_ring_kernel): 128 rows of 112 + 112 in the 1.3b preset.
RING_MAX_VALUES = 2**15
RING_WARPS = 8


@torch.compiler.disable
def triton_decode_attn_step(
    q, k, v, k_cache, v_cache, positions, inv_freq=None, scale: float | None = None,
    block_l: int | None = None, num_warps: int | None = None, split: bool | None = None, ranges: int | None = None,
    ring: bool | None = None,
) -> torch.Tensor:
    """Same contract as decode_attn_step. q, k [B, H, D] and v [B, H, Dv] may be strided views (e.g. of
    one fused projection) whose last two dims are contiguous; the caches' [H, D] rows must be contiguous.
    ring: each head's whole ring in one program's registers, read before the PDL wait (default: at most
    SPLIT_MAX_HEADS heads in all and a ring of at most RING_MAX_VALUES values, unless split is given).
    split: each head's ring over several programs (default: at most SPLIT_MAX_HEADS heads in all), `ranges`
    of them (default: about two programs per SM in all)."""
    B, H, D = q.shape
    L, DV = k_cache.shape[1], v_cache.shape[-1]
    if k_cache.stride()[2:] != (D, 1) or v_cache.stride()[2:] != (DV, 1):
        raise ValueError("decode_attn_step: each cache row [H, D] must be contiguous (allocate_inference_cache layout)")
    q, k, v = (t if t.stride()[1:] == (t.shape[-1], 1) else t.contiguous() for t in (q, k, v))
    o = torch.empty(B, H, DV, dtype=q.dtype, device=q.device)
    BH, BDV = triton.next_power_of_2(D // 2), triton.next_power_of_2(DV)
    rotary = inv_freq is not None
    args = (q, k, v, q.stride(0), k.stride(0), v.stride(0), inv_freq.contiguous() if rotary else q, k_cache, v_cache,
            positions.to(torch.int64).contiguous(), o)
    strides = (k_cache.stride(0), k_cache.stride(1), v_cache.stride(0), v_cache.stride(1))
    scale = D**-0.5 if scale is None else scale
    small = B * H <= SPLIT_MAX_HEADS
    ring_bl = triton.next_power_of_2(L)
    if ring if ring is not None else (small and split is None and ring_bl * (2 * BH + BDV) <= RING_MAX_VALUES):
        launch = pdl_options(q.device, B * H)  # the ring's read overlaps the projection before
        _decode_attn_step_ring_kernel[(B * H,)](
            *args, scale, L, *strides, H=H, D=D, DV=DV, BH=BH, BDV=BDV, BL=ring_bl, ROTARY=rotary,
            PDL=bool(launch), num_warps=num_warps or RING_WARPS, **launch,
        )
        return o
    if split if split is not None else small:
        BL = block_l or SPLIT_ROWS
        # Ranges of whole loads, about two programs per SM in all (a long full-attention ring walks its range).
        NS = max(1, min(triton.cdiv(L, BL), ranges or 2 * grid_sms(q.device) // (B * H)))
        RS = triton.cdiv(triton.cdiv(L, NS), BL) * BL
        NS = triton.cdiv(L, RS)
        part = torch.empty(B * H, NS, BDV + 2, dtype=torch.float32, device=q.device)
        count = ticket_counters(q.device, B * H)
        launch = pdl_options(q.device, B * H * NS)  # the next kernel loads its weights during this one
        _decode_attn_step_split_kernel[(B * H, NS)](
            *args, part, count, scale, L, RS, *strides, H=H, D=D, DV=DV, BH=BH, BDV=BDV, BL=BL, NS=NS,
            NSP=triton.next_power_of_2(NS), ROTARY=rotary, PDL=bool(launch), num_warps=num_warps or 4, **launch,
        )
        return o
    many = B * H >= 2048  # as in triton_decode_attn
    BL = block_l or (16 if many else max(16, min(64, 8192 // max(2 * BH, BDV))))
    launch = pdl_options(q.device, B * H)  # batch 1: the next kernel loads its weights during this one
    _decode_attn_step_kernel[(B * H,)](
        *args, scale, L, *strides, H=H, D=D, DV=DV, BH=BH, BDV=BDV, BL=BL, ROTARY=rotary, PDL=bool(launch),
        num_warps=num_warps or (1 if many else 4), **launch,
    )
    return o
