"""Fused decode step: one token per (sequence, head) against the public fp32 state, updated in place.

    S += phi(k) v^T,  z += phi(k),  y = phi(q) S / (phi(q) . z + eps)
in one pass over S: each state row is read once, updated, written back and folded into the output.
The step is bound by the state's bytes (2 * F * dv * 4 per head, read and written).

With a pending buffer (based/ops/taylor/pending.py) the rows are only read, and written once every
fold_every tokens by the token that fills the buffer: about half the bytes.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ...launch import pdl_options, ticket_counters, wait_for_inputs
from ..pending import Pending, check_pending
from .layout import feature_tables

# Up to this many (sequence, head) pairs the step splits each head's state rows into chunks of SPLIT_ROWS
# over programs of their own: batch 1 of the 1.3b preset is 16 heads, 16 programs on 132 SMs otherwise.
SPLIT_MAX_HEADS = 64
SPLIT_ROWS = 16
# Up to SPLIT_MAX_HEADS heads, states of at most this many values (rows in two power-of-two tiles x the padded
# value width) are held whole by one program per head (_taylor_step_resident_kernel): 153 rows (128 + 32) x 128
# in the 1.3b preset.
RESIDENT_MAX_VALUES = 160 * 128
RESIDENT_WARPS = 4  # what every measurement of it used (docs/generation.md); more warps are untried
# State rows per iteration of the fold pass (one step in fold_every): fewer than the read pass's, whose
# registers it would otherwise set (the kernel's count is its costliest part's).
FOLD_ROWS = 8


@triton.jit
def _feature_rows(fa, fb, fc, o_f, m_f):
    """The feature tables' rows o_f: phi_f(x) = c_f x[a_f] x[b_f], an index of -1 standing for the constant 1."""
    return (tl.load(fa + o_f, mask=m_f, other=-1), tl.load(fb + o_f, mask=m_f, other=-1),
            tl.load(fc + o_f, mask=m_f, other=0.0))


@triton.jit
def _phi(p_x, b_a, b_b, b_c):
    """phi_f(x) [BF] for the features of table rows b_a, b_b, b_c."""
    return b_c * tl.load(p_x + b_a, mask=b_a >= 0, other=1.0).to(tl.float32) \
        * tl.load(p_x + b_b, mask=b_b >= 0, other=1.0).to(tl.float32)


@triton.jit
def _state_rows(p_q, p_k, b_v, p_kv, p_ks, fa, fb, fc, o_f, o_v, m_v, F,
                DV: tl.constexpr, UPDATE: tl.constexpr, EVICT: tl.constexpr):
    """State rows o_f of one head: their part of the output, phi_f(q) S[o_f] [BV] and phi_f(q) . z[o_f].
    UPDATE (no pending buffer): the rows take this token first, S[o_f] += phi_f(k) v^T, z[o_f] += phi_f(k),
    in place. Else they are only read (the caller adds the pending tokens' share)."""
    m_f = o_f < F
    b_a, b_b, b_c = _feature_rows(fa, fb, fc, o_f, m_f)
    b_fq = _phi(p_q, b_a, b_b, b_c)
    p_s = p_kv + o_f[:, None] * DV + o_v[None, :]
    m_s = m_f[:, None] & m_v[None, :]
    if EVICT:  # the state is streamed: nothing of it is read again this step
        b_s = tl.load(p_s, mask=m_s, other=0.0, eviction_policy="evict_first")
    else:
        b_s = tl.load(p_s, mask=m_s, other=0.0)  # [BF, BV]
    b_z = tl.load(p_ks + o_f, mask=m_f, other=0.0)
    if UPDATE:
        b_fk = _phi(p_k, b_a, b_b, b_c)
        b_s += b_fk[:, None] * b_v[None, :]
        b_z += b_fk
        _store_rows(p_s, m_s, b_s, p_ks + o_f, m_f, b_z, EVICT)
    return tl.sum(b_fq[:, None] * b_s, 0), tl.sum(b_fq * b_z, 0)


