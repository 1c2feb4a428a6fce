"""Fused decode step: one token per (sequence, head) against the public fp32 state, updated in place.

    S += phi(k) v^T,  z += phi(k),  y = phi(q) S / (phi(q) . z + eps)
in one pass over S: each state row is read once, updated, written back and folded into the output.
The step is bound by the state's bytes (2 * F * dv * 4 per head, read and written).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ...launch import pdl_options, ticket_counters, wait_for_inputs
from .layout import feature_tables

# Up to this many (sequence, head) pairs the step splits each head's state rows into chunks of SPLIT_ROWS
# over programs of their own: batch 1 of the 1.3b preset is 16 heads, 16 programs on 132 SMs otherwise.
SPLIT_MAX_HEADS = 64
SPLIT_ROWS = 16


@triton.jit
def _state_rows(p_q, p_k, b_v, p_kv, p_ks, fa, fb, fc, o_f, o_v, m_v, F, DV: tl.constexpr, EVICT: tl.constexpr):
    """State rows o_f of one head: S[o_f] += phi_f(k) v^T and z[o_f] += phi_f(k) in place. Returns phi_f(q)
    [BF] and the updated rows S [BF, BV] and z [BF]."""
    m_f = o_f < F
    # phi_f(x) = c_f x[a_f] x[b_f], an index of -1 standing for the constant 1.
    b_a = tl.load(fa + o_f, mask=m_f, other=-1)
    b_b = tl.load(fb + o_f, mask=m_f, other=-1)
    b_c = tl.load(fc + o_f, mask=m_f, other=0.0)
    b_fq = b_c * tl.load(p_q + b_a, mask=b_a >= 0, other=1.0).to(tl.float32) \
        * tl.load(p_q + b_b, mask=b_b >= 0, other=1.0).to(tl.float32)  # [BF]
    b_fk = b_c * tl.load(p_k + b_a, mask=b_a >= 0, other=1.0).to(tl.float32) \
        * tl.load(p_k + b_b, mask=b_b >= 0, other=1.0).to(tl.float32)
    p_s = p_kv + o_f[:, None] * DV + o_v[None, :]
    m_s = m_f[:, None] & m_v[None, :]
    if EVICT:  # the state is streamed: nothing of it is read again this step
        b_s = tl.load(p_s, mask=m_s, other=0.0, eviction_policy="evict_first") + b_fk[:, None] * b_v[None, :]
        tl.store(p_s, b_s, mask=m_s, cache_modifier=".cs")
    else:
        b_s = tl.load(p_s, mask=m_s, other=0.0) + b_fk[:, None] * b_v[None, :]  # [BF, BV]
        tl.store(p_s, b_s, mask=m_s)
    b_z = tl.load(p_ks + o_f, mask=m_f, other=0.0) + b_fk
    tl.store(p_ks + o_f, b_z, mask=m_f)
    return b_fq, b_s, b_z


@triton.jit
def _taylor_step_kernel(
    q, k, v, kv, ks, o, fa, fb, fc, eps,
    D: tl.constexpr, DV: tl.constexpr, F: tl.constexpr, BF: tl.constexpr, BV: tl.constexpr,
    EVICT: tl.constexpr, PDL: tl.constexpr,
):
    wait_for_inputs(PDL)
    i_bh = tl.program_id(0).to(tl.int64)
    o_v = tl.arange(0, BV)
    m_v = o_v < DV
    b_v = tl.load(v + i_bh * DV + o_v, mask=m_v, other=0.0).to(tl.float32)  # [BV]
    b_num = tl.zeros([BV], dtype=tl.float32)
    b_den = tl.zeros([BF], dtype=tl.float32)
    for f0 in range(0, F, BF):
        b_fq, b_s, b_z = _state_rows(q + i_bh * D, k + i_bh * D, b_v, kv + i_bh * F * DV, ks + i_bh * F, fa, fb, fc,
                                     f0 + tl.arange(0, BF), o_v, m_v, F, DV, EVICT)
        b_num += tl.sum(b_fq[:, None] * b_s, 0)
        b_den += b_fq * b_z
    b_o = b_num / (tl.sum(b_den, 0) + eps)
    tl.store(o + i_bh * DV + o_v, b_o.to(o.dtype.element_ty), mask=m_v)


@triton.jit
def _taylor_step_split_kernel(
    q, k, v, kv, ks, o, part, count, fa, fb, fc, eps,
    D: tl.constexpr, DV: tl.constexpr, F: tl.constexpr, BF: tl.constexpr, BV: tl.constexpr, NC: tl.constexpr,
    NCP: tl.constexpr, PDL: tl.constexpr,
):
    """_taylor_step_kernel with each head's state rows split into NC chunks of BF, one program each (a
    small batch's 16 heads would leave the GPU idle): each writes its part of the numerator and denominator,
    and the head's last program to finish (an atomic ticket) sums them into the output."""
    wait_for_inputs(PDL)
    i_bh = tl.program_id(0).to(tl.int64)
    i_c = tl.program_id(1)
    o_v = tl.arange(0, BV)
    m_v = o_v < DV
    b_v = tl.load(v + i_bh * DV + o_v, mask=m_v, other=0.0).to(tl.float32)
    b_fq, b_s, b_z = _state_rows(q + i_bh * D, k + i_bh * D, b_v, kv + i_bh * F * DV, ks + i_bh * F, fa, fb, fc,
                                 i_c * BF + tl.arange(0, BF), o_v, m_v, F, DV, False)
    # part [B*H, NC, BV + 1]: the chunk's numerator, then its denominator in the last column.
    p_part = part + (i_bh * NC + i_c) * (BV + 1)
    tl.store(p_part + o_v, tl.sum(b_fq[:, None] * b_s, 0))
    tl.store(p_part + BV, tl.sum(b_fq * b_z, 0))
    # acq_rel: the parts stored above are visible to whichever program takes the last ticket.
    if tl.atomic_add(count + i_bh, 1, sem="acq_rel") == NC - 1:
        o_c = tl.arange(0, NCP)
        p_all = part + (i_bh * NC + o_c) * (BV + 1)  # [NCP]
        b_num = tl.sum(tl.load(p_all[:, None] + o_v[None, :], mask=(o_c < NC)[:, None], other=0.0), 0)
        b_den = tl.sum(tl.load(p_all + BV, mask=o_c < NC, other=0.0), 0)
        tl.store(o + i_bh * DV + o_v, (b_num / (b_den + eps)).to(o.dtype.element_ty), mask=m_v)
        tl.store(count + i_bh, 0)  # ready for the next launch (ticket_counters)


