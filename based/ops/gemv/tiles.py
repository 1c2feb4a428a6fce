"""Tiles shared by the gemv kernels (one row of x, and several rows): normalised inputs, weight rows,
bias-like vectors and the conv operands of a block of output channels."""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _normed_row(p_x, nw, K, eps, BK: tl.constexpr, NORM: tl.constexpr):
    """The row at p_x [BK] (K real), under NORM RMSNorm-ed with weight nw and rounded to x's dtype as the norm
    layer's output is."""
    cols = tl.arange(0, BK)
    b_x = tl.load(p_x + cols, mask=cols < K, other=0.0)
    if NORM:
        f = b_x.to(tl.float32)
        rstd = 1.0 / tl.sqrt(tl.sum(f * f, 0) / K + eps)
        b_nw = tl.load(nw + cols, mask=cols < K, other=0.0).to(tl.float32)
        b_x = (f * rstd * b_nw).to(p_x.dtype.element_ty)
    return b_x


@triton.jit
def _segment(blk, w0, w1, w2, b0, b1, b2, N0, N1, N2, BN: tl.constexpr):
    """Block blk of the concatenated outputs of up to three weights -> (weight, bias, its rows, the block's
    first row in it, its first output column). Blocks past the end get no rows (their loads are masked)."""
    nb0 = tl.cdiv(N0, BN)
    nb1 = tl.cdiv(N1, BN)
    zero = blk * 0  # values that both branches assign must be tensors, not constants
    w, b, n, row0, col0 = w0, b0, zero + N0, blk * BN, zero
    if blk >= nb0:
        w, b, n, row0, col0 = w1, b1, zero + N1, (blk - nb0) * BN, zero + N0
    if blk >= nb0 + nb1:
        w, b, n, row0, col0 = w2, b2, zero + N2, (blk - nb0 - nb1) * BN, zero + N0 + N1
    return w, b, n, row0, col0


@triton.jit
def _load_rows(w, rows, mask, K, BK: tl.constexpr):
    cols = tl.arange(0, BK)
    p = w + rows.to(tl.int64)[:, None] * K + cols[None, :]
    return tl.load(p, mask=mask[:, None] & (cols < K)[None, :], other=0.0)


@triton.jit
def _load_vec(p, rows, mask, BN: tl.constexpr, LOAD: tl.constexpr):
    """p[rows] as fp32 [BN] (zeros where masked, or everywhere without LOAD)."""
    if LOAD:
        return tl.load(p + rows, mask=mask, other=0.0).to(tl.float32)
    else:
        return tl.zeros([BN], tl.float32)


@triton.jit
def _glu_rows(blk, H, BN: tl.constexpr):
    """The a and b weight rows of block blk's channels, interleaved (a0 b0 a1 b1 ...), and their mask."""
    r = tl.arange(0, 2 * BN)
    ch = blk * BN + r // 2
    return (r % 2) * H + ch, ch < H


@triton.jit
def _conv_weights(cw, cb, c, H, TAPS: tl.constexpr, TP: tl.constexpr, BN: tl.constexpr, HAS_CB: tl.constexpr):
    """The conv weights of channels c [BN] that the state's taps 1 .. TAPS-1 meet after the shift [BN, TP]
    (their mask too), the new input's weight [BN] and the bias [BN]."""
    j = tl.arange(0, TP)
    mask = (c < H)[:, None] & (j >= 1)[None, :] & (j < TAPS)[None, :]
    w_old = tl.load(cw + c[:, None] * TAPS + j[None, :] - 1, mask=mask, other=0.0)
    w_new = tl.load(cw + c * TAPS + TAPS - 1, mask=c < H, other=0.0)
    return w_old, mask, w_new, _load_vec(cb, c, c < H, BN, HAS_CB)


@triton.jit
def _conv_operands(p_s, s_sk, cw, cb, blk, H, BN: tl.constexpr, TAPS: tl.constexpr, TP: tl.constexpr,
                   HAS_CB: tl.constexpr):
    """Block blk's conv inputs: the state's taps 1 .. TAPS-1 [BN, TP] (the ones that stay, at their column),
    then _conv_weights' weights and bias."""
    c = blk * BN + tl.arange(0, BN)
    j = tl.arange(0, TP)
    w_old, mask, w_new, b_cb = _conv_weights(cw, cb, c, H, TAPS, TP, BN, HAS_CB)
    old = tl.load(p_s + c[:, None] + j[None, :] * s_sk, mask=mask, other=0.0)
    return old, w_old, w_new, b_cb
