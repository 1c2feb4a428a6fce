"""Triton kernels of norm_linear and norm_glu for 2 to ROWS_PER_PASS rows of x: one pass over the weights.

The one-row kernels (triton.py) take a grid (programs, rows), so each row of x reads the whole weight again:
at batch 2 that doubled the step. Here each program folds each block of weight rows it loads into every
row's output before it moves on. It computes each row's RMS once, and reads the rows again for every block
(a few KB, from L1): a [rows, K] tile held in registers took 245 registers a thread at 8 rows. The blocks
are walked and prefetched as in the one-row kernels.
"""
from __future__ import annotations

import triton
import triton.language as tl

from ..launch import wait_for_inputs
from .tiles import _conv_weights, _glu_rows, _load_rows, _load_vec, _segment


@triton.jit
def _rows_rstd(x, s_x, K, eps, ROWS: tl.constexpr, RP: tl.constexpr, BK: tl.constexpr, NORM: tl.constexpr):
    """1 / RMS of each row of x [RP] (RMSNorm's scale; ones without NORM), all rows read at once."""
    o_m, cols = tl.arange(0, RP), tl.arange(0, BK)
    if NORM:
        f = tl.load(x + o_m[:, None] * s_x + cols[None, :], mask=(o_m < ROWS)[:, None] & (cols < K)[None, :],
                    other=0.0).to(tl.float32)
        return 1.0 / tl.sqrt(tl.sum(f * f, 1) / K + eps)
    else:
        return tl.full([RP], 1.0, tl.float32)


@triton.jit
def _normed_row_m(x, s_x, m, b_nw, rstd, o_m, K, BK: tl.constexpr, NORM: tl.constexpr):
    """Row m of x in fp32, under NORM RMSNorm-ed with weight b_nw (fp32 [BK]) and its rstd, and rounded to x's
    dtype first as the norm layer's output is (tiles._normed_row's arithmetic)."""
    cols = tl.arange(0, BK)
    b_x = tl.load(x + m * s_x + cols, mask=cols < K, other=0.0)
    if NORM:
        b_x = (b_x.to(tl.float32) * tl.sum(tl.where(o_m == m, rstd, 0.0), 0) * b_nw).to(x.dtype.element_ty)
    return b_x.to(tl.float32)


@triton.jit
def _row(t, pick):
    """The row of t [RP, ...] where pick [RP, 1, ...] is true, in fp32 (a select and a sum over the rows)."""
    return tl.sum(tl.where(pick, t, 0.0).to(tl.float32), 0)


@triton.jit
def _rows_vec(p, s_p, o_m, ROWS: tl.constexpr, cols, mask, RP: tl.constexpr, BN: tl.constexpr,
              LOAD: tl.constexpr):
    """p[m * s_p + cols] for every row m [RP, BN] in fp32 (zeros where masked, or everywhere without LOAD)."""
    if LOAD:
        return tl.load(p + o_m[:, None] * s_p + cols[None, :], mask=(o_m < ROWS)[:, None] & mask[None, :],
                       other=0.0).to(tl.float32)
    else:
        return tl.zeros([RP, BN], tl.float32)


@triton.jit
def _norm_linear_rows_kernel(
    x, s_x, nw, w0, w1, w2, b0, b1, b2, res, s_r, y, s_y, K, N0, N1, N2, eps,
    ROWS: tl.constexpr, RP: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, NORM: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr, PDL: tl.constexpr,
):
    pid = tl.program_id(0)
    G = tl.num_programs(0)
    n_blocks = tl.cdiv(N0, BN) + tl.cdiv(N1, BN) + tl.cdiv(N2, BN)
    o, o_m = tl.arange(0, BN), tl.arange(0, RP)
    w, b, n, row0, col0 = _segment(pid, w0, w1, w2, b0, b1, b2, N0, N1, N2, BN)
    b_w = _load_rows(w, row0 + o, row0 + o < n, K, BK)  # in flight while the rows are normalised
    b_b = _load_vec(b, row0 + o, row0 + o < n, BN, HAS_BIAS)
    cols = tl.arange(0, BK)
    b_nw = _load_vec(nw, cols, cols < K, BK, NORM)
    wait_for_inputs(PDL)
    rstd = _rows_rstd(x, s_x, K, eps, ROWS, RP, BK, NORM)
    b_r = _rows_vec(res + col0, s_r, o_m, ROWS, row0 + o, row0 + o < n, RP, BN, HAS_RES)
    for blk in range(pid, n_blocks, G):
        w, b, n, row0, col0 = _segment(blk + G, w0, w1, w2, b0, b1, b2, N0, N1, N2, BN)
        b_w_next = _load_rows(w, row0 + o, row0 + o < n, K, BK)
        b_b_next = _load_vec(b, row0 + o, row0 + o < n, BN, HAS_BIAS)
        b_r_next = _rows_vec(res + col0, s_r, o_m, ROWS, row0 + o, row0 + o < n, RP, BN, HAS_RES)
        w, b, n, row0, col0 = _segment(blk, w0, w1, w2, b0, b1, b2, N0, N1, N2, BN)
        rows = row0 + o
        b_wf = b_w.to(tl.float32)
        for m in range(ROWS):  # a loop, not unrolled: one row of x live at a time (registers)
            pick = (o_m == m)[:, None]
            b_x = _normed_row_m(x, s_x, m, b_nw, rstd, o_m, K, BK, NORM)
            out = (tl.sum(b_wf * b_x[None, :], 1) + b_b).to(y.dtype.element_ty)  # rounded as F.linear's
            if HAS_RES:
                out = (_row(b_r, pick) + out.to(tl.float32)).to(y.dtype.element_ty)
            tl.store(y + m * s_y + col0 + rows, out, mask=rows < n)
        b_w, b_b, b_r = b_w_next, b_b_next, b_r_next