@triton.jit
def _fold_rows(p_k, b_v, p_kv, p_ks, p_kp, p_vp, fa, fb, fc, o_f, o_v, m_v, F,
               D: tl.constexpr, DV: tl.constexpr, P: tl.constexpr, EVICT: tl.constexpr):
    """S[o_f] += phi_f(k) v^T + sum_j phi_f(k_j) v_j^T over the P pending tokens, z[o_f] likewise: the token
    that fills the buffer. A pass of its own after the output's (the rows come back from L2), so that the
    read-only pass keeps few registers (folded into it, 232-255 a thread against 96-183). The loop over the
    pending tokens is unrolled, so their loads are in flight together: at 8 rows a block that costs no
    registers over the read pass's at its default 64 rows x 2 warps (16 rows spill)."""
    m_f = o_f < F
    b_a, b_b, b_c = _feature_rows(fa, fb, fc, o_f, m_f)
    b_s = tl.load(p_kv + o_f[:, None] * DV + o_v[None, :], mask=m_f[:, None] & m_v[None, :], other=0.0)
    b_z = tl.load(p_ks + o_f, mask=m_f, other=0.0)
    _fold_into(b_s, b_z, b_a, b_b, b_c, p_k, b_v, p_kv, p_ks, p_kp, p_vp, o_f, o_v, m_v, F, D, DV, P, EVICT)


@triton.jit
def _fold_into(b_s, b_z, b_a, b_b, b_c, p_k, b_v, p_kv, p_ks, p_kp, p_vp, o_f, o_v, m_v, F,
               D: tl.constexpr, DV: tl.constexpr, P: tl.constexpr, EVICT: tl.constexpr):
    """_fold_rows on rows already loaded (b_s, b_z and their feature tables): add and store them."""
    m_f = o_f < F
    b_fk = _phi(p_k, b_a, b_b, b_c)
    b_s += b_fk[:, None] * b_v[None, :]
    b_z += b_fk
    for j in tl.static_range(P):
        b_fj = _phi(p_kp + j * D, b_a, b_b, b_c)
        b_vj = tl.load(p_vp + j * DV + o_v, mask=m_v, other=0.0).to(tl.float32)
        b_s += b_fj[:, None] * b_vj[None, :]
        b_z += b_fj
    _store_rows(p_kv + o_f[:, None] * DV + o_v[None, :], m_f[:, None] & m_v[None, :], b_s, p_ks + o_f, m_f, b_z, EVICT)


@triton.jit
def _store_rows(p_s, m_s, b_s, p_z, m_f, b_z, EVICT: tl.constexpr):
    if EVICT:
        tl.store(p_s, b_s, mask=m_s, cache_modifier=".cs")
    else:
        tl.store(p_s, b_s, mask=m_s)
    tl.store(p_z, b_z, mask=m_f)


@triton.jit
def _pending_tiles(p_kp, p_vp, n, o_v, m_v, D: tl.constexpr, DV: tl.constexpr, BD: tl.constexpr, BP: tl.constexpr):
    """The n pending tokens' keys [BP, BD] and values [BP, BV] (fp32, zeros past n) and their mask [BP]."""
    o_d = tl.arange(0, BD)
    m_d = o_d < D
    o_p = tl.arange(0, BP)
    m_p = o_p < n
    b_kp = tl.load(p_kp + o_p[:, None] * D + o_d[None, :], mask=m_p[:, None] & m_d[None, :], other=0.0).to(tl.float32)
    b_vp = tl.load(p_vp + o_p[:, None] * DV + o_v[None, :], mask=m_p[:, None] & m_v[None, :], other=0.0).to(tl.float32)
    return b_kp, b_vp, m_p


@triton.jit
def _pending_share_of(p_q, p_k, b_v, b_kp, b_vp, m_p, scale, D: tl.constexpr, BD: tl.constexpr):
    """_pending_share from the pending tiles (_pending_tiles)."""
    o_d = tl.arange(0, BD)
    m_d = o_d < D
    b_q = tl.load(p_q + o_d, mask=m_d, other=0.0).to(tl.float32)
    b_k = tl.load(p_k + o_d, mask=m_d, other=0.0).to(tl.float32)
    b_sp = scale * tl.sum(b_q[None, :] * b_kp, 1)  # [BP]
    b_wp = tl.where(m_p, 1.0 + b_sp + 0.5 * b_sp * b_sp, 0.0)
    b_s = scale * tl.sum(b_q * b_k, 0)
    b_w = 1.0 + b_s + 0.5 * b_s * b_s
    return tl.sum(b_wp[:, None] * b_vp, 0) + b_w * b_v, tl.sum(b_wp, 0) + b_w


