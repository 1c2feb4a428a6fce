"""RWKV-5 attention for training in Triton: one forward kernel, two backward kernels, no initial or final state.

    o_t = r_t^T (S_{t-1} + diag(u) k_t v_t^T),    S_t = diag(w) S_{t-1} + k_t v_t^T,    w = exp(lambda), lambda <= 0

Each program owns one (sequence, head) and walks T one step at a time with its [dk, dv] state (or a block of it) in
fp32 registers. The only exp is w = exp(lambda) itself: no e^{-lambda s} factor, whatever the decay (the reason
chunk.py sums its intra-chunk scores lag by lag). The forward saves nothing but its inputs: the backward's forward
sweep rebuilds the states.

Backward, with dS_t the gradient of the state after token t (dS_{T-1} = 0: no final state is returned):

    dS_{t-1} = diag(w) dS_t + r_t do_t^T                                         (reverse sweep)
    dk_t = dS_t v_t + u * r_t (v_t . do_t),     dv_t = dS_t^T k_t + (r_t . u * k_t) do_t
    dr_t = S_{t-1} do_t + u * k_t (v_t . do_t)                                   (forward sweep)
    du   = sum_t r_t * k_t (v_t . do_t)
    dlambda = sum_t r_t * (P_{t-1} do_t),       P_t = dS_t/dlambda = w * (S_{t-1} + P_{t-1}),  P_0 = 0

dlambda is carried forward (P, the state's tangent along lambda, beside S) rather than taken from GLA's identity
sum_t t r_t dr_t - (t + 1) k_t dk_t: at a strong decay (lambda = -20) that is a difference of O(T) terms whose
true value is ~e^{-20}, all cancellation; P_t is a sum of positive multiples of w^n and loses nothing.
The forward sweep blocks over key channels (dr, du, dlambda are per channel, so nothing is summed across
programs); the reverse sweep owns the whole state (dk sums over dv, dv over dk). du and dlambda are written per
(sequence, head) and summed over the sequences of each run in PyTorch: deterministic, no atomics.

w_log and u come per run, [R, H, dk]: sequence b reads row b // (B / R). That is how torch.func.vmap over k runs
is served: runs are folded into the batch (r, k, v) and into R (w_log, u), one launch for all of them.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

# Forward: dv columns a program (more programs at small batch), and warps. Backward forward sweep: dk rows a
# program. Tuned on an H100/H200 by benchmarks/rwkv_attn.py --sweep.
BLOCK_V_FWD, NUM_WARPS_FWD = 32, 2
BLOCK_K_BWD, NUM_WARPS_DR = 32, 2
NUM_WARPS_DKV = 4


@triton.jit
def _fwd_kernel(
    r_ptr, k_ptr, v_ptr, wlog_ptr, u_ptr, o_ptr, T, H, RB,
    DK: tl.constexpr, DV: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
):
    pid_v = tl.program_id(0)
    pid = tl.program_id(1)  # sequence * H + head
    b, h = pid // H, pid % H
    row = (b // RB) * H + h  # this run's w_log, u
    offs_k = tl.arange(0, BK)
    offs_v = pid_v * BV + tl.arange(0, BV)
    mask_k, mask_v = offs_k < DK, offs_v < DV
    w = tl.exp(tl.load(wlog_ptr + row * DK + offs_k, mask=mask_k, other=0.0).to(tl.float32))  # [BK], exp of <= 0
    u = tl.load(u_ptr + row * DK + offs_k, mask=mask_k, other=0.0).to(tl.float32)
    rk = r_ptr + (b * T * H + h).to(tl.int64) * DK + offs_k  # step t at + t * H * DK
    kk = k_ptr + (b * T * H + h).to(tl.int64) * DK + offs_k
    vv = v_ptr + (b * T * H + h).to(tl.int64) * DV + offs_v
    oo = o_ptr + (b * T * H + h).to(tl.int64) * DV + offs_v
    S = tl.zeros([BK, BV], dtype=tl.float32)
    # The next step's loads are issued before this step's arithmetic, which does not need them.
    r_n = tl.load(rk, mask=mask_k, other=0.0).to(tl.float32)
    k_n = tl.load(kk, mask=mask_k, other=0.0).to(tl.float32)
    v_n = tl.load(vv, mask=mask_v, other=0.0).to(tl.float32)
    for t in range(T):
        r, k, v = r_n, k_n, v_n
        tn = (t + 1) % T  # step 0 again after the last step: an unused load, in bounds
        r_n = tl.load(rk + tn * H * DK, mask=mask_k, other=0.0).to(tl.float32)
        k_n = tl.load(kk + tn * H * DK, mask=mask_k, other=0.0).to(tl.float32)
        v_n = tl.load(vv + tn * H * DV, mask=mask_v, other=0.0).to(tl.float32)
        o = tl.sum(r[:, None] * S, 0) + tl.sum(r * u * k) * v  # [BV]
        tl.store(oo + t * H * DV, o.to(o_ptr.dtype.element_ty), mask=mask_v)
        S = w[:, None] * S + k[:, None] * v[None, :]  # [BK, BV]


@triton.jit
def _bwd_dr_kernel(
    r_ptr, k_ptr, v_ptr, wlog_ptr, u_ptr, do_ptr, dr_ptr, dwp_ptr, dup_ptr, T, H, RB,
    DK: tl.constexpr, DV: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
):
    # Forward sweep over a block of key channels (all of dv): dr, and du, dlambda summed over this sequence.
    pid_k = tl.program_id(0)
    pid = tl.program_id(1)
    b, h = pid // H, pid % H
    row = (b // RB) * H + h
    offs_k = pid_k * BK + tl.arange(0, BK)
    offs_v = tl.arange(0, BV)
    mask_k, mask_v = offs_k < DK, offs_v < DV
    w = tl.exp(tl.load(wlog_ptr + row * DK + offs_k, mask=mask_k, other=0.0).to(tl.float32))
    u = tl.load(u_ptr + row * DK + offs_k, mask=mask_k, other=0.0).to(tl.float32)
    base_k = (b * T * H + h).to(tl.int64) * DK + offs_k
    base_v = (b * T * H + h).to(tl.int64) * DV + offs_v
    S = tl.zeros([BK, BV], dtype=tl.float32)
    P = tl.zeros([BK, BV], dtype=tl.float32)  # dS/dlambda, row by row
    dl = tl.zeros([BK], dtype=tl.float32)
    du = tl.zeros([BK], dtype=tl.float32)
    r_n = tl.load(r_ptr + base_k, mask=mask_k, other=0.0).to(tl.float32)
    k_n = tl.load(k_ptr + base_k, mask=mask_k, other=0.0).to(tl.float32)
    v_n = tl.load(v_ptr + base_v, mask=mask_v, other=0.0).to(tl.float32)
    do_n = tl.load(do_ptr + base_v, mask=mask_v, other=0.0).to(tl.float32)
    for t in range(T):
        r, k, v, do = r_n, k_n, v_n, do_n
        tn = (t + 1) % T  # step 0 again after the last step: an unused load, in bounds
        r_n = tl.load(r_ptr + base_k + tn * H * DK, mask=mask_k, other=0.0).to(tl.float32)
        k_n = tl.load(k_ptr + base_k + tn * H * DK, mask=mask_k, other=0.0).to(tl.float32)
        v_n = tl.load(v_ptr + base_v + tn * H * DV, mask=mask_v, other=0.0).to(tl.float32)
        do_n = tl.load(do_ptr + base_v + tn * H * DV, mask=mask_v, other=0.0).to(tl.float32)
        vdo = tl.sum(v * do)
        dr = tl.sum(S * do[None, :], 1) + u * k * vdo  # [BK]
        tl.store(dr_ptr + base_k + t * H * DK, dr.to(dr_ptr.dtype.element_ty), mask=mask_k)
        dl += r * tl.sum(P * do[None, :], 1)
        du += r * k * vdo
        P = w[:, None] * (S + P)
        S = w[:, None] * S + k[:, None] * v[None, :]
    tl.store(dwp_ptr + pid * DK + offs_k, dl, mask=mask_k)
    tl.store(dup_ptr + pid * DK + offs_k, du, mask=mask_k)


@triton.jit
def _bwd_dkv_kernel(
    r_ptr, k_ptr, v_ptr, wlog_ptr, u_ptr, do_ptr, dk_ptr, dv_ptr, T, H, RB,
    DK: tl.constexpr, DV: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
):
    # Reverse sweep of dS (the whole [dk, dv] state): dk, dv.
    pid = tl.program_id(0)
    b, h = pid // H, pid % H
    row = (b // RB) * H + h
    offs_k = tl.arange(0, BK)
    offs_v = tl.arange(0, BV)
    mask_k, mask_v = offs_k < DK, offs_v < DV
    w = tl.exp(tl.load(wlog_ptr + row * DK + offs_k, mask=mask_k, other=0.0).to(tl.float32))
    u = tl.load(u_ptr + row * DK + offs_k, mask=mask_k, other=0.0).to(tl.float32)
    base_k = (b * T * H + h).to(tl.int64) * DK + offs_k
    base_v = (b * T * H + h).to(tl.int64) * DV + offs_v
    dS = tl.zeros([BK, BV], dtype=tl.float32)
    last = T - 1
    r_n = tl.load(r_ptr + base_k + last * H * DK, mask=mask_k, other=0.0).to(tl.float32)
    k_n = tl.load(k_ptr + base_k + last * H * DK, mask=mask_k, other=0.0).to(tl.float32)
    v_n = tl.load(v_ptr + base_v + last * H * DV, mask=mask_v, other=0.0).to(tl.float32)
    do_n = tl.load(do_ptr + base_v + last * H * DV, mask=mask_v, other=0.0).to(tl.float32)
    for i in range(T):
        t = last - i
        r, k, v, do = r_n, k_n, v_n, do_n
        tp = (t + T - 1) % T  # step T - 1 again after step 0: an unused load, in bounds
        r_n = tl.load(r_ptr + base_k + tp * H * DK, mask=mask_k, other=0.0).to(tl.float32)
        k_n = tl.load(k_ptr + base_k + tp * H * DK, mask=mask_k, other=0.0).to(tl.float32)
        v_n = tl.load(v_ptr + base_v + tp * H * DV, mask=mask_v, other=0.0).to(tl.float32)
        do_n = tl.load(do_ptr + base_v + tp * H * DV, mask=mask_v, other=0.0).to(tl.float32)
        vdo = tl.sum(v * do)
        ruk = tl.sum(r * u * k)
        dk = tl.sum(dS * v[None, :], 1) + u * r * vdo  # [BK]
        dv = tl.sum(dS * k[:, None], 0) + ruk * do  # [BV]
        tl.store(dk_ptr + base_k + t * H * DK, dk.to(dk_ptr.dtype.element_ty), mask=mask_k)
        tl.store(dv_ptr + base_v + t * H * DV, dv.to(dv_ptr.dtype.element_ty), mask=mask_v)
        dS = w[:, None] * dS + r[:, None] * do[None, :]


def _fwd(r, k, v, w_log, u):
    """Plain tensors: r, k [B, T, H, dk], v [B, T, H, dv], w_log, u [R, H, dk] (R runs, R divides B) -> o."""
    B, T, H, dk = r.shape
    dv = v.shape[-1]
    BV = min(triton.next_power_of_2(dv), BLOCK_V_FWD)
    o = torch.empty_like(v)
    _fwd_kernel[(triton.cdiv(dv, BV), B * H)](
        r, k, v, w_log, u, o, T, H, B // w_log.shape[0],
        DK=dk, DV=dv, BK=triton.next_power_of_2(dk), BV=BV, num_warps=NUM_WARPS_FWD,
    )
    return o


def _bwd(r, k, v, w_log, u, do):
    """Gradients (dr, dk, dv, dw_log [R, H, dk], du [R, H, dk]) of _fwd's o given do."""
    B, T, H, dk = r.shape
    dv = v.shape[-1]
    R = w_log.shape[0]
    BK, BV = triton.next_power_of_2(dk), triton.next_power_of_2(dv)
    BKb = min(BK, BLOCK_K_BWD)
    dr, dk_, dv_ = torch.empty_like(r), torch.empty_like(k), torch.empty_like(v)
    dl = r.new_empty(B, H, dk, dtype=torch.float32)  # per sequence: summed over each run's sequences below
    du = r.new_empty(B, H, dk, dtype=torch.float32)
    meta = dict(DK=dk, DV=dv, BV=BV)
    _bwd_dr_kernel[(triton.cdiv(dk, BKb), B * H)](
        r, k, v, w_log, u, do, dr, dl, du, T, H, B // R, BK=BKb, **meta, num_warps=NUM_WARPS_DR)
    _bwd_dkv_kernel[(B * H,)](
        r, k, v, w_log, u, do, dk_, dv_, T, H, B // R, BK=BK, **meta, num_warps=NUM_WARPS_DKV)
    dl = dl.view(R, B // R, H, dk).sum(1)
    du = du.view(R, B // R, H, dk).sum(1)
    return dr, dk_, dv_, dl.to(w_log.dtype), du.to(u.dtype)


def _batched(x, in_dim, k):
    """x with its vmapped dim (k runs; expanded where x is shared by all runs) moved to the front."""
    if in_dim is None:
        return x.unsqueeze(0).expand(k, *x.shape)
    return x.movedim(in_dim, 0)


def _fold(x, in_dim, k):
    """[k, N, ...] -> [k N, ...]: the runs become sequences (r, k, v, do) or rows of R (w_log, u)."""
    x = _batched(x, in_dim, k)
    return x.reshape(x.shape[0] * x.shape[1], *x.shape[2:]).contiguous()


def _unfold(x, k):
    """The inverse of _fold, a view: [k N, ...] -> [k, N, ...]."""
    return x.view(k, x.shape[0] // k, *x.shape[1:])


class _RWKV5Backward(torch.autograd.Function):
    """The backward kernels as a Function of their own, so that vmap(grad(...)) batches them too."""

    @staticmethod
    def forward(r, k, v, w_log, u, do):
        return _bwd(r, k, v, w_log, u, do)

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, *grads):
        raise NotImplementedError("fused_rwkv5_attn has no double backward")

    @staticmethod
    def vmap(info, in_dims, r, k, v, w_log, u, do):
        n = info.batch_size
        grads = _RWKV5Backward.apply(*(_fold(x, d, n) for x, d in zip((r, k, v, w_log, u, do), in_dims)))
        return tuple(_unfold(g, n) for g in grads), (0,) * 5


class RWKV5Attn(torch.autograd.Function):
    """(r, k, v [B, T, H, D], w_log, u [R, H, dk]) -> o; the backward recomputes the states from the inputs."""

    @staticmethod
    def forward(r, k, v, w_log, u):
        return _fwd(*(x.contiguous() for x in (r, k, v, w_log, u)))

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs)

    @staticmethod
    def backward(ctx, do):
        r, k, v, w_log, u = (x.contiguous() for x in ctx.saved_tensors)
        return _RWKV5Backward.apply(r, k, v, w_log, u, do.contiguous())

    @staticmethod
    def vmap(info, in_dims, r, k, v, w_log, u):
        n = info.batch_size
        o = RWKV5Attn.apply(*(_fold(x, d, n) for x, d in zip((r, k, v, w_log, u), in_dims)))
        return _unfold(o, n), 0


def fused_rwkv5_attn(r: torch.Tensor, k: torch.Tensor, v: torch.Tensor, w_log: torch.Tensor,
                     u: torch.Tensor) -> torch.Tensor:
    """rwkv5_attn without initial or final state (see based/ops/rwkv/__init__.py) as Triton kernels.

    Args:
        r, k: [B, T, H, dk]; v: [B, T, H, dv]; w_log, u: [H, dk] (w_log <= 0).
    Returns:
        o [B, T, H, dv] in v's dtype.
    """
    return RWKV5Attn.apply(r, k, v, w_log.unsqueeze(0), u.unsqueeze(0))


__all__ = ["fused_rwkv5_attn"]
