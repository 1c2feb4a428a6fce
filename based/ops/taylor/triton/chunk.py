"""Chunked Taylor linear attention in Triton: forward, backward and variable-length packing.

One program owns one (sequence, head, value block, quadratic row block) and walks the sequence chunk
by chunk with the fp32 state in registers, so the 1 + d + d^2 features never reach HBM. Per chunk of
BT tokens (README.md, "Chunked kernel"):
    intra:  A = tril(1 + s + s^2/2), s = scale Q K^T      -> A V, rowsum(A)    (tensor cores)
    inter:  H0 + scale Q H1 + scale^2/2 (Q*Q) H2           -> (Q*Q) [BT, BK^2] built on chip
    state:  H0 += sum V, H1 += K^T V, H2 += (K*K)^T V      (fp32)
The backward walks forward again for dq (recomputing the state) and backward for dk, dv and the
initial state, carrying dH = sum over later queries of phi(q) (dO / den)^T.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .layout import block_k, internal_dim

# Launch parameters (module attributes so benchmarks/taylor_sweep.py can try variants). STATE_TILE is
# the largest fp32 quadratic state tile [BI * BK, BV] one program keeps in registers.
# Defaults: the fastest of benchmarks/taylor_sweep.py on an H200 (d=16, dv=64, bf16; NOTES-kernels.md).
CHUNK = int(os.environ.get("BASED_TRITON_CHUNK", 32))
NUM_WARPS = int(os.environ.get("BASED_TRITON_WARPS", 4))
NUM_STAGES = int(os.environ.get("BASED_TRITON_STAGES", 2))
BV_MAX = int(os.environ.get("BASED_TRITON_BV", 32))
STATE_TILE = int(os.environ.get("BASED_TRITON_STATE_TILE", 8192))
# Backward: the dq pass (forward walk, BWD_*) and the dk/dv pass (backward walk, DKV_*) have their own
# chunk, value block and warps. Defaults: the fastest of each in benchmarks/taylor_bwd_sweep.py on an
# H200 (NOTES-kernels.md, v3); the spill-free settings of benchmarks/taylor_regs.py were slower.
BWD_CHUNK = int(os.environ.get("BASED_TRITON_BWD_CHUNK", 32))
BWD_WARPS = int(os.environ.get("BASED_TRITON_BWD_WARPS", 4))
BWD_BV_MAX = int(os.environ.get("BASED_TRITON_BWD_BV", 32))
BWD_STATE_TILE = int(os.environ.get("BASED_TRITON_BWD_STATE_TILE", 8192))
DKV_CHUNK = int(os.environ.get("BASED_TRITON_DKV_CHUNK", 32))
DKV_WARPS = int(os.environ.get("BASED_TRITON_DKV_WARPS", 4))
DKV_BV_MAX = int(os.environ.get("BASED_TRITON_DKV_BV", 32))


def _blocks(d: int, dv: int, bv_max: int, state_tile: int) -> tuple[int, int, int, int]:
    """(BK, BI, BV, NK): padded feature dim, quadratic rows per program, value block, row splits."""
    bk = block_k(d)
    bv = min(bv_max, triton.next_power_of_2(dv))
    bv = max(bv, 16)
    bi = bk
    while bi * bk * bv > state_tile and bi > 1:
        bi //= 2
    return bk, bi, bv, bk // bi


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs keep fp32 products; 16-bit inputs read the fp32 state through tf32 tensor cores.
    return "ieee" if dtype == torch.float32 else "tf32"


def _state_dtype(dtype: torch.dtype):
    # The forward reads H2 through bf16 tensor cores for 16-bit inputs (fp16 could overflow: H0 and
    # H2 grow like T); fp32 inputs keep fp32.
    return tl.float32 if dtype == torch.float32 else tl.bfloat16


@triton.jit
def _seq_bounds(cu_seqlens, i_n, T, IS_VARLEN: tl.constexpr):
    if IS_VARLEN:
        bos = tl.load(cu_seqlens + i_n).to(tl.int64)
        eos = tl.load(cu_seqlens + i_n + 1).to(tl.int64)
    else:
        bos = i_n.to(tl.int64) * T
        eos = bos + T
    return bos, (eos - bos).to(tl.int32)


@triton.jit
def _taylor_fwd_kernel(
    q, k, v, o, den, hs0, zs0, hsT, zsT, num_part, den_part, cu_seqlens,
    scale, eps, T, TT,
    H: tl.constexpr, D: tl.constexpr, DV: tl.constexpr,
    BT: tl.constexpr, BK: tl.constexpr, BI: tl.constexpr, BV: tl.constexpr, NK: tl.constexpr,
    USE_INITIAL: tl.constexpr, STORE_FINAL: tl.constexpr, IS_VARLEN: tl.constexpr,
    PREC: tl.constexpr, SDT: tl.constexpr,
):
    i_v, i_k, i_nh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_n, i_h = i_nh // H, i_nh % H
    bos, L = _seq_bounds(cu_seqlens, i_n, T, IS_VARLEN)
    FI: tl.constexpr = 1 + BK + BK * BK
    BQ: tl.constexpr = BI * BK
    c2 = 0.5 * scale * scale

    o_t = tl.arange(0, BT)
    o_k = tl.arange(0, BK)
    o_i = i_k * BI + tl.arange(0, BI)
    o_v = i_v * BV + tl.arange(0, BV)
    o_q = 1 + BK + i_k * BQ + tl.arange(0, BQ)  # internal rows of this program's quadratic block
    m_k, m_i, m_v = o_k < D, o_i < D, o_v < DV
    m_causal = o_t[:, None] >= o_t[None, :]

    o_kk = 1 + BK + o_k[:, None] * BK + o_k[None, :]  # internal rows of z2 as a [BK, BK] matrix

    b_h0 = tl.zeros([BV], dtype=tl.float32)
    b_h1 = tl.zeros([BK, BV], dtype=tl.float32)
    b_h2 = tl.zeros([BQ, BV], dtype=tl.float32)
    b_z1 = tl.zeros([BK], dtype=tl.float32)
    # z2 = sum k k^T kept as a matrix: the denominator's quadratic part is q^T Z q, two small products.
    b_zz = tl.zeros([BK, BK], dtype=tl.float32)
    b_z0 = 0.0
    if USE_INITIAL:
        p_hs = hs0 + i_nh.to(tl.int64) * FI * DV
        p_zs = zs0 + i_nh.to(tl.int64) * FI
        b_h2 += tl.load(p_hs + o_q[:, None] * DV + o_v[None, :], mask=m_v[None, :], other=0.0)
        b_zz += tl.load(p_zs + o_kk)
        b_h0 += tl.load(p_hs + o_v, mask=m_v, other=0.0)
        b_h1 += tl.load(p_hs + (1 + o_k[:, None]) * DV + o_v[None, :], mask=m_v[None, :], other=0.0)
        b_z1 += tl.load(p_zs + 1 + o_k)
        b_z0 = tl.load(p_zs)

    for i_t in range(0, tl.cdiv(L, BT)):
        m_t = i_t * BT + o_t < L
        rows = bos + i_t * BT + o_t  # [BT] token index in the packed [TT, H, *] tensors
        p_qk = rows[:, None] * (H * D) + i_h * D
        b_q = tl.load(q + p_qk + o_k[None, :], mask=m_t[:, None] & m_k[None, :], other=0.0)  # [BT, BK]
        b_k = tl.load(k + p_qk + o_k[None, :], mask=m_t[:, None] & m_k[None, :], other=0.0)
        if NK == 1:
            b_qi = b_q.to(tl.float32)
            b_ki = b_k.to(tl.float32)
        else:
            b_qi = tl.load(q + p_qk + o_i[None, :], mask=m_t[:, None] & m_i[None, :], other=0.0).to(tl.float32)
            b_ki = tl.load(k + p_qk + o_i[None, :], mask=m_t[:, None] & m_i[None, :], other=0.0).to(tl.float32)
        b_v = tl.load(v + rows[:, None] * (H * DV) + i_h * DV + o_v[None, :], mask=m_t[:, None] & m_v[None, :], other=0.0)
        b_qf = b_q.to(tl.float32)
        b_kf = b_k.to(tl.float32)
        # Quadratic features of this chunk, on chip only: [BT, BI, BK] -> [BT, BQ] (and transposed
        # for the keys), in SDT (bf16 for 16-bit inputs: fp32 range, so the state cannot overflow).
        b_q2 = tl.reshape(b_qi[:, :, None] * b_qf[:, None, :], [BT, BQ]).to(SDT)
        b_k2t = tl.reshape(tl.trans(b_ki)[:, None, :] * tl.trans(b_kf)[None, :, :], [BQ, BT])

        b_o = c2 * tl.dot(b_q2, b_h2.to(SDT), input_precision=PREC)  # [BT, BV]
        b_d = tl.zeros([BT], dtype=tl.float32)
        if i_k == 0:
            b_s = scale * tl.dot(b_q, tl.trans(b_k), input_precision=PREC)  # [BT, BT]
            b_a = tl.where(m_causal & m_t[None, :], 1.0 + b_s + 0.5 * b_s * b_s, 0.0)
            b_o += tl.dot(b_a.to(b_v.dtype), b_v, input_precision=PREC)
            b_o += b_h0[None, :] + scale * tl.dot(b_qf, b_h1, input_precision=PREC)
            b_zq = tl.dot(b_qf, tl.trans(b_zz), input_precision=PREC)  # [BT, BK]: Z q_t
            b_d += tl.sum(b_a, 1) + (b_z0 + i_t * BT) + tl.sum(b_qf * (scale * b_z1[None, :] + c2 * b_zq), 1)
            b_h1 += tl.dot(tl.trans(b_k), b_v, input_precision=PREC)
            b_h0 += tl.sum(b_v.to(tl.float32), 0)
            b_z1 += tl.sum(b_kf, 0)
            b_zz += tl.dot(tl.trans(b_k), b_k, input_precision=PREC)
        b_h2 += tl.dot(b_k2t.to(b_v.dtype), b_v, input_precision=PREC)

        if NK == 1:
            p_o = o + rows[:, None] * (H * DV) + i_h * DV + o_v[None, :]
            tl.store(p_o, (b_o / (b_d + eps)[:, None]).to(p_o.dtype.element_ty), mask=m_t[:, None] & m_v[None, :])
            if i_v == 0:
                tl.store(den + rows * H + i_h, b_d, mask=m_t)
        else:
            p_o = num_part + i_k.to(tl.int64) * TT * H * DV + rows[:, None] * (H * DV) + i_h * DV + o_v[None, :]
            tl.store(p_o, b_o, mask=m_t[:, None] & m_v[None, :])
            if i_v == 0:
                tl.store(den_part + i_k.to(tl.int64) * TT * H + rows * H + i_h, b_d, mask=m_t)

    if STORE_FINAL:
        p_hs = hsT + i_nh.to(tl.int64) * FI * DV
        p_zs = zsT + i_nh.to(tl.int64) * FI
        tl.store(p_hs + o_q[:, None] * DV + o_v[None, :], b_h2, mask=m_v[None, :])
        if i_k == 0:
            tl.store(p_hs + o_v, b_h0, mask=m_v)
            tl.store(p_hs + (1 + o_k[:, None]) * DV + o_v[None, :], b_h1, mask=m_v[None, :])
            if i_v == 0:
                tl.store(p_zs + o_kk, b_zz)
                tl.store(p_zs + 1 + o_k, b_z1)
                tl.store(p_zs, b_z0 + L)


@triton.jit
def _sel(i_k, BK: tl.constexpr, BI: tl.constexpr, BQ: tl.constexpr, DT: tl.constexpr, TRANS: tl.constexpr):
    # Selection matrices of a quadratic row block: block row r = (i, j) stands for features
    # (i_k BI + i, j). E_i [BK, BQ] = [c == i_k BI + r // BK], E_j = [c == r % BK] (TRANS: [BQ, BK]).
    # x E_i and x E_j broadcast the features of x [BT, BK] to [BT, BQ] on tensor cores, exactly, in the
    # layout of a product's result; y E_i^T sums y [BT, BQ] over j (and y E_j^T over i).
    o_r = tl.arange(0, BQ)
    o_c = tl.arange(0, BK)
    r_i = i_k * BI + o_r // BK
    r_j = o_r % BK
    if TRANS:
        e_i = (r_i[:, None] == o_c[None, :]).to(DT)
        e_j = (r_j[:, None] == o_c[None, :]).to(DT)
    else:
        e_i = (o_c[:, None] == r_i[None, :]).to(DT)
        e_j = (o_c[:, None] == r_j[None, :]).to(DT)
    return e_i, e_j


@triton.jit
def _taylor_bwd_dq_kernel(
    q, k, v, do, den, dd, hs0, zs0, dq_part, cu_seqlens,
    scale, eps, T, TT,
    H: tl.constexpr, D: tl.constexpr, DV: tl.constexpr,
    BT: tl.constexpr, BK: tl.constexpr, BI: tl.constexpr, BV: tl.constexpr, NK: tl.constexpr,
    USE_INITIAL: tl.constexpr, IS_VARLEN: tl.constexpr, PREC: tl.constexpr, SDT: tl.constexpr,
):
    # dq_t = sum_{s<=t} P_ts (1 + s_ts) scale k_s with P_ts = g_t.v_s + g'_t, g = dO / den,
    # g' = -(dO.o) / den; the inter-chunk part differentiates phi(q_t).(H g_t + z g'_t).
    i_v, i_k, i_nh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_n, i_h = i_nh // H, i_nh % H
    bos, L = _seq_bounds(cu_seqlens, i_n, T, IS_VARLEN)
    FI: tl.constexpr = 1 + BK + BK * BK
    BQ: tl.constexpr = BI * BK
    c2 = 0.5 * scale * scale
    # The denominator's gradient enters once per (token, head): in the first value block only.
    f_v = tl.where(i_v == 0, 1.0, 0.0)

    o_t = tl.arange(0, BT)
    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    o_q = 1 + BK + i_k * BQ + tl.arange(0, BQ)
    o_qt = 1 + BK + (tl.arange(0, BQ) % BK) * BK + i_k * BI + tl.arange(0, BQ) // BK  # rows (j, i)
    m_k, m_v = o_k < D, o_v < DV
    m_causal = o_t[:, None] >= o_t[None, :]
    o_kk = 1 + BK + o_k[:, None] * BK + o_k[None, :]  # internal rows of z2 as a [BK, BK] matrix
    e_i, e_j = _sel(i_k, BK, BI, BQ, q.dtype.element_ty, False)  # [BK, BQ]
    e_it, _ = _sel(i_k, BK, BI, BQ, q.dtype.element_ty, True)  # [BQ, BK]

    b_h1 = tl.zeros([BK, BV], dtype=tl.float32)
    # S = H2 + P H2 with P swapping rows (i, j) and (j, i): M_(i,j) + M_(j,i) comes from one product.
    # The chunks' updates (K*K)^T V are P-symmetric, so S grows by 2 (K*K)^T V.
    b_h2 = tl.zeros([BQ, BV], dtype=tl.float32)
    b_z1 = tl.zeros([BK], dtype=tl.float32)
    b_zz = tl.zeros([BK, BK], dtype=tl.float32)  # z2 = sum k k^T as a matrix
    if USE_INITIAL:
        p_hs = hs0 + i_nh.to(tl.int64) * FI * DV
        p_zs = zs0 + i_nh.to(tl.int64) * FI
        b_h2 += tl.load(p_hs + o_q[:, None] * DV + o_v[None, :], mask=m_v[None, :], other=0.0)
        b_h2 += tl.load(p_hs + o_qt[:, None] * DV + o_v[None, :], mask=m_v[None, :], other=0.0)
        b_zz += tl.load(p_zs + o_kk)
        b_h1 += tl.load(p_hs + (1 + o_k[:, None]) * DV + o_v[None, :], mask=m_v[None, :], other=0.0)
        b_z1 += tl.load(p_zs + 1 + o_k)

    for i_t in range(0, tl.cdiv(L, BT)):
        m_t = i_t * BT + o_t < L
        rows = bos + i_t * BT + o_t
        p_qk = rows[:, None] * (H * D) + i_h * D
        p_vv = rows[:, None] * (H * DV) + i_h * DV + o_v[None, :]
        m_tv = m_t[:, None] & m_v[None, :]
        b_q = tl.load(q + p_qk + o_k[None, :], mask=m_t[:, None] & m_k[None, :], other=0.0)
        b_k = tl.load(k + p_qk + o_k[None, :], mask=m_t[:, None] & m_k[None, :], other=0.0)
        b_v = tl.load(v + p_vv, mask=m_tv, other=0.0)
        b_den = tl.load(den + rows * H + i_h, mask=m_t, other=1.0) + eps
        b_g = tl.load(do + p_vv, mask=m_tv, other=0.0).to(tl.float32) / b_den[:, None]  # [BT, BV]
        b_gp = f_v * tl.load(dd + rows * H + i_h, mask=m_t, other=0.0)  # [BT]
        b_qf = b_q.to(tl.float32)

        # d/dq of c2 vec(q q^T).(H2 g): dq_i = sum_j (M_(i,j) + M_(j,i)) q_j, M = c2 g H2^T; with
        # M' = c2 g S^T [BT, BQ] that is (M' * (q E_j)) E_i^T: tensor-core products, no [BT, BI, BK]
        # reductions. S is read through SDT (bf16 for 16-bit inputs) like the forward's H2.
        b_m = c2 * tl.dot(b_g.to(SDT), tl.trans(b_h2.to(SDT)), input_precision=PREC)
        b_dq = tl.dot((b_m * tl.dot(b_q, e_j, input_precision=PREC)).to(SDT), e_it.to(SDT), input_precision=PREC)
        if i_k == 0:
            b_s = scale * tl.dot(b_q, tl.trans(b_k), input_precision=PREC)
            b_p = tl.dot(b_g, tl.trans(b_v.to(tl.float32)), input_precision=PREC) + b_gp[:, None]
            b_ds = tl.where(m_causal & m_t[None, :], b_p * (1.0 + b_s), 0.0)
            b_dq += scale * tl.dot(b_ds, b_k.to(tl.float32), input_precision=PREC)
            b_dq += scale * (tl.dot(b_g, tl.trans(b_h1), input_precision=PREC) + b_gp[:, None] * b_z1[None, :])
            # denominator, quadratic part: d/dq c2 g' q^T Z q = c2 g' (Z + Z^T) q
            b_dq += (c2 * b_gp)[:, None] * tl.dot(b_qf, b_zz + tl.trans(b_zz), input_precision=PREC)
            b_h1 += tl.dot(tl.trans(b_k), b_v, input_precision=PREC)
            b_z1 += tl.sum(b_k.to(tl.float32), 0)
            b_zz += tl.dot(tl.trans(b_k), b_k, input_precision=PREC)
        # S += 2 (K*K)^T V, the features (k E_i) * (k E_j) built on tensor cores.
        b_k2 = tl.dot(b_k, e_i, input_precision=PREC) * tl.dot(b_k, e_j, input_precision=PREC)
        b_h2 += 2.0 * tl.dot(tl.trans(b_k2.to(b_v.dtype)), b_v, input_precision=PREC)
        p_dq = dq_part + (i_v * NK + i_k).to(tl.int64) * TT * H * BK + rows[:, None] * (H * BK) + i_h * BK + o_k[None, :]
        tl.store(p_dq, b_dq, mask=m_t[:, None])


@triton.jit
def _taylor_bwd_dkv_kernel(
    q, k, v, do, den, dd, dhsT, dzsT, dhs0, dzs0, dk_part, dv_out, cu_seqlens,
    scale, eps, T, TT,
    H: tl.constexpr, D: tl.constexpr, DV: tl.constexpr,
    BT: tl.constexpr, BK: tl.constexpr, BI: tl.constexpr, BV: tl.constexpr, NK: tl.constexpr,
    USE_FINAL_GRAD: tl.constexpr, STORE_INITIAL_GRAD: tl.constexpr, IS_VARLEN: tl.constexpr,
    PREC: tl.constexpr, SDT: tl.constexpr,
):
    # Walks the sequence backwards carrying dH = sum over later queries of phi(q_t) g_t^T (and dz with
    # g'_t): dv_s = phi(k_s).dH + intra, dk_s = d/dk_s phi(k_s).(dH v_s + dz) + intra.
    i_v, i_k, i_nh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_n, i_h = i_nh // H, i_nh % H
    bos, L = _seq_bounds(cu_seqlens, i_n, T, IS_VARLEN)
    FI: tl.constexpr = 1 + BK + BK * BK
    BQ: tl.constexpr = BI * BK
    c2 = 0.5 * scale * scale
    f_v = tl.where(i_v == 0, 1.0, 0.0)

    o_t = tl.arange(0, BT)
    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    o_q = 1 + BK + i_k * BQ + tl.arange(0, BQ)
    o_qt = 1 + BK + (tl.arange(0, BQ) % BK) * BK + i_k * BI + tl.arange(0, BQ) // BK  # rows (j, i)
    m_k, m_v = o_k < D, o_v < DV
    m_causal_t = o_t[:, None] <= o_t[None, :]  # [s, t]: key s seen by query t
    o_kk = 1 + BK + o_k[:, None] * BK + o_k[None, :]

    b_dh0 = tl.zeros([BV], dtype=tl.float32)
    b_dh1 = tl.zeros([BK, BV], dtype=tl.float32)
    # dS = dH2 + P dH2 (P swaps rows (i, j) and (j, i)); the updates c2 (Q*Q)^T g are P-symmetric.
    b_dh2 = tl.zeros([BQ, BV], dtype=tl.float32)
    b_dz1 = tl.zeros([BK], dtype=tl.float32)
    b_dzz = tl.zeros([BK, BK], dtype=tl.float32)  # gradient of z2 as a [BK, BK] matrix
    b_dz0 = tl.zeros([BT], dtype=tl.float32)
    if USE_FINAL_GRAD:
        p_hs = dhsT + i_nh.to(tl.int64) * FI * DV
        p_zs = dzsT + i_nh.to(tl.int64) * FI
        b_dh2 += tl.load(p_hs + o_q[:, None] * DV + o_v[None, :], mask=m_v[None, :], other=0.0)
        b_dh2 += tl.load(p_hs + o_qt[:, None] * DV + o_v[None, :], mask=m_v[None, :], other=0.0)
        b_dzz += f_v * tl.load(p_zs + o_kk)
        b_dh0 += tl.load(p_hs + o_v, mask=m_v, other=0.0)
        b_dh1 += tl.load(p_hs + (1 + o_k[:, None]) * DV + o_v[None, :], mask=m_v[None, :], other=0.0)
        b_dz1 += f_v * tl.load(p_zs + 1 + o_k)
        b_dz0 += tl.where(o_t == 0, f_v * tl.load(p_zs), 0.0)

    NT = tl.cdiv(L, BT)
    for i_r in range(0, NT):
        i_t = NT - 1 - i_r
        # Selection matrices rebuilt per chunk (i_z = 0, opaque to the compiler) so they are not hoisted
        # out of the loop and kept in registers beside the state.
        i_z = (i_t * BT) // (L + BT)
        e_i, e_j = _sel(i_k + i_z, BK, BI, BQ, q.dtype.element_ty, False)  # [BK, BQ]
        e_it, _ = _sel(i_k + i_z, BK, BI, BQ, q.dtype.element_ty, True)  # [BQ, BK]
        m_t = i_t * BT + o_t < L
        rows = bos + i_t * BT + o_t
        p_qk = rows[:, None] * (H * D) + i_h * D
        p_vv = rows[:, None] * (H * DV) + i_h * DV + o_v[None, :]
        m_tv = m_t[:, None] & m_v[None, :]
        b_q = tl.load(q + p_qk + o_k[None, :], mask=m_t[:, None] & m_k[None, :], other=0.0)
        b_k = tl.load(k + p_qk + o_k[None, :], mask=m_t[:, None] & m_k[None, :], other=0.0)
        b_v = tl.load(v + p_vv, mask=m_tv, other=0.0)
        b_den = tl.load(den + rows * H + i_h, mask=m_t, other=1.0) + eps
        b_g = tl.load(do + p_vv, mask=m_tv, other=0.0).to(tl.float32) / b_den[:, None]
        b_gp = f_v * tl.load(dd + rows * H + i_h, mask=m_t, other=0.0)
        b_qf = b_q.to(tl.float32)
        b_kf = b_k.to(tl.float32)
        b_vf = b_v.to(tl.float32)

        # Later chunks (and the final state's gradient), through the state: with K_j = k E_j and
        # K*K = (k E_i) * K_j [BT, BQ] (P-symmetric), dv = (K*K) dH2 = 1/2 (K*K) dS and
        # dk_i = sum_j (N_(i,j) + N_(j,i)) k_j = ((v dS^T) * K_j) E_i^T (tensor cores, dS read through SDT).
        b_kj = tl.dot(b_k, e_j, input_precision=PREC)
        b_dh2s = b_dh2.to(SDT)
        b_k2 = tl.dot(b_k, e_i, input_precision=PREC) * b_kj
        b_dv = 0.5 * tl.dot(b_k2.to(SDT), b_dh2s, input_precision=PREC)  # [BT, BV]
        b_n = tl.dot(b_v.to(SDT), tl.trans(b_dh2s), input_precision=PREC)  # [BT, BQ]
        b_dk = tl.dot((b_n * b_kj).to(SDT), e_it.to(SDT), input_precision=PREC)
        if i_k == 0:
            b_dv += b_dh0[None, :] + tl.dot(b_kf, b_dh1, input_precision=PREC)
            b_dk += tl.dot(b_vf, tl.trans(b_dh1), input_precision=PREC) + b_dz1[None, :]
            b_dk += tl.dot(b_kf, b_dzz + tl.trans(b_dzz), input_precision=PREC)
            # This chunk: keys s against queries t >= s, scores transposed to [s, t].
            b_st = scale * tl.dot(b_k, tl.trans(b_q), input_precision=PREC)
            b_mask = m_causal_t & m_t[None, :]
            b_at = tl.where(b_mask, 1.0 + b_st + 0.5 * b_st * b_st, 0.0)
            b_dv += tl.dot(b_at, b_g, input_precision=PREC)
            b_pt = tl.dot(b_vf, tl.trans(b_g), input_precision=PREC) + b_gp[None, :]
            b_dst = tl.where(b_mask, b_pt * (1.0 + b_st), 0.0)
            b_dk += scale * tl.dot(b_dst, b_qf, input_precision=PREC)
            b_dh1 += scale * tl.dot(tl.trans(b_qf), b_g, input_precision=PREC)
            b_dh0 += tl.sum(b_g, 0)
            b_dz1 += scale * tl.sum(b_qf * b_gp[:, None], 0)
            b_dz0 += b_gp
            # dZ += c2 sum_t g'_t q_t q_t^T
            b_dzz += tl.dot(tl.trans(b_qf * (c2 * b_gp)[:, None]), b_qf, input_precision=PREC)
        # dS += 2 c2 (Q*Q)^T g, the features (q E_i) * (q E_j) built on tensor cores.
        b_q2 = tl.dot(b_q, e_i, input_precision=PREC) * tl.dot(b_q, e_j, input_precision=PREC)
        b_dh2 += (2.0 * c2) * tl.dot(tl.trans(b_q2.to(SDT)), b_g.to(SDT), input_precision=PREC)

        p_dk = dk_part + (i_v * NK + i_k).to(tl.int64) * TT * H * BK + rows[:, None] * (H * BK) + i_h * BK + o_k[None, :]
        tl.store(p_dk, b_dk, mask=m_t[:, None])
        p_dv = dv_out + i_k.to(tl.int64) * TT * H * DV + p_vv
        tl.store(p_dv, b_dv.to(p_dv.dtype.element_ty), mask=m_tv)

    if STORE_INITIAL_GRAD:
        p_hs = dhs0 + i_nh.to(tl.int64) * FI * DV
        p_zs = dzs0 + i_nh.to(tl.int64) * FI
        # dH2 = dH2_T + U with dS = (dH2_T + P dH2_T) + 2 U: dH2 = (dS + dH2_T - P dH2_T) / 2
        if USE_FINAL_GRAD:
            p_ht = dhsT + i_nh.to(tl.int64) * FI * DV
            b_dh2 += tl.load(p_ht + o_q[:, None] * DV + o_v[None, :], mask=m_v[None, :], other=0.0)
            b_dh2 -= tl.load(p_ht + o_qt[:, None] * DV + o_v[None, :], mask=m_v[None, :], other=0.0)
        tl.store(p_hs + o_q[:, None] * DV + o_v[None, :], 0.5 * b_dh2, mask=m_v[None, :])
        if i_k == 0:
            tl.store(p_hs + o_v, b_dh0, mask=m_v)
            tl.store(p_hs + (1 + o_k[:, None]) * DV + o_v[None, :], b_dh1, mask=m_v[None, :])
            if i_v == 0:
                tl.store(p_zs + o_kk, b_dzz)
                tl.store(p_zs + 1 + o_k, b_dz1)
                tl.store(p_zs, tl.sum(b_dz0, 0))


def _bwd_extra(which: str) -> dict:
    """Constexprs of the backward kernels beyond the shared ones (benchmarks/taylor_regs.py)."""
    return dict(SDT=tl.bfloat16)


def _shapes(q, v, cu_seqlens):
    B, T, H, D = q.shape
    DV = v.shape[-1]
    if cu_seqlens is not None:
        N, T = cu_seqlens.numel() - 1, 0
    else:
        N = B
    return B * q.shape[1], N, T, H, D, DV


def taylor_chunk_fwd(q, k, v, hs0, zs0, cu_seqlens, scale, eps, output_final_state):
    TT, N, T, H, D, DV = _shapes(q, v, cu_seqlens)
    BK, BI, BV, NK = _blocks(D, DV, BV_MAX, STATE_TILE)
    NV = triton.cdiv(DV, BV)
    FI = internal_dim(D)
    o = torch.empty_like(v)
    den = q.new_empty(q.shape[:3], dtype=torch.float32)
    if NK > 1:
        num_part = q.new_empty(NK, *v.shape, dtype=torch.float32)
        den_part = q.new_empty(NK, *q.shape[:3], dtype=torch.float32)
    else:
        num_part = den_part = None
    hsT = q.new_empty(N, H, FI, DV, dtype=torch.float32) if output_final_state else None
    zsT = q.new_empty(N, H, FI, dtype=torch.float32) if output_final_state else None
    _taylor_fwd_kernel[(NV, NK, N * H)](
        q, k, v, o, den, hs0, zs0, hsT, zsT, num_part, den_part, cu_seqlens,
        scale, eps, T, TT, H=H, D=D, DV=DV, BT=CHUNK, BK=BK, BI=BI, BV=BV, NK=NK,
        USE_INITIAL=hs0 is not None, STORE_FINAL=output_final_state, IS_VARLEN=cu_seqlens is not None,
        PREC=_dot_precision(q.dtype), SDT=_state_dtype(q.dtype), num_warps=NUM_WARPS, num_stages=NUM_STAGES,
    )
    if NK > 1:
        den = den_part.sum(0)
        o = (num_part.sum(0) / (den + eps).unsqueeze(-1)).to(v.dtype)
    return o, den, hsT, zsT


def taylor_chunk_bwd(q, k, v, o, den, do, hs0, zs0, dhsT, dzsT, cu_seqlens, scale, eps):
    TT, N, T, H, D, DV = _shapes(q, v, cu_seqlens)
    FI = internal_dim(D)
    prec = _dot_precision(q.dtype)
    # g'_t = d loss / d den_t = -(dO_t . o_t) / (den_t + eps)
    dd = -(do.float() * o.float()).sum(-1) / (den + eps)
    common = dict(H=H, D=D, DV=DV, IS_VARLEN=cu_seqlens is not None, PREC=prec, SDT=_state_dtype(q.dtype),
                  num_stages=NUM_STAGES)
    BK, BI, BV, NK = _blocks(D, DV, BWD_BV_MAX, BWD_STATE_TILE)
    NV = triton.cdiv(DV, BV)
    dq_part = q.new_empty(NV * NK, TT, H, BK, dtype=torch.float32)
    _taylor_bwd_dq_kernel[(NV, NK, N * H)](
        q, k, v, do, den, dd, hs0, zs0, dq_part, cu_seqlens, scale, eps, T, TT,
        BT=BWD_CHUNK, BK=BK, BI=BI, BV=BV, NK=NK, USE_INITIAL=hs0 is not None, num_warps=BWD_WARPS, **common,
    )
    BK, BI, BV, NK = _blocks(D, DV, DKV_BV_MAX, BWD_STATE_TILE)
    NV = triton.cdiv(DV, BV)
    dk_part = q.new_empty(NV * NK, TT, H, BK, dtype=torch.float32)
    dv = v.new_empty(NK, *v.shape, dtype=v.dtype if NK == 1 else torch.float32)
    store_init = hs0 is not None
    dhs0 = q.new_empty(N, H, FI, DV, dtype=torch.float32) if store_init else None
    dzs0 = q.new_empty(N, H, FI, dtype=torch.float32) if store_init else None
    _taylor_bwd_dkv_kernel[(NV, NK, N * H)](
        q, k, v, do, den, dd, dhsT, dzsT, dhs0, dzs0, dk_part, dv, cu_seqlens, scale, eps, T, TT,
        BT=DKV_CHUNK, BK=BK, BI=BI, BV=BV, NK=NK, USE_FINAL_GRAD=dhsT is not None,
        STORE_INITIAL_GRAD=store_init, num_warps=DKV_WARPS, **common,
    )
    dq = dq_part.sum(0)[..., :D].view(q.shape).to(q.dtype)
    dk = dk_part.sum(0)[..., :D].view(k.shape).to(k.dtype)
    dv = dv[0] if NK == 1 else dv.sum(0).to(v.dtype)
    return dq, dk, dv, dhs0, dzs0