@triton.jit
def _pending_share(p_q, p_k, b_v, p_kp, p_vp, n, scale, o_v, m_v,
                   D: tl.constexpr, DV: tl.constexpr, P: tl.constexpr, BD: tl.constexpr, BP: tl.constexpr):
    """The n pending tokens' and this token's part of the output: (sum_j w_j v_j + w v [BV], sum_j w_j + w),
    w_j = phi(q) . phi(k_j) = 1 + s_j + s_j^2 / 2 with s_j = scale q . k_j (no feature map needed)."""
    b_kp, b_vp, m_p = _pending_tiles(p_kp, p_vp, n, o_v, m_v, D, DV, BD, BP)
    return _pending_share_of(p_q, p_k, b_v, b_kp, b_vp, m_p, scale, D, BD)


@triton.jit
def _pending_push(p_k, b_v, p_kp, p_vp, n, o_v, m_v, limit,
                  D: tl.constexpr, DV: tl.constexpr, BD: tl.constexpr):
    """This token into pending slot n if n < limit: limit is P (the buffer's slots; n == P means the token
    filled the buffer and the state rows took it), or 0 in the programs that leave the push to another."""
    o_d = tl.arange(0, BD)
    # Blocks, not scalars: the interpreter rejects a scalar & block mask.
    b_k = tl.load(p_k + o_d, mask=o_d < D, other=0.0)
    tl.store(p_kp + n * D + o_d, b_k.to(p_kp.dtype.element_ty), mask=(o_d < D) & ((o_d * 0 + n) < limit))
    tl.store(p_vp + n * DV + o_v, b_v.to(p_vp.dtype.element_ty), mask=m_v & ((o_v * 0 + n) < limit))


@triton.jit
def _taylor_step_kernel(
    q, k, v, kv, ks, o, kp, vp, np_, fa, fb, fc, scale, eps,
    D: tl.constexpr, DV: tl.constexpr, F: tl.constexpr, BF: tl.constexpr, BV: tl.constexpr,
    P: tl.constexpr, BD: tl.constexpr, BP: tl.constexpr, FOLD_ROWS: tl.constexpr, EVICT: tl.constexpr,
    PDL: tl.constexpr,
):
    wait_for_inputs(PDL)
    i_bh = tl.program_id(0).to(tl.int64)
    o_v = tl.arange(0, BV)
    m_v = o_v < DV
    b_v = tl.load(v + i_bh * DV + o_v, mask=m_v, other=0.0).to(tl.float32)  # [BV]
    p_kp, p_vp = kp + i_bh * P * D, vp + i_bh * P * DV
    if P > 0:
        n = tl.load(np_ + i_bh)
        b_num, b_den_p = _pending_share(q + i_bh * D, k + i_bh * D, b_v, p_kp, p_vp, n, scale, o_v, m_v,
                                        D, DV, P, BD, BP)
    else:
        n = 0
        b_num = tl.zeros([BV], dtype=tl.float32)
        b_den_p = 0.0
    b_den = b_den_p
    for f0 in range(0, F, BF):
        b_num_f, b_den_f = _state_rows(q + i_bh * D, k + i_bh * D, b_v, kv + i_bh * F * DV, ks + i_bh * F,
                                       fa, fb, fc, f0 + tl.arange(0, BF), o_v, m_v, F, DV, P == 0, EVICT)
        b_num += b_num_f
        b_den += b_den_f
    b_o = b_num / (b_den + eps)
    tl.store(o + i_bh * DV + o_v, b_o.to(o.dtype.element_ty), mask=m_v)
    if P > 0:
        fold = n == P
        if fold:
            for f0 in range(0, F, FOLD_ROWS):
                _fold_rows(k + i_bh * D, b_v, kv + i_bh * F * DV, ks + i_bh * F, p_kp, p_vp, fa, fb, fc,
                           f0 + tl.arange(0, FOLD_ROWS), o_v, m_v, F, D, DV, P, EVICT)
        _pending_push(k + i_bh * D, b_v, p_kp, p_vp, n, o_v, m_v, P, D, DV, BD)
        tl.store(np_ + i_bh, tl.where(fold, 0, n + 1))


@triton.jit
def _resident_rows(p_kv, p_ks, fa, fb, fc, o_f, o_v, m_v, F, DV: tl.constexpr):
    """State rows o_f of one head, their z entries and feature tables (loaded, for _resident_part)."""
    m_f = o_f < F
    b_a, b_b, b_c = _feature_rows(fa, fb, fc, o_f, m_f)
    b_s = tl.load(p_kv + o_f[:, None] * DV + o_v[None, :], mask=m_f[:, None] & m_v[None, :], other=0.0)
    return b_s, tl.load(p_ks + o_f, mask=m_f, other=0.0), b_a, b_b, b_c