@triton.jit
def _conv_operands_rows(state, s_sb, s_sk, cw, cb, o_m, ROWS: tl.constexpr, blk, H, BN: tl.constexpr,
                        TAPS: tl.constexpr, TP: tl.constexpr, HAS_CB: tl.constexpr):
    """tiles._conv_operands for every row: the state's taps 1 .. TAPS-1 [RP, BN, TP], then the weights and
    bias, which the rows share."""
    c = blk * BN + tl.arange(0, BN)
    j = tl.arange(0, TP)
    w_old, mask, w_new, b_cb = _conv_weights(cw, cb, c, H, TAPS, TP, BN, HAS_CB)
    old = tl.load(state + o_m[:, None, None] * s_sb + (c[:, None] + j[None, :] * s_sk)[None, :, :],
                  mask=(o_m < ROWS)[:, None, None] & mask[None, :, :], other=0.0)
    return old, w_old, w_new, b_cb


@triton.jit
def _norm_glu_rows_kernel(
    x, s_x, nw, w, b, y, s_y, state, s_sb, s_sk, cw, cb, K, H, eps,
    ROWS: tl.constexpr, RP: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, NORM: tl.constexpr,
    HAS_BIAS: tl.constexpr, CONV: tl.constexpr, TAPS: tl.constexpr, HAS_CB: tl.constexpr, PDL: tl.constexpr,
):
    pid = tl.program_id(0)
    G = tl.num_programs(0)
    n_blocks = tl.cdiv(H, BN)
    dtype = y.dtype.element_ty
    TP: tl.constexpr = triton.next_power_of_2(TAPS)
    o_m, j = tl.arange(0, RP), tl.arange(0, TP)
    rows, mask = _glu_rows(pid, H, BN)
    b_w = _load_rows(w, rows, mask, K, BK)  # in flight while the rows are normalised
    b_b = _load_vec(b, rows, mask, 2 * BN, HAS_BIAS)
    cols = tl.arange(0, BK)
    b_nw = _load_vec(nw, cols, cols < K, BK, NORM)
    wait_for_inputs(PDL)
    rstd = _rows_rstd(x, s_x, K, eps, ROWS, RP, BK, NORM)
    if CONV:
        old, w_old, w_new, b_cb = _conv_operands_rows(state, s_sb, s_sk, cw, cb, o_m, ROWS, pid, H, BN, TAPS, TP,
                                                      HAS_CB)
    for blk in range(pid, n_blocks, G):
        rows, mask = _glu_rows(blk + G, H, BN)
        b_next = _load_rows(w, rows, mask, K, BK)
        b_b_next = _load_vec(b, rows, mask, 2 * BN, HAS_BIAS)
        if CONV:
            old_next, w_old_next, w_new_next, b_cb_next = _conv_operands_rows(
                state, s_sb, s_sk, cw, cb, o_m, ROWS, blk + G, H, BN, TAPS, TP, HAS_CB)
            # Every thread's read of this block's taps (a block ago) precedes every write below: threads
            # holding copies of a channel must not read a shifted tap.
            tl.debug_barrier()
        c = blk * BN + tl.arange(0, BN)
        cm = c < H
        b_wf = b_w.to(tl.float32)
        for m in range(ROWS):  # a loop, not unrolled: one row of x live at a time (registers)
            b_x = _normed_row_m(x, s_x, m, b_nw, rstd, o_m, K, BK, NORM)
            acc = tl.sum(b_wf * b_x[None, :], 1) + b_b
            a, g = tl.split(tl.reshape(acc.to(dtype), [BN, 2]))  # rounded as F.linear's output
            a = a.to(tl.float32)
            g = g.to(tl.float32)
            if CONV:
                # BaseConv's step for row m (as short_conv_step): shift a into its state, conv, silu, gate by b.
                a = a.to(state.dtype.element_ty)
                old_m = _row(old, (o_m == m)[:, None, None])
                conv = tl.sum(old_m * w_old.to(tl.float32), 1) + a.to(tl.float32) * w_new.to(tl.float32) + b_cb
                p_s = state + m * s_sb
                tl.store(p_s + c[:, None] + (j[None, :] - 1) * s_sk, old_m.to(state.dtype.element_ty),
                         mask=cm[:, None] & (j >= 1)[None, :] & (j < TAPS)[None, :])
                tl.store(p_s + c + (TAPS - 1) * s_sk, a, mask=cm)
                out = conv * tl.sigmoid(conv) * g
            else:
                # SwiGLU: up * silu(gate), silu rounded as F.silu's output.
                out = a * (g * tl.sigmoid(g)).to(dtype).to(tl.float32)
            tl.store(y + m * s_y + c, out.to(dtype), mask=cm)
        if CONV:
            old, w_old, w_new, b_cb = old_next, w_old_next, w_new_next, b_cb_next
        b_w, b_b = b_next, b_b_next