def triton_taylor_linear_attn_step(
    q, k, v, kv_state, k_state, feature_map="compact", scale=None, eps=1e-6, block_f=None, num_warps=None,
    cache_hints=False, split=None,
):
    """Same contract as taylor_linear_attn_step: q, k [B, H, d], v [B, H, dv]; kv_state
    [B, H, F, dv] and k_state [B, H, F] fp32 contiguous, updated in place; returns y [B, H, dv].
    block_f (state rows per iteration) and num_warps are tuning knobs: on an H200, 2 warps and 64 rows
    reach 85-94% of the copy bandwidth from batch 256 up (dv 64 and 112), against 66-80% with 4 warps
    (benchmarks/results/taylor-decode-sweep-h200-2026-11-29.json); below ~1024 programs 4 warps are
    faster (batch 1: 0.017 ms against 0.037 ms with 2). split: each head's state rows over several
    programs (default: when there are at most SPLIT_MAX_HEADS heads in all, i.e. small batches)."""
    B, H, D = q.shape
    DV = v.shape[-1]
    F = kv_state.shape[-2]
    scale = D**-0.5 if scale is None else scale
    if not (kv_state.is_contiguous() and k_state.is_contiguous()):
        raise ValueError("the Triton decode step updates the state in place: it must be contiguous")
    if kv_state.dtype != torch.float32 or k_state.dtype != torch.float32:
        raise ValueError("the decode state must be fp32")
    fa, fb, fc = feature_tables(D, feature_map, float(scale), q.device)
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    o = torch.empty_like(v)
    BV = triton.next_power_of_2(DV)
    num_warps = num_warps or (2 if B * H >= 1024 else 4)
    if split if split is not None else B * H <= SPLIT_MAX_HEADS:
        BF = block_f or SPLIT_ROWS
        NC = triton.cdiv(F, BF)
        part = torch.empty(B * H, NC, BV + 1, dtype=torch.float32, device=q.device)
        count = ticket_counters(q.device, B * H)
        launch = pdl_options(q.device, B * H * NC)  # the next kernel loads its weights during this one
        _taylor_step_split_kernel[(B * H, NC)](
            q, k, v, kv_state, k_state, o, part, count, fa, fb, fc, eps, D=D, DV=DV, F=F, BF=BF, BV=BV, NC=NC,
            NCP=triton.next_power_of_2(NC), PDL=bool(launch), num_warps=num_warps, **launch,
        )
        return o
    # 64 rows for value blocks up to 128 (dv = 112 in the 1.3b preset: 91% of copy at batch 8798 against
    # 76% with 32 rows; results/taylor-decode-sweep-dv112-h200-2026-11-29.json)
    BF = block_f or max(1, min(64, 8192 // BV))
    launch = pdl_options(q.device, B * H)  # a small grid: the next kernel loads its weights during this one
    _taylor_step_kernel[(B * H,)](
        q, k, v, kv_state, k_state, o, fa, fb, fc, eps, D=D, DV=DV, F=F, BF=BF, BV=BV, EVICT=cache_hints,
        PDL=bool(launch), num_warps=num_warps, **launch,
    )
    return o