@triton.jit
def _resident_part(p_q, p_k, b_v, b_s, b_z, b_a, b_b, b_c, p_kv, p_ks, o_f, o_v, m_v, F, DV: tl.constexpr,
                   UPDATE: tl.constexpr):
    """_state_rows of rows already loaded (_resident_rows)."""
    b_fq = _phi(p_q, b_a, b_b, b_c)
    if UPDATE:
        b_fk = _phi(p_k, b_a, b_b, b_c)
        b_s += b_fk[:, None] * b_v[None, :]
        b_z += b_fk
        m_f = o_f < F
        _store_rows(p_kv + o_f[:, None] * DV + o_v[None, :], m_f[:, None] & m_v[None, :], b_s, p_ks + o_f, m_f, b_z,
                    False)
    return tl.sum(b_fq[:, None] * b_s, 0), tl.sum(b_fq * b_z, 0)


@triton.jit
def _taylor_step_resident_kernel(
    q, k, v, kv, ks, o, kp, vp, np_, fa, fb, fc, scale, eps,
    D: tl.constexpr, DV: tl.constexpr, F: tl.constexpr, BF1: tl.constexpr, BF2: tl.constexpr, BV: tl.constexpr,
    P: tl.constexpr, BD: tl.constexpr, BP: tl.constexpr, PDL: tl.constexpr,
):
    """_taylor_step_kernel for small batches, each head's whole state (rows in two tiles of BF1 and BF2) held by
    one program and read before the wait, with the pending buffer: only this layer's step a token ago wrote
    them, so under PDL the read overlaps the projection before. After the wait: the new token (from L2), the
    arithmetic and the writes; no split over programs, so no partial results to merge. The folding step folds
    the rows it holds (the walk over the rows in small blocks that the other kernels take would be ~20
    dependent round trips in one program)."""
    i_bh = tl.program_id(0).to(tl.int64)
    o_v = tl.arange(0, BV)
    m_v = o_v < DV
    p_kv, p_ks = kv + i_bh * F * DV, ks + i_bh * F
    p_kp, p_vp = kp + i_bh * P * D, vp + i_bh * P * DV
    o_f1 = tl.arange(0, BF1)
    o_f2 = BF1 + tl.arange(0, BF2)
    s1, z1, a1, b1, c1 = _resident_rows(p_kv, p_ks, fa, fb, fc, o_f1, o_v, m_v, F, DV)
    s2, z2, a2, b2, c2 = _resident_rows(p_kv, p_ks, fa, fb, fc, o_f2, o_v, m_v, F, DV)
    if P > 0:
        n = tl.load(np_ + i_bh)
        b_kp, b_vp, m_p = _pending_tiles(p_kp, p_vp, n, o_v, m_v, D, DV, BD, BP)
    wait_for_inputs(PDL)
    p_q, p_k = q + i_bh * D, k + i_bh * D
    b_v = tl.load(v + i_bh * DV + o_v, mask=m_v, other=0.0).to(tl.float32)
    num1, den1 = _resident_part(p_q, p_k, b_v, s1, z1, a1, b1, c1, p_kv, p_ks, o_f1, o_v, m_v, F, DV, P == 0)
    num2, den2 = _resident_part(p_q, p_k, b_v, s2, z2, a2, b2, c2, p_kv, p_ks, o_f2, o_v, m_v, F, DV, P == 0)
    b_num = num1 + num2
    b_den = den1 + den2
    if P > 0:
        num_p, den_p = _pending_share_of(p_q, p_k, b_v, b_kp, b_vp, m_p, scale, D, BD)
        b_num += num_p
        b_den += den_p
    tl.store(o + i_bh * DV + o_v, (b_num / (b_den + eps)).to(o.dtype.element_ty), mask=m_v)
    if P > 0:
        fold = n == P
        if fold:  # from the rows in registers (the state before this token): no second read of them
            _fold_into(s1, z1, a1, b1, c1, p_k, b_v, p_kv, p_ks, p_kp, p_vp, o_f1, o_v, m_v, F, D, DV, P, False)
            _fold_into(s2, z2, a2, b2, c2, p_k, b_v, p_kv, p_ks, p_kp, p_vp, o_f2, o_v, m_v, F, D, DV, P, False)
        _pending_push(p_k, b_v, p_kp, p_vp, n, o_v, m_v, P, D, DV, BD)
        tl.store(np_ + i_bh, tl.where(fold, 0, n + 1))


