"""Triton kernels of norm_linear and norm_glu.

Grid (rows of x, blocks of BN outputs), rows fastest: the programs of one weight block run together and
read it from HBM once (the other rows hit L2). A program loads its BN x K weight rows in BK-wide chunks
(K <= 4096 is one chunk, so every load of the program is in flight at once), multiplies by the
normalised input chunk in fp32 and reduces once at the end.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl


@triton.jit
def _rstd(p_x, K, eps, BK: tl.constexpr):
    """1 / sqrt(mean(x^2) + eps) of the row at p_x."""
    o = tl.arange(0, BK)
    ss = tl.zeros([BK], tl.float32)
    for k0 in range(0, K, BK):
        b_x = tl.load(p_x + k0 + o, mask=k0 + o < K, other=0.0).to(tl.float32)
        ss += b_x * b_x
    return 1.0 / tl.sqrt(tl.sum(ss, 0) / K + eps)


@triton.jit
def _project(p_x, nw, w, rows, row_mask, K, rstd, BR: tl.constexpr, BK: tl.constexpr, NORM: tl.constexpr):
    """fp32 [BR]: the weight rows `rows` of w [*, K] times the row at p_x, normalised (RMSNorm with weight
    nw and factor rstd, rounded to x's dtype as the norm layer's output is) under NORM."""
    o = tl.arange(0, BK)
    p_w = w + rows.to(tl.int64)[:, None] * K
    acc = tl.zeros([BR, BK], tl.float32)
    for k0 in range(0, K, BK):
        cols = k0 + o
        b_x = tl.load(p_x + cols, mask=cols < K, other=0.0)
        if NORM:
            b_nw = tl.load(nw + cols, mask=cols < K, other=0.0).to(tl.float32)
            b_x = (b_x.to(tl.float32) * rstd * b_nw).to(p_x.dtype.element_ty)
        b_w = tl.load(p_w + cols[None, :], mask=row_mask[:, None] & (cols < K)[None, :], other=0.0)
        acc += b_w.to(tl.float32) * b_x.to(tl.float32)[None, :]
    return tl.sum(acc, 1)


@triton.jit
def _norm_linear_kernel(
    x, s_x, nw, w0, w1, w2, b0, b1, b2, res, s_r, y, s_y, K, N0, N1, N2, eps,
    BN: tl.constexpr, BK: tl.constexpr, NORM: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr,
):
    i_m = tl.program_id(0).to(tl.int64)
    i_n = tl.program_id(1)
    # Which of the (up to three) weights this block belongs to (N1 = N2 = 0 when there is one).
    nb0 = tl.cdiv(N0, BN)
    nb1 = tl.cdiv(N1, BN)
    zero = i_n * 0  # scalars that both branches assign must be tensors, not constants
    w, b, n, blk, col0 = w0, b0, zero + N0, i_n, zero
    if i_n >= nb0:
        w, b, n, blk, col0 = w1, b1, zero + N1, i_n - nb0, zero + N0
    if i_n >= nb0 + nb1:
        w, b, n, blk, col0 = w2, b2, zero + N2, i_n - nb0 - nb1, zero + N0 + N1
    p_x = x + i_m * s_x
    rstd = 1.0
    if NORM:
        rstd = _rstd(p_x, K, eps, BK)
    rows = blk * BN + tl.arange(0, BN)
    mask = rows < n
    acc = _project(p_x, nw, w, rows, mask, K, rstd, BN, BK, NORM)
    if HAS_BIAS:
        acc += tl.load(b + rows, mask=mask, other=0.0).to(tl.float32)
    out = acc.to(y.dtype.element_ty)  # rounded as F.linear's output
    if HAS_RES:
        r = tl.load(res + i_m * s_r + col0 + rows, mask=mask, other=0.0)
        out = (r.to(tl.float32) + out.to(tl.float32)).to(y.dtype.element_ty)
    tl.store(y + i_m * s_y + col0 + rows, out, mask=mask)


@triton.jit
def _norm_glu_kernel(
    x, s_x, nw, w, b, y, s_y, state, s_sb, s_sk, cw, cb, K, H, eps,
    BN: tl.constexpr, BK: tl.constexpr, NORM: tl.constexpr, HAS_BIAS: tl.constexpr, CONV: tl.constexpr,
    TAPS: tl.constexpr, HAS_CB: tl.constexpr,
):
    i_m = tl.program_id(0).to(tl.int64)
    i_n = tl.program_id(1)
    # The a and b rows of each channel interleaved, so one pass reads both and a split separates them.
    r = tl.arange(0, 2 * BN)
    rows = (r % 2) * H + i_n * BN + r // 2
    p_x = x + i_m * s_x
    rstd = 1.0
    if NORM:
        rstd = _rstd(p_x, K, eps, BK)
    mask = i_n * BN + r // 2 < H
    acc = _project(p_x, nw, w, rows, mask, K, rstd, 2 * BN, BK, NORM)
    if HAS_BIAS:
        acc += tl.load(b + rows, mask=mask, other=0.0).to(tl.float32)
    dtype = y.dtype.element_ty
    a, g = tl.split(tl.reshape(acc.to(dtype), [BN, 2]))  # rounded as F.linear's output
    a = a.to(tl.float32)
    g = g.to(tl.float32)
    c = i_n * BN + tl.arange(0, BN)
    cm = c < H
    if CONV:
        # BaseConv's step (as short_conv_step): shift a into the tap-major state, conv, silu, gate by b.
        p_s = state + i_m * s_sb + c
        a = a.to(state.dtype.element_ty)
        conv = a.to(tl.float32) * tl.load(cw + c * TAPS + TAPS - 1, mask=cm, other=0.0).to(tl.float32)
        for j in tl.static_range(TAPS - 1):
            tap = tl.load(p_s + (j + 1) * s_sk, mask=cm, other=0.0)
            conv += tap.to(tl.float32) * tl.load(cw + c * TAPS + j, mask=cm, other=0.0).to(tl.float32)
            # Tap j + 1 moves to j. Every thread's read of tap j (the step before) precedes every write
            # of it: threads holding copies of a channel must not read a tap already shifted.
            tl.debug_barrier()
            tl.store(p_s + j * s_sk, tap, mask=cm)
        tl.store(p_s + (TAPS - 1) * s_sk, a, mask=cm)
        if HAS_CB:
            conv += tl.load(cb + c, mask=cm, other=0.0).to(tl.float32)
        out = conv * tl.sigmoid(conv) * g
    else:
        # SwiGLU: up * silu(gate), silu rounded as F.silu's output.
        out = a * (g * tl.sigmoid(g)).to(dtype).to(tl.float32)
    tl.store(y + i_m * s_y + c, out.to(dtype), mask=cm)


def _blocks(K: int) -> int:
    return min(triton.next_power_of_2(K), 4096)


def _warps(rows: int, BK: int) -> int:
    # About 64 weight values per thread: a program's whole tile in flight, without spilling.
    return max(1, min(16, rows * BK // 2048))


# Weight rows per program (norm_glu: channels, each an a and a b row); measured, see NOTES-kernels. The
# interpreter (CPU tests) runs programs one after another at milliseconds each: fewer, larger ones there.
BLOCK_N = 32 if os.environ.get("TRITON_INTERPRET") == "1" else 4


@torch.compiler.disable
def triton_norm_linear(x, weights, biases, norm_weight, eps, residual, block_n: int = BLOCK_N, num_warps=None):
    M, K = x.shape
    Ns = [w.shape[0] for w in weights]
    out = x.new_empty(M, sum(Ns))
    if M == 0 or out.shape[1] == 0:
        return out if residual is None else out.copy_(residual)
    if any(bb is not None for bb in biases):  # a missing bias among present ones: zeros
        biases = [bb if bb is not None else ww.new_zeros(ww.shape[0]) for ww, bb in zip(weights, biases)]
    pad = 3 - len(weights)
    w = list(weights) + [weights[0]] * pad
    b = [bb if bb is not None else w[0] for bb in biases]
    b += [b[0]] * pad
    BK = _blocks(K)
    grid = (M, sum(triton.cdiv(n, block_n) for n in Ns))
    _norm_linear_kernel[grid](
        x, x.stride(0), norm_weight if norm_weight is not None else x, *w, *b,
        residual if residual is not None else x, residual.stride(0) if residual is not None else 0,
        out, out.stride(0), K, *(Ns + [0] * pad), eps,
        BN=block_n, BK=BK, NORM=norm_weight is not None, HAS_BIAS=biases[0] is not None,
        HAS_RES=residual is not None, num_warps=num_warps or _warps(block_n, BK),
    )
    return out


@torch.compiler.disable
def triton_norm_glu(x, weight, bias, norm_weight, eps, conv_state, conv_weight, conv_bias,
                    block_n: int = BLOCK_N, num_warps=None):
    M, K = x.shape
    H = weight.shape[0] // 2
    out = x.new_empty(M, H)
    if M == 0 or H == 0:
        return out
    conv = conv_state is not None
    taps = conv_state.transpose(1, 2) if conv else None  # [rows, taps, H], contiguous rows
    cw = conv_weight.contiguous() if conv else x
    BK = _blocks(K)
    _norm_glu_kernel[(M, triton.cdiv(H, block_n))](
        x, x.stride(0), norm_weight if norm_weight is not None else x, weight, bias if bias is not None else x,
        out, out.stride(0), taps if conv else x, taps.stride(0) if conv else 0, taps.stride(1) if conv else 0,
        cw, conv_bias if conv and conv_bias is not None else x, K, H, eps,
        BN=block_n, BK=BK, NORM=norm_weight is not None, HAS_BIAS=bias is not None, CONV=conv,
        TAPS=conv_weight.shape[1] if conv else 1, HAS_CB=conv and conv_bias is not None,
        num_warps=num_warps or _warps(2 * block_n, BK),
    )
    return out
