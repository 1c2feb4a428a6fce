"""Decayed linear attention for training in Triton: one fused kernel forward, one backward, no initial or final
state (the MQAR sweep's Lightning and Mamba-2 layers), and a vmap rule so that torch.func's stacked runs cost
one launch.

A program owns one sequence and head, a block of key columns (and of value columns in the forward) and walks T
in chunks of C tokens, its block of the state S [dk, dv] in fp32 registers. Per chunk, b = cumsum(g) from the
chunk's start and D[i, j] = exp(b_i - b_j) for j <= i, 0 above (see README.md):

    O  = scale ((Q K^T * D) V + diag(exp(b)) Q S)
    S <- exp(b_C) S + (K * exp(b_C - b))^T V

Every exponent is <= 0: b is a cumsum of values <= 0, so b_i - b_j <= 0 for j <= i (the cumsum is monotone in
floating point too), and the entries above the diagonal are set to -inf before exp. Nothing of size
[B, H, n, C, C] is kept: backward recomputes the chunk states.

Backward (dO pre-multiplied by scale, dA = (dO V^T) * D, A = (Q K^T) * D), per block of value columns:
    forward sweep:  dQ = dA K + diag(exp(b)) dO S^T                                     (S entering the chunk)
    reverse sweep:  dK = dA^T Q + diag(exp(b_C - b)) V dS^T,  dV = A^T dO + diag(exp(b_C - b)) K dS
                    dS <- exp(b_C) dS + (Q * exp(b))^T dO                               (dS leaving the chunk)
With G_t the global cumsum of g, o_t = scale sum_{s<=t} exp(G_t - G_s) (q_t . k_s) v_s, so
dL/dG_t = q_t . dq_t - k_t . dk_t and dg_t = sum_{s>=t} dL/dG_s (a reverse cumsum over T, in PyTorch). The
s = t terms of the two dot products are equal, so dG is formed without them (no cancellation of O(1) terms).

Tensors are taken as [R, B, T, H, D] with any strides but D's (1): R stacks vmapped runs, and a shared input
(vmap in_dims None) or a constant decay [H] is a stride-0 view, never copied.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..vmap_fold import KernelBackward, fold_runs, unfold_runs

# tl.dot's input_precision for fp32 operands; None follows torch.get_float32_matmul_precision(), as the chunked
# form's matmuls do: "highest" (PyTorch's default) -> "tf32x3", three TF32 products, about fp32 accuracy; "high"
# or "medium" (the MQAR trainers set "high" on CUDA) -> "tf32", one product, ~1e-3 relative, fewer registers.
PRECISION = None
# Launch settings, chosen from ptxas's register counts for sm_90 (no GPU timing yet; benchmarks/decay_attn.py
# --sweep times the alternatives). Every dot's operands hold a full [16 rows, BK] slab per warp (mma v2), doubled
# by tf32x3's high and low halves, so registers grow with BK and C: at BK <= 64, C = 16 compiles with at most
# ~100 bytes of spills a thread (C = 32: 350 to 2100 in the backward; C = 64: 1900 to 2800), while a whole dk of
# 128 spilled ~440 bytes and of 256 ~5 KB: wider dk is split into blocks of MAX_BK, a program each, whose shares
# of o (and dV, q . dq, k . dk) are summed after. Triton's default 3 pipeline stages took up to 160 KB of shared
# memory.
CHUNK = None  # C: tokens per chunk; None: 16
TILE = 4096  # BK * BV, the fp32 state block a program keeps in registers
MAX_BK = 64  # wider dk runs in blocks of MAX_BK, a program each
NUM_WARPS = None  # None: 4 for tiles up to 1024 elements (BK * BV), else 8
NUM_STAGES = 1  # software pipelining of the chunk loop's loads (None: Triton's default)


@triton.jit
def _chunk(q, k, v, g, t, T, offs_k, offs_v, mask_k, mask_v, sq_t, sk_t, sv_t, sg_t, causal, last):
    """Tokens t of one chunk as fp32: q, k [C, BK], v [C, BV], b = cumsum(g) from the chunk's start [C], its last
    value b_C, and the decays exp(b_i - b_j) for j <= i (0 above: -inf before exp, so every exponent is <= 0).
    Tokens past T load q = k = v = 0 and g = 0: they add nothing to a state and their rows are not stored."""
    mask_t = t < T
    mask_tk = mask_t[:, None] & mask_k[None, :]
    mask_tv = mask_t[:, None] & mask_v[None, :]
    bq = tl.load(q + t[:, None] * sq_t + offs_k[None, :], mask=mask_tk, other=0.0).to(tl.float32)
    bk = tl.load(k + t[:, None] * sk_t + offs_k[None, :], mask=mask_tk, other=0.0).to(tl.float32)
    bv = tl.load(v + t[:, None] * sv_t + offs_v[None, :], mask=mask_tv, other=0.0).to(tl.float32)
    bb = tl.cumsum(tl.load(g + t * sg_t, mask=mask_t, other=0.0).to(tl.float32), 0)
    b_last = tl.sum(tl.where(last, bb, 0.0), 0)
    decay = tl.exp(tl.where(causal, bb[:, None] - bb[None, :], float("-inf")))
    return mask_t, mask_tk, mask_tv, bq, bk, bv, bb, b_last, decay


@triton.jit
def _fwd_kernel(
    q, k, v, g, o,
    sq_r, sq_b, sq_t, sq_h, sk_r, sk_b, sk_t, sk_h, sv_r, sv_b, sv_t, sv_h, sg_r, sg_b, sg_t, sg_h,
    T, B, H, DK, DV, scale, so_k,
    C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, NV: tl.constexpr, PREC: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    h = pid % H
    b = (pid // H) % B
    r = pid // (H * B)
    iv = tl.program_id(1) % NV
    ik = (tl.program_id(1) // NV).to(tl.int64)
    offs_c = tl.arange(0, C)
    offs_k = ik * BK + tl.arange(0, BK)
    offs_v = iv * BV + tl.arange(0, BV)
    mask_k = offs_k < DK
    mask_v = offs_v < DV
    q += r * sq_r + b * sq_b + h * sq_h
    k += r * sk_r + b * sk_b + h * sk_h
    v += r * sv_r + b * sv_b + h * sv_h
    g += r * sg_r + b * sg_b + h * sg_h
    o += ik * so_k + ((r * B + b) * T * H + h) * DV  # o is [NK, R, B, T, H, DV], contiguous
    causal = offs_c[:, None] >= offs_c[None, :]
    last = offs_c == C - 1
    S = tl.zeros([BK, BV], dtype=tl.float32)
    for c in range(tl.cdiv(T, C)):
        t = c * C + offs_c
        _, _, mask_tv, bq, bk, bv, bb, b_last, decay = _chunk(
            q, k, v, g, t, T, offs_k, offs_v, mask_k, mask_v, sq_t, sk_t, sv_t, sg_t, causal, last)
        A = tl.dot(bq, tl.trans(bk), input_precision=PREC) * decay
        bo = tl.dot(A, bv, input_precision=PREC) + tl.dot(bq * tl.exp(bb)[:, None], S, input_precision=PREC)
        tl.store(o + t[:, None] * H * DV + offs_v[None, :], (scale * bo).to(o.dtype.element_ty), mask=mask_tv)
        kd = bk * tl.exp(b_last - bb)[:, None]
        S = S * tl.exp(b_last) + tl.dot(tl.trans(kd), bv, input_precision=PREC)  # [BK, BV]


@triton.jit
def _bwd_kernel(
    q, k, v, g, do, dq, dk, dv, dgq, dgk,
    sq_r, sq_b, sq_t, sq_h, sk_r, sk_b, sk_t, sk_h, sv_r, sv_b, sv_t, sv_h, sg_r, sg_b, sg_t, sg_h,
    so_r, so_b, so_t, so_h,
    T, B, H, DK, DV, scale, sp_k,
    C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, NV: tl.constexpr, PREC: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    h = pid % H
    b = (pid // H) % B
    r = pid // (H * B)
    ik = tl.program_id(1).to(tl.int64)
    NC = tl.cdiv(T, C)
    offs_c = tl.arange(0, C)
    offs_k = ik * BK + tl.arange(0, BK)
    mask_k = offs_k < DK
    q += r * sq_r + b * sq_b + h * sq_h
    k += r * sk_r + b * sk_b + h * sk_h
    v += r * sv_r + b * sv_b + h * sv_h
    g += r * sg_r + b * sg_b + h * sg_h
    do += r * so_r + b * so_b + h * so_h
    # Outputs are contiguous: dq, dk [R, B, T, H, DK]; this block's share of dV [NK, R, B, T, H, DV], of q . dq
    # and k . dk [NK, R, B, T, H] (sp_k = R B T H).
    rbh = (r * B + b) * T * H + h
    dq += rbh * DK
    dk += rbh * DK
    dv += ik * sp_k * DV + rbh * DV
    dgq += ik * sp_k + rbh
    dgk += ik * sp_k + rbh
    causal = offs_c[:, None] >= offs_c[None, :]
    strict = offs_c[:, None] > offs_c[None, :]
    last = offs_c == C - 1
    # dQ, dK (and q . dq, k . dk) sum over the blocks of value columns: the first block stores, later ones add
    # (NV > 1 only, fp32 buffers; each block ends with a barrier so its stores are seen by the next one's loads).
    for iv in range(NV):
        offs_v = iv * BV + tl.arange(0, BV)
        mask_v = offs_v < DV
        S = tl.zeros([BK, BV], dtype=tl.float32)
        for c in range(NC):
            t = c * C + offs_c
            mask_t, mask_tk, mask_tv, bq, bk, bv, bb, b_last, decay = _chunk(
                q, k, v, g, t, T, offs_k, offs_v, mask_k, mask_v, sq_t, sk_t, sv_t, sg_t, causal, last)
            bdo = scale * tl.load(do + t[:, None] * so_t + offs_v[None, :], mask=mask_tv, other=0.0).to(tl.float32)
            # dA without its diagonal: the s = t terms of q_t . dq_t and k_t . dk_t are equal and would cancel in
            # dG_t, leaving fp32 rounding of O(1) terms where the true dG is tiny (strong decay); added back after.
            dA = tl.where(strict, tl.dot(bdo, tl.trans(bv), input_precision=PREC) * decay, 0.0)  # [C, C]
            bdq = tl.dot(dA, bk, input_precision=PREC) + \
                tl.dot(bdo, tl.trans(S), input_precision=PREC) * tl.exp(bb)[:, None]  # [C, BK]
            bgq = tl.sum(bq * bdq, 1)  # [C]
            bdq += tl.sum(bdo * bv, 1)[:, None] * bk
            if iv > 0:
                bdq += tl.load(dq + t[:, None] * H * DK + offs_k[None, :], mask=mask_tk, other=0.0)
                bgq += tl.load(dgq + t * H, mask=mask_t, other=0.0)
            tl.store(dq + t[:, None] * H * DK + offs_k[None, :], bdq.to(dq.dtype.element_ty), mask=mask_tk)
            tl.store(dgq + t * H, bgq, mask=mask_t)
            kd = bk * tl.exp(b_last - bb)[:, None]
            S = S * tl.exp(b_last) + tl.dot(tl.trans(kd), bv, input_precision=PREC)
        dS = tl.zeros([BK, BV], dtype=tl.float32)  # dL/dS at the end of chunk c, from the chunks after it
        for i in range(NC):
            c = NC - 1 - i
            t = c * C + offs_c
            mask_t, mask_tk, mask_tv, bq, bk, bv, bb, b_last, decay = _chunk(
                q, k, v, g, t, T, offs_k, offs_v, mask_k, mask_v, sq_t, sk_t, sv_t, sg_t, causal, last)
            bdo = scale * tl.load(do + t[:, None] * so_t + offs_v[None, :], mask=mask_tv, other=0.0).to(tl.float32)
            A = tl.dot(bq, tl.trans(bk), input_precision=PREC) * decay  # [C, C]
            dA = tl.where(strict, tl.dot(bdo, tl.trans(bv), input_precision=PREC) * decay, 0.0)
            w = tl.exp(b_last - bb)[:, None]  # [C, 1]: decay from each token to the chunk's end
            bdk = tl.dot(tl.trans(dA), bq, input_precision=PREC) + \
                tl.dot(bv, tl.trans(dS), input_precision=PREC) * w  # [C, BK]
            bdv = tl.dot(tl.trans(A), bdo, input_precision=PREC) + tl.dot(bk, dS, input_precision=PREC) * w
            bgk = tl.sum(bk * bdk, 1)
            bdk += tl.sum(bdo * bv, 1)[:, None] * bq  # the diagonal, as in dQ
            if iv > 0:
                bdk += tl.load(dk + t[:, None] * H * DK + offs_k[None, :], mask=mask_tk, other=0.0)
                bgk += tl.load(dgk + t * H, mask=mask_t, other=0.0)
            tl.store(dk + t[:, None] * H * DK + offs_k[None, :], bdk.to(dk.dtype.element_ty), mask=mask_tk)
            tl.store(dgk + t * H, bgk, mask=mask_t)
            tl.store(dv + t[:, None] * H * DV + offs_v[None, :], bdv.to(dv.dtype.element_ty), mask=mask_tv)
            dS = dS * tl.exp(b_last) + tl.dot(tl.trans(bq * tl.exp(bb)[:, None]), bdo, input_precision=PREC)
        if NV > 1:
            tl.debug_barrier()


def _meta(T: int, dk: int, dv: int) -> dict:
    """Block sizes: dk and dv padded to powers of two >= 16 (tl.dot's least), dk in blocks of at most MAX_BK,
    BV so a state block holds about TILE elements, C tokens a chunk (see the settings above)."""
    BK = max(16, min(MAX_BK, triton.next_power_of_2(dk)))
    BV = max(16, min(triton.next_power_of_2(dv), TILE // BK))
    C = max(16, min(CHUNK or 16, triton.next_power_of_2(T)))
    meta = dict(C=C, BK=BK, BV=BV, num_warps=NUM_WARPS or (4 if BK * BV <= 1024 else 8))
    return meta if NUM_STAGES is None else dict(meta, num_stages=NUM_STAGES)


def _precision() -> str:
    return PRECISION or ("tf32x3" if torch.get_float32_matmul_precision() == "highest" else "tf32")


def _strides(x: torch.Tensor) -> tuple[int, ...]:
    return tuple(x.stride()[:4])


def _unit_last(x: torch.Tensor) -> torch.Tensor:
    """x with stride 1 along its last dim, the one the kernels read as contiguous."""
    return x if x.stride(-1) == 1 or x.shape[-1] == 1 else x.contiguous()


def _fwd(q, k, v, g, scale):
    """q, k [R, B, T, H, dk], v [R, B, T, H, dv], g [R, B, T, H] (any strides) -> o [R, B, T, H, dv]."""
    q, k, v = (_unit_last(x) for x in (q, k, v))
    R, B, T, H, dk = q.shape
    dv = v.shape[-1]
    meta = _meta(T, dk, dv)
    NK, NV = triton.cdiv(dk, meta["BK"]), triton.cdiv(dv, meta["BV"])
    # Blocks of dk each give a share of o (both terms are sums over dk), added in fp32 after.
    o = v.new_empty(NK, R, B, T, H, dv, dtype=v.dtype if NK == 1 else torch.float32)
    _fwd_kernel[(R * B * H, NK * NV)](
        q, k, v, g, o, *_strides(q), *_strides(k), *_strides(v), *g.stride(),
        T, B, H, dk, dv, float(scale), o[0].numel(), NV=NV, PREC=_precision(), **meta,
    )
    return o[0] if NK == 1 else o.sum(0).to(v.dtype)


def _bwd(q, k, v, g, do, scale):
    """Gradients (dq, dk, dv, dg) of _fwd's o given dO; dg per token [R, B, T, H] in g's dtype."""
    q, k, v, do = (_unit_last(x) for x in (q, k, v, do))
    R, B, T, H, dk = q.shape
    dv = v.shape[-1]
    meta = _meta(T, dk, dv)
    NK, NV = triton.cdiv(dk, meta["BK"]), triton.cdiv(dv, meta["BV"])
    # With several blocks of value columns dQ, dK add up in fp32 and are cast after; so do the blocks of dk's
    # shares of dV.
    dq = q.new_empty(R, B, T, H, dk, dtype=q.dtype if NV == 1 else torch.float32)
    dk_ = k.new_empty(R, B, T, H, dk, dtype=k.dtype if NV == 1 else torch.float32)
    dv_ = v.new_empty(NK, R, B, T, H, dv, dtype=v.dtype if NK == 1 else torch.float32)
    dgq, dgk = (q.new_empty(NK, R, B, T, H, dtype=torch.float32) for _ in range(2))
    _bwd_kernel[(R * B * H, NK)](
        q, k, v, g, do, dq, dk_, dv_, dgq, dgk,
        *_strides(q), *_strides(k), *_strides(v), *g.stride(), *_strides(do),
        T, B, H, dk, dv, float(scale), R * B * T * H, NV=NV, PREC=_precision(), **meta,
    )
    # dL/dG_t = q_t . dq_t - k_t . dk_t; g_t enters every G_s with s >= t.
    dg = (dgq - dgk).sum(0).flip(2).cumsum(2).flip(2)
    dv_ = dv_[0] if NK == 1 else dv_.sum(0).to(v.dtype)
    return dq.to(q.dtype), dk_.to(k.dtype), dv_, dg.to(g.dtype)


class _DecayAttnBackward(KernelBackward):
    """The backward kernel as a Function of its own, so that vmap(grad(...)) can batch it too."""

    @staticmethod
    def forward(q, k, v, g, do, scale):
        return _bwd(q, k, v, g, do, scale)

    @staticmethod
    def vmap(info, in_dims, q, k, v, g, do, scale):
        n = info.batch_size
        # The runs become rows of R, [R, ...] -> [n R, ...]: a view where R is 1, the usual case.
        args = [fold_runs(x, d, n) for x, d in zip((q, k, v, g, do), in_dims[:5])]
        grads = _DecayAttnBackward.apply(*args, scale)
        return tuple(unfold_runs(x, n) for x in grads), (0, 0, 0, 0)


class DecayLinearAttn(torch.autograd.Function):
    """(q, k, v [R, B, T, H, D], g [R, B, T, H], scale) -> o [R, B, T, H, dv]."""

    @staticmethod
    def forward(q, k, v, g, scale):
        return _fwd(q, k, v, g, scale)

    @staticmethod
    def setup_context(ctx, inputs, output):
        q, k, v, g, scale = inputs
        ctx.save_for_backward(q, k, v, g)
        ctx.scale = scale

    @staticmethod
    def backward(ctx, do):
        q, k, v, g = ctx.saved_tensors
        return (*_DecayAttnBackward.apply(q, k, v, g, do, ctx.scale), None)

    @staticmethod
    def vmap(info, in_dims, q, k, v, g, scale):
        n = info.batch_size
        args = [fold_runs(x, d, n) for x, d in zip((q, k, v, g), in_dims[:4])]
        return unfold_runs(DecayLinearAttn.apply(*args, scale), n), 0


def fused_decay_linear_attn(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_decay: torch.Tensor, scale: float = 1.0
) -> torch.Tensor:
    """decay_linear_attn without initial or final state, as Triton kernels (forward and backward).

    Args:
        q, k: [B, T, H, dk]; v: [B, T, H, dv]; dk, dv up to 256.
        log_decay: g <= 0, [B, T, H] (per token) or [H] (constant per head, read through a stride-0 view).
        scale: o_t = scale * q_t^T S_t.
    Returns:
        o [B, T, H, dv] in v's dtype (fp32 math).
    """
    B, T, H, _ = q.shape
    g = log_decay.view(1, 1, 1, H).expand(1, B, T, H) if log_decay.dim() == 1 else log_decay.unsqueeze(0)
    return DecayLinearAttn.apply(q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0), g, scale).squeeze(0)


__all__ = ["fused_decay_linear_attn"]