@triton.jit
def _taylor_step_split_kernel(
    q, k, v, kv, ks, o, kp, vp, np_, part, count, fa, fb, fc, scale, eps,
    D: tl.constexpr, DV: tl.constexpr, F: tl.constexpr, BF: tl.constexpr, BV: tl.constexpr, NC: tl.constexpr,
    NCP: tl.constexpr, P: tl.constexpr, BD: tl.constexpr, BP: tl.constexpr, PDL: tl.constexpr,
):
    """_taylor_step_kernel with each head's state rows split into NC chunks of BF, one program each (a
    small batch's 16 heads would leave the GPU idle): each writes its part of the numerator and denominator,
    and the head's last program to finish (an atomic ticket) sums them into the output. The first chunk's
    program also adds the pending tokens' share and pushes this token; the last one advances the count,
    which every program has read by then."""
    wait_for_inputs(PDL)
    i_bh = tl.program_id(0).to(tl.int64)
    i_c = tl.program_id(1)
    o_v = tl.arange(0, BV)
    m_v = o_v < DV
    b_v = tl.load(v + i_bh * DV + o_v, mask=m_v, other=0.0).to(tl.float32)
    p_kp, p_vp = kp + i_bh * P * D, vp + i_bh * P * DV
    n = tl.load(np_ + i_bh) if P > 0 else 0
    fold = n == P
    o_f = i_c * BF + tl.arange(0, BF)
    b_num, b_den = _state_rows(q + i_bh * D, k + i_bh * D, b_v, kv + i_bh * F * DV, ks + i_bh * F, fa, fb, fc,
                               o_f, o_v, m_v, F, DV, P == 0, False)
    if P > 0:
        if fold:
            _fold_rows(k + i_bh * D, b_v, kv + i_bh * F * DV, ks + i_bh * F, p_kp, p_vp, fa, fb, fc, o_f, o_v, m_v,
                       F, D, DV, P, False)
        # Every chunk computes the share (a few hundred bytes), the first one keeps it: no branch to merge.
        num_p, den_p = _pending_share(q + i_bh * D, k + i_bh * D, b_v, p_kp, p_vp, n, scale, o_v, m_v, D, DV, P, BD, BP)
        first = (i_c == 0).to(tl.float32)
        b_num += first * num_p
        b_den += first * den_p
        _pending_push(k + i_bh * D, b_v, p_kp, p_vp, n, o_v, m_v, tl.where(i_c == 0, P, 0), D, DV, BD)
    # part [B*H, NC, BV + 1]: the chunk's numerator, then its denominator in the last column.
    p_part = part + (i_bh * NC + i_c) * (BV + 1)
    tl.store(p_part + o_v, b_num)
    tl.store(p_part + BV, b_den)
    # acq_rel: the parts stored above are visible to whichever program takes the last ticket.
    if tl.atomic_add(count + i_bh, 1, sem="acq_rel") == NC - 1:
        o_c = tl.arange(0, NCP)
        p_all = part + (i_bh * NC + o_c) * (BV + 1)  # [NCP]
        b_num = tl.sum(tl.load(p_all[:, None] + o_v[None, :], mask=(o_c < NC)[:, None], other=0.0), 0)
        b_den = tl.sum(tl.load(p_all + BV, mask=o_c < NC, other=0.0), 0)
        tl.store(o + i_bh * DV + o_v, (b_num / (b_den + eps)).to(o.dtype.element_ty), mask=m_v)
        tl.store(count + i_bh, 0)  # ready for the next launch (ticket_counters)
        if P > 0:
            tl.store(np_ + i_bh, tl.where(fold, 0, n + 1))


def _row_tiles(F: int) -> tuple[int, int]:
    """F state rows as two power-of-two tiles (the second may be partly masked): 153 -> (128, 32)."""
    first = 1 << (F.bit_length() - 1)
    return first, triton.next_power_of_2(max(1, F - first))


