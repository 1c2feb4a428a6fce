"""Triton kernels of norm_linear and norm_glu for 2 to 16 rows of x: one pass over the weights, on tensor cores.

The one-row kernels (triton.py) reduce each weight row against one row of x with vector FMAs; for several
rows they would either read the weights once per row (batch 2 took twice the time) or loop over the rows
for every block they load (the same, measured: each row's loop waited on its loads). Here a program takes a
block of weight rows and walks K in chunks, multiplying each chunk with every row of x at once (tl.dot, rows
padded to 16): the weights are read once and the chunk loads are pipelined.

RMSNorm is folded in as x * norm_weight before the dot and 1/rms(x) after it (a scale per row of x, summed
over the same chunks). The dot takes fp32 operands at tf32 precision, so the normalised rows are not rounded
to bf16 where the layer rounds them: the outputs agree with the layers to bf16 rounding, not bit for bit as
the one-row kernels do.
"""
from __future__ import annotations

import triton
import triton.language as tl

from ..launch import wait_for_inputs
from .tiles import _conv_weights, _glu_rows, _load_vec, _segment

RP = 16  # rows of x per pass: tl.dot's smallest M


@triton.jit
def _chunk(x, s_x, nw, p_w, row_ok, m_ok, o_m, k, K, NORM: tl.constexpr):
    """Chunk k [BKC] of the weight rows at p_w [BR, BKC], of the rows of x [RP, BKC] and of the norm weight
    (fp32; ones without NORM)."""
    k_ok = k < K
    b_w = tl.load(p_w + k[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
    b_x = tl.load(x + o_m[:, None] * s_x + k[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
    b_nw = tl.load(nw + k, mask=k_ok, other=0.0).to(tl.float32) if NORM else k * 0.0 + 1.0
    return b_w, b_x, b_nw


@triton.jit
def _projected_rows(x, s_x, nw, eps, w, rows, row_ok, K, ROWS: tl.constexpr, RP: tl.constexpr, BR: tl.constexpr,
                    BKC: tl.constexpr, NORM: tl.constexpr, PREC: tl.constexpr):
    """rms_norm(x) @ w[rows].T for every row of x: [RP, BR] in fp32 (rows of x past ROWS are zeros). Each
    chunk's loads are issued a chunk ahead (Triton did not pipeline this loop: no cp.async in its PTX).
    PREC: the dot's input precision ("tf32" for 16-bit inputs, "ieee" for fp32 ones)."""
    o_m, kk = tl.arange(0, RP), tl.arange(0, BKC)
    m_ok = o_m < ROWS
    p_w = w + rows.to(tl.int64)[:, None] * K
    acc = tl.zeros([RP, BR], tl.float32)
    sq = tl.zeros([RP], tl.float32)
    b_w, b_x, b_nw = _chunk(x, s_x, nw, p_w, row_ok, m_ok, o_m, kk, K, NORM)
    for k0 in range(0, K, BKC):
        b_w_next, b_x_next, b_nw_next = _chunk(x, s_x, nw, p_w, row_ok, m_ok, o_m, k0 + BKC + kk, K, NORM)
        # fp32 operands: the normalised rows are not rounded to x's dtype before the dot (tf32 keeps 3 more
        # bits than bf16), and TRITON_INTERPRET's 16-bit dot returns garbage.
        f = b_x.to(tl.float32)
        if NORM:
            sq += tl.sum(f * f, 1)
            f = f * b_nw[None, :]
        acc = tl.dot(f, tl.trans(b_w.to(tl.float32)), acc, input_precision=PREC)
        b_w, b_x, b_nw = b_w_next, b_x_next, b_nw_next
    if NORM:
        acc = acc * (1.0 / tl.sqrt(sq / K + eps))[:, None]
    return acc


@triton.jit
def _norm_linear_rows_kernel(
    x, s_x, nw, w0, w1, w2, b0, b1, b2, res, s_r, y, s_y, K, N0, N1, N2, eps,
    ROWS: tl.constexpr, RP: tl.constexpr, BN: tl.constexpr, BKC: tl.constexpr, NORM: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr, PREC: tl.constexpr, PDL: tl.constexpr,
):
    """One block of BN output columns (of the concatenated weights) per program, for every row of x."""
    wait_for_inputs(PDL)
    w, b, n, row0, col0 = _segment(tl.program_id(0), w0, w1, w2, b0, b1, b2, N0, N1, N2, BN)
    o, o_m = tl.arange(0, BN), tl.arange(0, RP)
    rows = row0 + o
    acc = _projected_rows(x, s_x, nw, eps, w, rows, rows < n, K, ROWS, RP, BN, BKC, NORM, PREC)
    dtype = y.dtype.element_ty
    out = (acc + _load_vec(b, rows, rows < n, BN, HAS_BIAS)[None, :]).to(dtype)  # rounded as F.linear's
    mask = (o_m < ROWS)[:, None] & (rows < n)[None, :]
    if HAS_RES:
        b_r = tl.load(res + o_m[:, None] * s_r + col0 + rows[None, :], mask=mask, other=0.0)
        out = (b_r.to(tl.float32) + out.to(tl.float32)).to(dtype)
    tl.store(y + o_m[:, None] * s_y + col0 + rows[None, :], out, mask=mask)


@triton.jit
def _norm_glu_rows_kernel(
    x, s_x, nw, w, b, y, s_y, state, s_sb, s_sk, cw, cb, K, H, eps,
    ROWS: tl.constexpr, RP: tl.constexpr, BN: tl.constexpr, BKC: tl.constexpr, NORM: tl.constexpr,
    HAS_BIAS: tl.constexpr, CONV: tl.constexpr, TAPS: tl.constexpr, HAS_CB: tl.constexpr, PREC: tl.constexpr,
    PDL: tl.constexpr,
):
    """One block of BN channels per program (its a and b weight rows interleaved), for every row of x."""
    wait_for_inputs(PDL)
    blk = tl.program_id(0)
    dtype = y.dtype.element_ty
    TP: tl.constexpr = triton.next_power_of_2(TAPS)
    o_m = tl.arange(0, RP)
    rows, row_ok = _glu_rows(blk, H, BN)
    acc = _projected_rows(x, s_x, nw, eps, w, rows, row_ok, K, ROWS, RP, 2 * BN, BKC, NORM, PREC)
    acc = acc + _load_vec(b, rows, row_ok, 2 * BN, HAS_BIAS)[None, :]
    a, g = tl.split(tl.reshape(acc.to(dtype), [RP, BN, 2]))  # rounded as F.linear's output
    a = a.to(tl.float32)
    g = g.to(tl.float32)
    c = blk * BN + tl.arange(0, BN)
    mask = (o_m < ROWS)[:, None] & (c < H)[None, :]
    if CONV:
        # BaseConv's step for every row (as short_conv_step): shift a into its state, conv, silu, gate by b.
        j = tl.arange(0, TP)
        w_old, m_taps, w_new, b_cb = _conv_weights(cw, cb, c, H, TAPS, TP, BN, HAS_CB)
        p_s = state + o_m[:, None, None] * s_sb + (c[:, None] + j[None, :] * s_sk)[None, :, :]
        m_s = (o_m < ROWS)[:, None, None] & m_taps[None, :, :]
        old = tl.load(p_s, mask=m_s, other=0.0)  # taps 1 .. TAPS-1, the ones that stay
        a = a.to(state.dtype.element_ty)
        conv = tl.sum(old.to(tl.float32) * w_old.to(tl.float32)[None, :, :], 2) \
            + a.to(tl.float32) * w_new.to(tl.float32)[None, :] + b_cb[None, :]
        # Taps 1 .. TAPS-1 move down one and a goes last. Every thread's read of these taps precedes every
        # write: threads holding copies of a channel must not read a shifted tap.
        tl.debug_barrier()
        tl.store(p_s - s_sk, old, mask=m_s)
        tl.store(state + o_m[:, None] * s_sb + c[None, :] + (TAPS - 1) * s_sk, a, mask=mask)
        out = conv * tl.sigmoid(conv) * g
    else:
        # SwiGLU: up * silu(gate), silu rounded as F.silu's output.
        out = a * (g * tl.sigmoid(g)).to(dtype).to(tl.float32)
    tl.store(y + o_m[:, None] * s_y + c[None, :], out.to(dtype), mask=mask)
