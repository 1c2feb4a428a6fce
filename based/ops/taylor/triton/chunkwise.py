"""Chunk-parallel Taylor linear attention in Triton: the state at every chunk boundary, then every chunk
at once (the layout of fla's `chunk` kernels, where triton/chunk.py is the `fused_chunk` one).

triton/chunk.py walks each sequence with the whole 273-row state in registers: one program per
(sequence, head, value block), 255 registers and two programs per SM, latency-bound on its chain of
small products (NOTES-kernels.md). Here the walks keep only a [BF, BV] tile of state rows per program
and do one product per chunk, and everything else runs with a program per chunk:

    forward   h:  per (feature tile, value block, sequence): H_c = state before chunk c, stored (bf16
                  for 16-bit inputs; fp32 accumulation in registers), z_c likewise in fp32
              o:  per (chunk, head): o = (A V + phi(Q) H_c) / (rowsum A + phi(Q) z_c + eps)
    backward  h:  recomputed as in the forward (not saved: it is NC x FP x dv per head)
              dh: per (feature tile, sequence), walking back: dH_c = gradient reaching the keys of chunk
                  c = dH_T + sum over later chunks of phi(Q)^T g, dz_c the same with g' (computed here
                  from dO and o, and stored for the next launch)
              dq, dk/dv: per (chunk, head), the intra-chunk terms and, per feature tile, dq from H_c, z_c
                  and dk, dv from dH_c, dz_c (two launches, or one with CW_BWD_SPLIT off).

Feature r of the internal layout (layout.py: r = 0 constant, 1 + i linear, 1 + BK + i BK + j
quadratic) is phi_r(x) = x[a_r] x[b_r] (index -1 standing for 1), built on chip from the loaded
[BT, d] tile by two products with one-hot selection matrices (exact on tensor cores) and an
elementwise product: no [BT, d, d] broadcast or reshape, no per-element gathers. The query side carries
the kernel's coefficients (1, scale, scale^2 / 2); the key side stays raw, so H_c are the raw moments
of layout.py and the initial and final states need no conversion beyond to_internal / from_internal.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .chunk import _dot_precision, _seq_bounds, _state_dtype
from .layout import block_k, internal_dim

# Launch parameters (module attributes so benchmarks/taylor_cw_sweep.py can try variants). Defaults: the
# fastest of that sweep on an H200 (d=16, dv=64, bf16, T=2048..8192; NOTES-kernels.md, v4).
CW_CHUNK = int(os.environ.get("BASED_TRITON_CW_CHUNK", 64))
CW_BF = int(os.environ.get("BASED_TRITON_CW_BF", 64))  # feature rows per tile, forward
CW_BWD_BF = int(os.environ.get("BASED_TRITON_CW_BWD_BF", 64))  # the same for the backward's kernels
CW_WARPS = int(os.environ.get("BASED_TRITON_CW_WARPS", 4))
CW_H_WARPS = int(os.environ.get("BASED_TRITON_CW_H_WARPS", 4))
CW_BWD_WARPS = int(os.environ.get("BASED_TRITON_CW_BWD_WARPS", 4))
CW_STAGES = int(os.environ.get("BASED_TRITON_CW_STAGES", 3))
CW_H_BV = int(os.environ.get("BASED_TRITON_CW_H_BV", 64))  # value block of the forward state walk
CW_BWD_SPLIT = bool(int(os.environ.get("BASED_TRITON_CW_BWD_SPLIT", 1)))  # dq and dk/dv in two launches
# One program per chunk keeps the whole value dim: dq and dk then need no partial sums over value
# blocks. Above this the fused form (triton/chunk.py) is used.
CW_MAX_DV = 128
# form="auto" takes the fused form where the per-chunk states would pass this (long prefills: 1M tokens of
# 16 heads at dv=64 is ~11 GB of them); the fused form needs no memory beyond its inputs.
CW_MAX_STATE_BYTES = int(os.environ.get("BASED_TRITON_CW_MAX_STATE_BYTES", 4 << 30))


@triton.jit
def _feat_index(r, BK: tl.constexpr, FI: tl.constexpr, scale):
    """Internal feature rows r -> (a, b, coef): phi_r(x) = coef * x[a] * x[b], index -1 = 1; coef is
    the kernel's weight (0 on padding rows r >= FI)."""
    is_lin = (r >= 1) & (r < 1 + BK)
    is_quad = (r >= 1 + BK) & (r < FI)
    rq = tl.where(is_quad, r - 1 - BK, 0)
    a = tl.where(is_lin, r - 1, tl.where(is_quad, rq // BK, -1))
    b = tl.where(is_quad, rq % BK, -1)
    coef = tl.where(r == 0, 1.0, tl.where(is_lin, scale, tl.where(is_quad, 0.5 * scale * scale, 0.0)))
    return a, b, coef


@triton.jit
def _pick(b_x, a, o_k, PREC: tl.constexpr):
    """x[t, a_f] as fp32 [BT, BF] from the loaded tile b_x [BT, BK], 1 where a_f < 0 (also on padded
    tokens), 0 on padded dims: a product with the one-hot [BK, BF] selection matrix, exact on tensor
    cores. (Gathering x[t, a_f] with per-element loads instead was 3.3x slower: NOTES-kernels.md.)"""
    val = tl.dot(b_x, (o_k[:, None] == a[None, :]).to(b_x.dtype), input_precision=PREC)
    return val + (a < 0).to(tl.float32)[None, :]


@triton.jit
def _pick_t(b_x, a, o_k, PREC: tl.constexpr):
    """_pick transposed, [BF, BT], built in that layout."""
    val = tl.dot((a[:, None] == o_k[None, :]).to(b_x.dtype), tl.trans(b_x), input_precision=PREC)
    return val + (a < 0).to(tl.float32)[:, None]


@triton.jit
def _chunk_start(cu_seqlens, chunk_offsets, i_n, T, BT: tl.constexpr, IS_VARLEN: tl.constexpr):
    """(bos, L, c0): first token, length and first global chunk index of sequence i_n."""
    bos, L = _seq_bounds(cu_seqlens, i_n, T, IS_VARLEN)
    if IS_VARLEN:
        c0 = tl.load(chunk_offsets + i_n).to(tl.int64)
    else:
        c0 = i_n.to(tl.int64) * tl.cdiv(T, BT)
    return bos, L, c0


@triton.jit
def _chunk_of(cu_seqlens, chunk_indices, i_c, T, BT: tl.constexpr, IS_VARLEN: tl.constexpr):
    """Global chunk i_c -> (bos, L, i_t): its sequence's first token and length, and its index there."""
    if IS_VARLEN:
        i_n = tl.load(chunk_indices + 2 * i_c)
        i_t = tl.load(chunk_indices + 2 * i_c + 1)
    else:
        NT = tl.cdiv(T, BT)
        i_n = i_c // NT
        i_t = i_c % NT
    bos, L = _seq_bounds(cu_seqlens, i_n, T, IS_VARLEN)
    return bos, L, i_t


@triton.jit
def _tile(x, bos, L, i_h, i_t, H: tl.constexpr, W: tl.constexpr, BT: tl.constexpr, BW: tl.constexpr, col0):
    """(pointers, mask) of tokens [i_t BT, +BT) x columns [col0, +BW) of head i_h in a packed [TT, H, W]
    tensor whose sequence starts at token bos and has L tokens. A scalar int64 base and int32 offsets."""
    o_t = i_t * BT + tl.arange(0, BT)
    o_w = col0 + tl.arange(0, BW)
    p = x + (bos * H + i_h) * W + o_t[:, None] * (H * W) + o_w[None, :]
    if BW == W:
        m = (o_t < L)[:, None]
    else:
        m = (o_t < L)[:, None] & (o_w < W)[None, :]
    return p, m


@triton.jit
def _load_tile(x, bos, L, i_h, i_t, H: tl.constexpr, W: tl.constexpr, BT: tl.constexpr, BW: tl.constexpr, col0):
    p, m = _tile(x, bos, L, i_h, i_t, H, W, BT, BW, col0)
    return tl.load(p, mask=m, other=0.0)


@triton.jit
def _store_tile(x, val, bos, L, i_h, i_t, H: tl.constexpr, W: tl.constexpr, BT: tl.constexpr, BW: tl.constexpr):
    p, m = _tile(x, bos, L, i_h, i_t, H, W, BT, BW, 0)
    tl.store(p, val.to(x.dtype.element_ty), mask=m)


@triton.jit
def _chunk_qkv(q, k, v, cu_seqlens, chunk_indices, i_c, i_h, T, H: tl.constexpr, D: tl.constexpr,
               DV: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, IS_VARLEN: tl.constexpr):
    """The q, k, v tiles of global chunk i_c, head i_h, with its sequence's bos, L and chunk index."""
    bos, L, i_t = _chunk_of(cu_seqlens, chunk_indices, i_c, T, BT, IS_VARLEN)
    b_q = _load_tile(q, bos, L, i_h, i_t, H, D, BT, BK, 0)
    b_k = _load_tile(k, bos, L, i_h, i_t, H, D, BT, BK, 0)
    b_v = _load_tile(v, bos, L, i_h, i_t, H, DV, BT, BV, 0)
    return bos, L, i_t, b_q, b_k, b_v


@triton.jit
def _state_ptr(x, p_c, r, o_v, FP: tl.constexpr, DV: tl.constexpr, BV: tl.constexpr):
    """(pointers, mask) of feature rows r x values o_v of snapshot p_c of an [NC, H, FP, DV] tensor."""
    p = x + p_c * FP * DV + r[:, None] * DV + o_v[None, :]
    if BV == DV:
        m = (r >= 0)[:, None]
    else:
        m = (o_v < DV)[None, :] & (r >= 0)[:, None]
    return p, m


@triton.jit
def _cw_fwd_h_kernel(
    k, v, hs0, zs0, hsT, zsT, h, z, cu_seqlens, chunk_offsets, T,
    H: tl.constexpr, D: tl.constexpr, DV: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr,
    BF: tl.constexpr, BV: tl.constexpr, FI: tl.constexpr, FP: tl.constexpr,
    USE_INITIAL: tl.constexpr, STORE_FINAL: tl.constexpr, IS_VARLEN: tl.constexpr,
    PREC: tl.constexpr, SDT: tl.constexpr,
):
    i_f, i_v, i_nh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_n, i_h = i_nh // H, i_nh % H
    bos, L, c0 = _chunk_start(cu_seqlens, chunk_offsets, i_n, T, BT, IS_VARLEN)
    o_t = tl.arange(0, BT)
    o_k = tl.arange(0, BK)
    r = i_f * BF + tl.arange(0, BF)
    o_v = i_v * BV + tl.arange(0, BV)
    m_r = r < FI
    m_rv = m_r[:, None] & (o_v < DV)[None, :]
    a, b, _ = _feat_index(r, BK, FI, 1.0)

    b_h = tl.zeros([BF, BV], dtype=tl.float32)
    b_z = tl.zeros([BF], dtype=tl.float32)
    if USE_INITIAL:
        b_h += tl.load(hs0 + (i_nh.to(tl.int64) * FI + r[:, None]) * DV + o_v[None, :], mask=m_rv, other=0.0)
        b_z += tl.load(zs0 + i_nh.to(tl.int64) * FI + r, mask=m_r, other=0.0)
    for i_t in range(0, tl.cdiv(L, BT)):
        p_c = (c0 + i_t) * H + i_h  # this chunk's snapshot: the state before its first token
        p_h, m_h = _state_ptr(h, p_c, r, o_v, FP, DV, BV)
        tl.store(p_h, b_h.to(SDT), mask=m_h)
        if i_v == 0:
            tl.store(z + p_c * FP + r, b_z)
        m_t = i_t * BT + o_t < L
        b_k = _load_tile(k, bos, L, i_h, i_t, H, D, BT, BK, 0)
        b_v = _load_tile(v, bos, L, i_h, i_t, H, DV, BT, BV, i_v * BV)
        # raw features phi_r(k) (no coefficients), [BF, BT]; padded tokens and rows give 0
        b_kt = _pick_t(b_k, a, o_k, PREC) * _pick_t(b_k, b, o_k, PREC)
        b_kt = tl.where(m_r[:, None] & m_t[None, :], b_kt, 0.0)
        b_h += tl.dot(b_kt.to(b_v.dtype), b_v, input_precision=PREC)
        b_z += tl.sum(b_kt, 1)
    if STORE_FINAL:
        tl.store(hsT + (i_nh.to(tl.int64) * FI + r[:, None]) * DV + o_v[None, :], b_h, mask=m_rv)
        if i_v == 0:
            tl.store(zsT + i_nh.to(tl.int64) * FI + r, b_z, mask=m_r)


@triton.jit
def _cw_fwd_o_kernel(
    q, k, v, o, den, h, z, cu_seqlens, chunk_indices, scale, eps, T,
    H: tl.constexpr, D: tl.constexpr, DV: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr,
    BF: tl.constexpr, BV: tl.constexpr, FI: tl.constexpr, FP: tl.constexpr, NF: tl.constexpr,
    IS_VARLEN: tl.constexpr, PREC: tl.constexpr, SDT: tl.constexpr,
):
    i_c, i_h = tl.program_id(0), tl.program_id(1)
    bos, L, i_t, b_q, b_k, b_v = _chunk_qkv(q, k, v, cu_seqlens, chunk_indices, i_c, i_h, T, H, D, DV, BT, BK, BV,
                                            IS_VARLEN)
    o_t = tl.arange(0, BT)
    o_k = tl.arange(0, BK)
    o_v = tl.arange(0, BV)
    m_t = i_t * BT + o_t < L

    # intra-chunk: A = tril(1 + s + s^2/2), s = scale Q K^T
    b_s = scale * tl.dot(b_q, tl.trans(b_k), input_precision=PREC)
    b_a = tl.where((o_t[:, None] >= o_t[None, :]) & m_t[None, :], 1.0 + b_s + 0.5 * b_s * b_s, 0.0)
    b_o = tl.dot(b_a.to(b_v.dtype), b_v, input_precision=PREC)
    b_d = tl.sum(b_a, 1)
    # inter-chunk: phi(Q) H_c and phi(Q) z_c, one feature tile at a time
    p_c = i_c.to(tl.int64) * H + i_h
    for i_f in range(NF):
        r = i_f * BF + tl.arange(0, BF)
        a, b, coef = _feat_index(r, BK, FI, scale)
        b_qf = (_pick(b_q, a, o_k, PREC) * _pick(b_q, b, o_k, PREC)
                * coef[None, :])
        p_h, m_h = _state_ptr(h, p_c, r, o_v, FP, DV, BV)
        b_o += tl.dot(b_qf.to(SDT), tl.load(p_h, mask=m_h, other=0.0), input_precision=PREC)
        b_d += tl.sum(b_qf * tl.load(z + p_c * FP + r)[None, :], 1)
    _store_tile(o, b_o / (b_d + eps)[:, None], bos, L, i_h, i_t, H, DV, BT, BV)
    tl.store(den + (bos + i_t * BT + o_t) * H + i_h, b_d, mask=m_t)


@triton.jit
def _cw_bwd_dh_kernel(
    q, o, do, den, dd, dhsT, dzsT, dhs0, dzs0, dh, dz, cu_seqlens, chunk_offsets, scale, eps, T,
    H: tl.constexpr, D: tl.constexpr, DV: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr,
    BF: tl.constexpr, BV: tl.constexpr, FI: tl.constexpr, FP: tl.constexpr,
    USE_FINAL_GRAD: tl.constexpr, STORE_INITIAL_GRAD: tl.constexpr, IS_VARLEN: tl.constexpr,
    PREC: tl.constexpr, SDT: tl.constexpr,
):
    # BV covers the whole value dim: g' = dd = -(dO . o) / (den + eps) needs whole rows (tile 0 stores it).
    i_f, i_nh = tl.program_id(0), tl.program_id(1)
    i_n, i_h = i_nh // H, i_nh % H
    bos, L, c0 = _chunk_start(cu_seqlens, chunk_offsets, i_n, T, BT, IS_VARLEN)
    o_t = tl.arange(0, BT)
    o_k = tl.arange(0, BK)
    o_v = tl.arange(0, BV)
    r = i_f * BF + tl.arange(0, BF)
    m_r = r < FI
    m_rv = m_r[:, None] & (o_v < DV)[None, :]
    a, b, coef = _feat_index(r, BK, FI, scale)

    b_dh = tl.zeros([BF, BV], dtype=tl.float32)
    b_dz = tl.zeros([BF], dtype=tl.float32)
    if USE_FINAL_GRAD:
        b_dh += tl.load(dhsT + (i_nh.to(tl.int64) * FI + r[:, None]) * DV + o_v[None, :], mask=m_rv, other=0.0)
        b_dz += tl.load(dzsT + i_nh.to(tl.int64) * FI + r, mask=m_r, other=0.0)
    NT = tl.cdiv(L, BT)
    for j in range(0, NT):
        i_t = NT - 1 - j
        p_c = (c0 + i_t) * H + i_h  # the gradient that reaches the keys of chunk i_t (later queries)
        p_h, m_h = _state_ptr(dh, p_c, r, o_v, FP, DV, BV)
        tl.store(p_h, b_dh.to(SDT), mask=m_h)
        tl.store(dz + p_c * FP + r, b_dz)
        m_t = i_t * BT + o_t < L
        p_tok = (bos + i_t * BT + o_t) * H + i_h
        b_q = _load_tile(q, bos, L, i_h, i_t, H, D, BT, BK, 0)
        b_do = _load_tile(do, bos, L, i_h, i_t, H, DV, BT, BV, 0).to(tl.float32)
        b_o = _load_tile(o, bos, L, i_h, i_t, H, DV, BT, BV, 0).to(tl.float32)
        b_rden = 1.0 / (tl.load(den + p_tok, mask=m_t, other=1.0) + eps)
        b_dd = -tl.sum(b_do * b_o, 1) * b_rden
        if i_f == 0:
            tl.store(dd + p_tok, b_dd, mask=m_t)
        b_qt = (_pick_t(b_q, a, o_k, PREC) * _pick_t(b_q, b, o_k, PREC)
                * coef[:, None])
        b_dh += tl.dot(b_qt.to(SDT), (b_do * b_rden[:, None]).to(SDT), input_precision=PREC)
        b_dz += tl.sum(b_qt * b_dd[None, :], 1)
    if STORE_INITIAL_GRAD:
        tl.store(dhs0 + (i_nh.to(tl.int64) * FI + r[:, None]) * DV + o_v[None, :], b_dh, mask=m_rv)
        tl.store(dzs0 + i_nh.to(tl.int64) * FI + r, b_dz, mask=m_r)


@triton.jit
def _cw_bwd_dqkv_kernel(
    q, k, v, do, den, dd, h, z, dh, dz, dq, dk, dv, cu_seqlens, chunk_indices, scale, eps, T,
    H: tl.constexpr, D: tl.constexpr, DV: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr,
    BF: tl.constexpr, BV: tl.constexpr, FI: tl.constexpr, FP: tl.constexpr, NF: tl.constexpr,
    IS_VARLEN: tl.constexpr, PREC: tl.constexpr, SDT: tl.constexpr, DO_DQ: tl.constexpr, DO_DKV: tl.constexpr,
):
    # DO_DQ / DO_DKV: one launch for both, or two launches of fewer registers (CW_BWD_SPLIT).
    i_c, i_h = tl.program_id(0), tl.program_id(1)
    bos, L, i_t, b_q, b_k, b_v = _chunk_qkv(q, k, v, cu_seqlens, chunk_indices, i_c, i_h, T, H, D, DV, BT, BK, BV,
                                            IS_VARLEN)
    o_t = tl.arange(0, BT)
    o_k = tl.arange(0, BK)
    o_v = tl.arange(0, BV)
    m_t = i_t * BT + o_t < L
    p_tok = (bos + i_t * BT + o_t) * H + i_h
    b_rden = 1.0 / (tl.load(den + p_tok, mask=m_t, other=1.0) + eps)
    b_g = _load_tile(do, bos, L, i_h, i_t, H, DV, BT, BV, 0).to(tl.float32) * b_rden[:, None]  # dL/dnum
    b_dd = tl.load(dd + p_tok, mask=m_t, other=0.0)  # dL/dden

    # intra-chunk: dA = g v^T + g' (dA/ds = 1 + s), dv = A^T g
    m_a = (o_t[:, None] >= o_t[None, :]) & m_t[None, :]
    b_s = scale * tl.dot(b_q, tl.trans(b_k), input_precision=PREC)
    b_da = tl.dot(b_g, tl.trans(b_v.to(tl.float32)), input_precision=PREC) + b_dd[:, None]
    b_ds = tl.where(m_a, b_da * (1.0 + b_s), 0.0)
    p_c = i_c.to(tl.int64) * H + i_h
    # inter-chunk, per feature tile: dphi(Q) = coef (g H_c^T + g' z_c), dphi(K) = V dH_c^T + dz_c,
    # dV += phi(K) dH_c; a feature x[a] x[b] sends dphi x[b] to column a and dphi x[a] to column b,
    # summed over the tile by selection products (exact: one-hot matrices).
    if DO_DQ:
        b_dq = scale * tl.dot(b_ds, b_k.to(tl.float32), input_precision=PREC)
        b_gs = b_g.to(SDT)
        for i_f in range(NF):
            r = i_f * BF + tl.arange(0, BF)
            a, b, coef = _feat_index(r, BK, FI, scale)
            p_h, m_h = _state_ptr(h, p_c, r, o_v, FP, DV, BV)
            b_dqf = tl.dot(b_gs, tl.trans(tl.load(p_h, mask=m_h, other=0.0)), input_precision=PREC)
            b_dqf = (b_dqf + b_dd[:, None] * tl.load(z + p_c * FP + r)[None, :]) * coef[None, :]
            e_a = (a[:, None] == o_k[None, :]).to(tl.float32)  # [BF, BK]
            e_b = (b[:, None] == o_k[None, :]).to(tl.float32)
            b_dq += tl.dot(b_dqf * _pick(b_q, b, o_k, PREC), e_a, input_precision=PREC)
            b_dq += tl.dot(b_dqf * _pick(b_q, a, o_k, PREC), e_b, input_precision=PREC)
        _store_tile(dq, b_dq, bos, L, i_h, i_t, H, D, BT, BK)
    if DO_DKV:
        b_a = tl.where(m_a, 1.0 + b_s + 0.5 * b_s * b_s, 0.0)
        b_dk = scale * tl.dot(tl.trans(b_ds), b_q.to(tl.float32), input_precision=PREC)
        b_dv = tl.dot(tl.trans(b_a), b_g, input_precision=PREC)
        b_vs = b_v.to(SDT)
        for i_f in range(NF):
            r = i_f * BF + tl.arange(0, BF)
            a, b, coef = _feat_index(r, BK, FI, scale)
            p_dh, m_h = _state_ptr(dh, p_c, r, o_v, FP, DV, BV)
            b_dh = tl.load(p_dh, mask=m_h, other=0.0)
            b_ka = _pick(b_k, a, o_k, PREC)
            b_kb = _pick(b_k, b, o_k, PREC)
            b_kf = tl.where((r < FI)[None, :], b_ka * b_kb, 0.0)
            b_dv += tl.dot(b_kf.to(SDT), b_dh, input_precision=PREC)
            b_dkf = tl.dot(b_vs, tl.trans(b_dh), input_precision=PREC) + tl.load(dz + p_c * FP + r)[None, :]
            e_a = (a[:, None] == o_k[None, :]).to(tl.float32)
            e_b = (b[:, None] == o_k[None, :]).to(tl.float32)
            b_dk += tl.dot(b_dkf * b_kb, e_a, input_precision=PREC) + tl.dot(b_dkf * b_ka, e_b, input_precision=PREC)
        _store_tile(dk, b_dk, bos, L, i_h, i_t, H, D, BT, BK)
        _store_tile(dv, b_dv, bos, L, i_h, i_t, H, DV, BT, BV)


def supported(d: int, dv: int) -> bool:
    return triton.next_power_of_2(dv) <= CW_MAX_DV


def num_chunks(batch: int, T: int, num_seqs: int | None = None) -> int:
    """Chunks of a call: batch x ceil(T / chunk), or with packed sequences (num_seqs of them along T,
    batch 1) at most ceil(T / chunk) + num_seqs."""
    if num_seqs is None:
        return batch * triton.cdiv(T, CW_CHUNK)
    return triton.cdiv(T, CW_CHUNK) + num_seqs


def state_bytes(chunks: int, heads: int, d: int, dv: int) -> int:
    """Bytes of the per-chunk states (16-bit H_c and fp32 z_c) of one call; the backward holds twice
    this (H and dH)."""
    FP = _sizes(d, dv, CW_BF)[3]
    return chunks * heads * FP * (2 * dv + 4)


def _check_offsets(longest: int, H: int, D: int, DV: int) -> None:
    # Token offsets within a sequence are int32 in the kernels (sequence starts are int64).
    if longest * H * max(D, DV) >= 2**31:
        raise ValueError(f"a sequence of {longest} tokens x {H} heads x {max(D, DV)} is too long for the chunkwise "
                         "Triton form (int32 offsets within a sequence): use form='fused'")


def _layout(q, v, cu_seqlens):
    """Shapes and the chunk bookkeeping: (N, T, H, D, DV, NC, chunk_offsets, chunk_indices)."""
    B, T, H, D = q.shape
    DV = v.shape[-1]
    BT = CW_CHUNK
    if cu_seqlens is None:
        _check_offsets(T, H, D, DV)
        NT = triton.cdiv(T, BT)
        return B, T, H, D, DV, B * NT, None, None
    lens = (cu_seqlens[1:] - cu_seqlens[:-1]).long()  # N >= 1 (the op checks cu_seqlens)
    nc = (lens + BT - 1) // BT
    longest, NC = torch.stack([lens.max(), nc.sum()]).tolist()  # one host sync for both
    _check_offsets(longest, H, D, DV)
    chunk_offsets = torch.cumsum(nc, 0) - nc
    seq = torch.repeat_interleave(torch.arange(len(nc), device=q.device), nc)
    within = torch.arange(NC, device=q.device) - chunk_offsets[seq]
    chunk_indices = torch.stack([seq, within], 1).to(torch.int32).contiguous()
    return len(nc), 0, H, D, DV, NC, chunk_offsets.to(torch.int32), chunk_indices


def _sizes(D, DV, BF):
    BK = block_k(D)
    FI = internal_dim(D)
    NF = triton.cdiv(FI, BF)
    return BK, FI, NF, NF * BF, max(16, triton.next_power_of_2(DV))


def _snapshot_dtype(dtype):
    return torch.float32 if dtype == torch.float32 else torch.bfloat16


def _fwd_h(k, v, hs0, zs0, cu_seqlens, lay, output_final_state, BF):
    N, T, H, D, DV, NC, chunk_offsets, _ = lay
    BK, FI, NF, FP, BV = _sizes(D, DV, BF)
    BV = min(BV, CW_H_BV)
    h = k.new_empty(NC, H, FP, DV, dtype=_snapshot_dtype(k.dtype))
    z = k.new_empty(NC, H, FP, dtype=torch.float32)
    hsT = k.new_empty(N, H, FI, DV, dtype=torch.float32) if output_final_state else None
    zsT = k.new_empty(N, H, FI, dtype=torch.float32) if output_final_state else None
    _cw_fwd_h_kernel[(NF, triton.cdiv(DV, BV), N * H)](
        k, v, hs0, zs0, hsT, zsT, h, z, cu_seqlens, chunk_offsets, T,
        H=H, D=D, DV=DV, BT=CW_CHUNK, BK=BK, BF=BF, BV=BV, FI=FI, FP=FP,
        USE_INITIAL=hs0 is not None, STORE_FINAL=output_final_state, IS_VARLEN=cu_seqlens is not None,
        PREC=_dot_precision(k.dtype), SDT=_state_dtype(k.dtype), num_warps=CW_H_WARPS, num_stages=CW_STAGES,
    )
    return h, z, hsT, zsT


def taylor_chunkwise_fwd(q, k, v, hs0, zs0, cu_seqlens, scale, eps, output_final_state):
    lay = _layout(q, v, cu_seqlens)
    N, T, H, D, DV, NC, _, chunk_indices = lay
    BK, FI, NF, FP, BV = _sizes(D, DV, CW_BF)
    h, z, hsT, zsT = _fwd_h(k, v, hs0, zs0, cu_seqlens, lay, output_final_state, CW_BF)
    o = torch.empty_like(v)
    den = q.new_empty(q.shape[:3], dtype=torch.float32)
    _cw_fwd_o_kernel[(NC, H)](
        q, k, v, o, den, h, z, cu_seqlens, chunk_indices, scale, eps, T,
        H=H, D=D, DV=DV, BT=CW_CHUNK, BK=BK, BF=CW_BF, BV=BV, FI=FI, FP=FP, NF=NF,
        IS_VARLEN=cu_seqlens is not None, PREC=_dot_precision(q.dtype), SDT=_state_dtype(q.dtype),
        num_warps=CW_WARPS, num_stages=CW_STAGES,
    )
    return o, den, hsT, zsT


def taylor_chunkwise_bwd(q, k, v, o, den, do, hs0, zs0, dhsT, dzsT, cu_seqlens, scale, eps):
    lay = _layout(q, v, cu_seqlens)
    N, T, H, D, DV, NC, chunk_offsets, chunk_indices = lay
    BF = CW_BWD_BF
    BK, FI, NF, FP, BV = _sizes(D, DV, BF)
    prec, sdt = _dot_precision(q.dtype), _state_dtype(q.dtype)
    varlen = cu_seqlens is not None
    h, z, _, _ = _fwd_h(k, v, hs0, zs0, cu_seqlens, lay, False, BF)
    dh = torch.empty_like(h)
    dz = torch.empty_like(z)
    dd = torch.empty_like(den)  # g'_t = d loss / d den_t = -(dO_t . o_t) / (den_t + eps), written by dh
    store_init = hs0 is not None
    dhs0 = q.new_empty(N, H, FI, DV, dtype=torch.float32) if store_init else None
    dzs0 = q.new_empty(N, H, FI, dtype=torch.float32) if store_init else None
    _cw_bwd_dh_kernel[(NF, N * H)](
        q, o, do, den, dd, dhsT, dzsT, dhs0, dzs0, dh, dz, cu_seqlens, chunk_offsets, scale, eps, T,
        H=H, D=D, DV=DV, BT=CW_CHUNK, BK=BK, BF=BF, BV=BV, FI=FI, FP=FP,
        USE_FINAL_GRAD=dhsT is not None, STORE_INITIAL_GRAD=store_init, IS_VARLEN=varlen,
        PREC=prec, SDT=sdt, num_warps=CW_H_WARPS, num_stages=CW_STAGES,
    )
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    parts = ((True, False), (False, True)) if CW_BWD_SPLIT else ((True, True),)
    for do_dq, do_dkv in parts:
        _cw_bwd_dqkv_kernel[(NC, H)](
            q, k, v, do, den, dd, h, z, dh, dz, dq, dk, dv, cu_seqlens, chunk_indices, scale, eps, T,
            H=H, D=D, DV=DV, BT=CW_CHUNK, BK=BK, BF=BF, BV=BV, FI=FI, FP=FP, NF=NF,
            IS_VARLEN=varlen, PREC=prec, SDT=sdt, DO_DQ=do_dq, DO_DKV=do_dkv,
            num_warps=CW_BWD_WARPS, num_stages=CW_STAGES,
        )
    return dq, dk, dv, dhs0, dzs0