def triton_taylor_linear_attn_step(
    q, k, v, kv_state, k_state, feature_map="compact", scale=None, eps=1e-6, block_f=None, num_warps=None,
    cache_hints=False, split=None, pending: Pending | None = None, fold_rows=FOLD_ROWS, resident=None,
):
    """Same contract as taylor_linear_attn_step: q, k [B, H, d], v [B, H, dv]; kv_state
    [B, H, F, dv] and k_state [B, H, F] fp32 contiguous, updated in place; returns y [B, H, dv].
    block_f (state rows per iteration) and num_warps are tuning knobs: on an H200, 2 warps and 64 rows
    reach 85-94% of the copy bandwidth from batch 256 up (dv 64 and 112), against 66-80% with 4 warps
    (benchmarks/results/taylor-decode-sweep-h200-2026-11-29.json); below ~1024 programs 4 warps are
    faster (batch 1: 0.017 ms against 0.037 ms with 2). split: each head's state rows over several
    programs (default: when there are at most SPLIT_MAX_HEADS heads in all, i.e. small batches).
    pending: a contiguous pending buffer (based/ops/taylor/pending.py), updated in place; fold_rows: state
    rows per iteration of the pass that folds it (one program per head). resident: each head's whole state in
    one program, read before the PDL wait (default: at most SPLIT_MAX_HEADS heads and a state of at most
    RESIDENT_MAX_VALUES values, unless split or cache_hints is given)."""
    B, H, D = q.shape
    DV = v.shape[-1]
    F = kv_state.shape[-2]
    scale = D**-0.5 if scale is None else scale
    if not (kv_state.is_contiguous() and k_state.is_contiguous()):
        raise ValueError("the Triton decode step updates the state in place: it must be contiguous")
    if kv_state.dtype != torch.float32 or k_state.dtype != torch.float32:
        raise ValueError("the decode state must be fp32")
    if pending is None:
        P, kp, vp, n = 0, kv_state, kv_state, k_state  # unused pointers: the kernels see P == 0
    else:
        check_pending(pending, q, v)
        if not all(t.is_contiguous() for t in pending):
            raise ValueError("the Triton decode step updates the pending buffer in place: it must be contiguous")
        kp, vp, n = pending
        P = kp.shape[2]
    fa, fb, fc = feature_tables(D, feature_map, float(scale), q.device)
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    o = torch.empty_like(v)
    BV = triton.next_power_of_2(DV)
    shapes = dict(D=D, DV=DV, F=F, BV=BV, P=P, BD=triton.next_power_of_2(D), BP=triton.next_power_of_2(max(P, 1)))
    small = B * H <= SPLIT_MAX_HEADS
    BF1, BF2 = _row_tiles(F)
    if resident if resident is not None else (
            small and split is None and not cache_hints and (BF1 + BF2) * BV <= RESIDENT_MAX_VALUES):
        launch = pdl_options(q.device, B * H)  # the state's read overlaps the projection before
        _taylor_step_resident_kernel[(B * H,)](
            q, k, v, kv_state, k_state, o, kp, vp, n, fa, fb, fc, float(scale), eps, BF1=BF1, BF2=BF2,
            PDL=bool(launch), num_warps=num_warps or RESIDENT_WARPS, **shapes, **launch,
        )
        return o
    num_warps = num_warps or (2 if B * H >= 1024 else 4)
    if split if split is not None else small:
        BF = block_f or SPLIT_ROWS
        NC = triton.cdiv(F, BF)
        part = torch.empty(B * H, NC, BV + 1, dtype=torch.float32, device=q.device)
        count = ticket_counters(q.device, B * H)
        launch = pdl_options(q.device, B * H * NC)  # the next kernel loads its weights during this one
        _taylor_step_split_kernel[(B * H, NC)](
            q, k, v, kv_state, k_state, o, kp, vp, n, part, count, fa, fb, fc, float(scale), eps, BF=BF, NC=NC,
            NCP=triton.next_power_of_2(NC), PDL=bool(launch), num_warps=num_warps, **shapes, **launch,
        )
        return o
    # 64 rows for value blocks up to 128 (dv = 112 in the 1.3b preset: 91% of copy at batch 8798 against
    # 76% with 32 rows; results/taylor-decode-sweep-dv112-h200-2026-11-29.json)
    BF = block_f or max(1, min(64, 8192 // BV))
    launch = pdl_options(q.device, B * H)  # a small grid: the next kernel loads its weights during this one
    _taylor_step_kernel[(B * H,)](
        q, k, v, kv_state, k_state, o, kp, vp, n, fa, fb, fc, float(scale), eps, BF=BF, FOLD_ROWS=fold_rows,
        EVICT=cache_hints,
        PDL=bool(launch), num_warps=num_warps, **shapes, **launch,
    )
    return o
