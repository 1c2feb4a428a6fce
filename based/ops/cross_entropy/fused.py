"""Fused Triton linear cross-entropy for training: the loss of hidden @ weight^T without its logits in memory.

F.cross_entropy(hidden @ weight.T, targets) writes the [N, V] logits, reads them for the log-softmax, writes
its [N, V] gradient and reads that twice for the two matmuls of the backward: at the MQAR sweep's vocabulary
of 8192 and 64 queries of 256 examples for 4 stacked runs that is 2 GB a tensor, a third of the step. Here the
logits live only in registers, a [BM, BV] tile at a time:

    forward:   per row, an online log-sum-exp over the vocabulary tiles and the target's logit:
               nll = lse - z[target] (0 for ignored rows), lse kept for the backward
    backward:  p = (softmax - onehot(target)) * dnll, recomputed tile by tile (the matmul again, cheap next
               to the memory it saves), dh = p @ W in one kernel (over row blocks), dW = p^T @ h in another
               (over vocabulary blocks): no atomics, the same bits every run

Matmuls as tl.dot: TF32 unless torch's float32 matmul precision is "highest" (as torch's own matmuls).

Stacked runs: hidden comes run after run ([R * RN, D]), the weight per run [R, V, D] and the targets per run
[R, RN] or shared [1, RN]; vmap's runs are folded into the rows (based/ops/vmap_fold.py).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..vmap_fold import KernelBackward, fold_runs, unfold_runs

BLOCK_K = 32


def _blocks(D: int) -> tuple[int, int, int, int]:
    """(BM, BV, BD, num_warps): the [BM, BD] / [BV, BD] accumulators of the backward fit in registers."""
    BD = max(16, triton.next_power_of_2(D))
    return (64, 64, BD, 4) if BD <= 128 else (32, 32, BD, 8)


@triton.jit
def _logits(h_ptr, w_ptr, o_m, m_m, o_v, m_v, D, BM: tl.constexpr, BV: tl.constexpr, BK: tl.constexpr,
            PREC: tl.constexpr):
    """z [BM, BV] = h[o_m] @ w[o_v]^T in fp32."""
    acc = tl.zeros([BM, BV], dtype=tl.float32)
    for k0 in range(0, D, BK):
        o_k = k0 + tl.arange(0, BK)
        m_k = o_k < D
        h = tl.load(h_ptr + o_m.to(tl.int64)[:, None] * D + o_k[None, :], mask=m_m[:, None] & m_k[None, :],
                    other=0.0).to(tl.float32)
        w = tl.load(w_ptr + o_v.to(tl.int64)[:, None] * D + o_k[None, :], mask=m_v[:, None] & m_k[None, :],
                    other=0.0).to(tl.float32)
        acc += tl.dot(h, tl.trans(w), input_precision=PREC)
    return acc


@triton.jit
def _rows(t_ptr, lse_ptr, g_ptr, run, o_m, m_m, RN, s_tr, IGNORE: tl.constexpr):
    """This row block's targets, lse and loss gradient (0 for ignored rows)."""
    tgt = tl.load(t_ptr + run * s_tr + o_m, mask=m_m, other=IGNORE)
    rows = run.to(tl.int64) * RN + o_m
    lse = tl.load(lse_ptr + rows, mask=m_m, other=0.0)
    g = tl.load(g_ptr + rows, mask=m_m, other=0.0).to(tl.float32)
    return tgt, lse, tl.where(tgt != IGNORE, g, 0.0)


@triton.jit
def _fwd_kernel(h, w, t, nll, lse, RN, V, D, s_tr, IGNORE: tl.constexpr, BM: tl.constexpr, BV: tl.constexpr,
                BK: tl.constexpr, PREC: tl.constexpr):
    run = tl.program_id(1)
    o_m = tl.program_id(0) * BM + tl.arange(0, BM)
    m_m = o_m < RN
    h_run, w_run = h + run.to(tl.int64) * RN * D, w + run.to(tl.int64) * V * D
    tgt = tl.load(t + run * s_tr + o_m, mask=m_m, other=IGNORE)
    m_i = tl.full([BM], float("-inf"), dtype=tl.float32)
    s_i = tl.zeros([BM], dtype=tl.float32)
    z_t = tl.zeros([BM], dtype=tl.float32)
    for v0 in range(0, V, BV):
        o_v = v0 + tl.arange(0, BV)
        m_v = o_v < V
        z = _logits(h_run, w_run, o_m, m_m, o_v, m_v, D, BM, BV, BK, PREC)
        z = tl.where(m_v[None, :], z, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(z, axis=1))
        s_i = s_i * tl.exp(m_i - m_new) + tl.sum(tl.exp(z - m_new[:, None]), axis=1)
        m_i = m_new
        z_t += tl.sum(tl.where(o_v[None, :] == tgt[:, None], z, 0.0), axis=1)
    l = m_i + tl.log(s_i)
    rows = run.to(tl.int64) * RN + o_m
    tl.store(lse + rows, l, mask=m_m)
    # A target outside [0, V) (not ignore_index) makes its loss NaN: F.cross_entropy raises there, and a kernel
    # cannot without a host sync (which a CUDA graph would not allow).
    nll_row = tl.where((tgt < 0) | (tgt >= V), float("nan"), l - z_t)
    tl.store(nll + rows, tl.where(tgt != IGNORE, nll_row, 0.0), mask=m_m)


@triton.jit
def _softmax_grad(z, lse, tgt, g, o_v, m_v):
    """(softmax - onehot(target)) * g on a [BM, BV] tile of logits."""
    p = tl.where(m_v[None, :], tl.exp(z - lse[:, None]), 0.0)
    p -= tl.where(o_v[None, :] == tgt[:, None], 1.0, 0.0)
    return p * g[:, None]


@triton.jit
def _dh_kernel(h, w, t, lse, g, dh, RN, V, D, s_tr, IGNORE: tl.constexpr, BM: tl.constexpr, BV: tl.constexpr,
               BK: tl.constexpr, BD: tl.constexpr, PREC: tl.constexpr):
    run = tl.program_id(1)
    o_m = tl.program_id(0) * BM + tl.arange(0, BM)
    m_m = o_m < RN
    o_d = tl.arange(0, BD)
    m_d = o_d < D
    h_run, w_run = h + run.to(tl.int64) * RN * D, w + run.to(tl.int64) * V * D
    tgt, l, gg = _rows(t, lse, g, run, o_m, m_m, RN, s_tr, IGNORE)
    acc = tl.zeros([BM, BD], dtype=tl.float32)
    for v0 in range(0, V, BV):
        o_v = v0 + tl.arange(0, BV)
        m_v = o_v < V
        p = _softmax_grad(_logits(h_run, w_run, o_m, m_m, o_v, m_v, D, BM, BV, BK, PREC), l, tgt, gg, o_v, m_v)
        wv = tl.load(w_run + o_v.to(tl.int64)[:, None] * D + o_d[None, :], mask=m_v[:, None] & m_d[None, :],
                     other=0.0).to(tl.float32)
        acc += tl.dot(p, wv, input_precision=PREC)
    tl.store(dh + (run.to(tl.int64) * RN + o_m)[:, None] * D + o_d[None, :], acc.to(dh.dtype.element_ty),
             mask=m_m[:, None] & m_d[None, :])


@triton.jit
def _dw_kernel(h, w, t, lse, g, dw, RN, V, D, s_tr, IGNORE: tl.constexpr, BM: tl.constexpr, BV: tl.constexpr,
               BK: tl.constexpr, BD: tl.constexpr, PREC: tl.constexpr):
    run = tl.program_id(1)
    o_v = tl.program_id(0) * BV + tl.arange(0, BV)
    m_v = o_v < V
    o_d = tl.arange(0, BD)
    m_d = o_d < D
    h_run, w_run = h + run.to(tl.int64) * RN * D, w + run.to(tl.int64) * V * D
    acc = tl.zeros([BV, BD], dtype=tl.float32)
    for m0 in range(0, RN, BM):
        o_m = m0 + tl.arange(0, BM)
        m_m = o_m < RN
        tgt, l, gg = _rows(t, lse, g, run, o_m, m_m, RN, s_tr, IGNORE)
        p = _softmax_grad(_logits(h_run, w_run, o_m, m_m, o_v, m_v, D, BM, BV, BK, PREC), l, tgt, gg, o_v, m_v)
        hv = tl.load(h_run + o_m.to(tl.int64)[:, None] * D + o_d[None, :], mask=m_m[:, None] & m_d[None, :],
                     other=0.0).to(tl.float32)
        acc += tl.dot(tl.trans(p), hv, input_precision=PREC)
    tl.store(dw + run.to(tl.int64) * V * D + o_v.to(tl.int64)[:, None] * D + o_d[None, :],
             acc.to(dw.dtype.element_ty), mask=m_v[:, None] & m_d[None, :])


def _precision() -> str:
    return "ieee" if torch.get_float32_matmul_precision() == "highest" else "tf32"


def _args(h, w, t):
    """Contiguous h [R RN, D], w [R, V, D], t [1 or R, RN]; R, RN, V, D and the targets' run stride."""
    h, w, t = h.contiguous(), w.contiguous(), t.contiguous()
    R, V, D = w.shape
    RN = h.shape[0] // R
    return h, w, t, R, RN, V, D, (0 if t.shape[0] == 1 else RN)


def _fwd(h, w, t, ignore_index: int):
    h, w, t, R, RN, V, D, s_tr = _args(h, w, t)
    BM, BV, _, warps = _blocks(D)
    nll = torch.empty(R * RN, dtype=torch.float32, device=h.device)
    lse = torch.empty_like(nll)
    _fwd_kernel[(triton.cdiv(RN, BM), R)](h, w, t, nll, lse, RN, V, D, s_tr, IGNORE=ignore_index, BM=BM, BV=BV,
                                          BK=BLOCK_K, PREC=_precision(), num_warps=warps)
    return nll, lse


def _bwd(h, w, t, lse, dnll, ignore_index: int):
    h, w, t, R, RN, V, D, s_tr = _args(h, w, t)
    BM, BV, BD, warps = _blocks(D)
    dnll = dnll.contiguous()
    dh, dw = torch.empty_like(h), torch.empty_like(w)
    consts = dict(IGNORE=ignore_index, BM=BM, BV=BV, BK=BLOCK_K, BD=BD, PREC=_precision(), num_warps=warps)
    _dh_kernel[(triton.cdiv(RN, BM), R)](h, w, t, lse, dnll, dh, RN, V, D, s_tr, **consts)
    _dw_kernel[(triton.cdiv(V, BV), R)](h, w, t, lse, dnll, dw, RN, V, D, s_tr, **consts)
    return dh, dw


def _targets(t: torch.Tensor, in_dim, n: int) -> torch.Tensor:
    """Targets under vmap: shared ones stay one row [1, RN] (read by every run), per-run ones are folded."""
    return t if in_dim is None else fold_runs(t, in_dim, n)


class _LinearCEBackward(KernelBackward):
    """The backward kernels as a Function of their own, so that vmap(grad(...)) batches them too."""

    @staticmethod
    def forward(h, w, t, lse, dnll, ignore_index):
        return _bwd(h, w, t, lse, dnll, ignore_index)

    @staticmethod
    def vmap(info, in_dims, h, w, t, lse, dnll, ignore_index):
        n = info.batch_size
        dh, dw = _LinearCEBackward.apply(fold_runs(h, in_dims[0], n), fold_runs(w, in_dims[1], n),
                                         _targets(t, in_dims[2], n), fold_runs(lse, in_dims[3], n),
                                         fold_runs(dnll, in_dims[4], n), ignore_index)
        return (unfold_runs(dh, n), unfold_runs(dw, n)), (0, 0)


class LinearCE(torch.autograd.Function):
    """(h [N, D], w [R, V, D], t [1 or R, N / R], ignore_index) -> (nll [N] fp32, lse [N])."""

    @staticmethod
    def forward(h, w, t, ignore_index):
        return _fwd(h, w, t, ignore_index)

    @staticmethod
    def setup_context(ctx, inputs, output):
        h, w, t, ctx.ignore_index = inputs
        ctx.mark_non_differentiable(output[1])
        ctx.save_for_backward(h, w, t, output[1])

    @staticmethod
    def backward(ctx, dnll, dlse):
        h, w, t, lse = ctx.saved_tensors
        dh, dw = _LinearCEBackward.apply(h, w, t, lse, dnll, ctx.ignore_index)
        return dh, dw, None, None

    @staticmethod
    def vmap(info, in_dims, h, w, t, ignore_index):
        n = info.batch_size
        nll, lse = LinearCE.apply(fold_runs(h, in_dims[0], n), fold_runs(w, in_dims[1], n),
                                  _targets(t, in_dims[2], n), ignore_index)
        return (unfold_runs(nll, n), unfold_runs(lse, n)), (0, 0)


def fused_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                               ignore_index: int = -100) -> torch.Tensor:
    """F.cross_entropy(hidden @ weight.T, targets, ignore_index=...) (mean over the rows not ignored) as Triton
    kernels that never hold the logits in memory.

    Args:
        hidden: [N, D]; weight: [V, D]; targets: [N], class ids in [0, V) or ignore_index (any other id
            makes the loss NaN).
    """
    nll, _ = LinearCE.apply(hidden, weight.unsqueeze(0), targets.unsqueeze(0), ignore_index)
    return nll.sum() / (targets != ignore_index).sum()


__all__ = ["fused_linear_cross_entropy"]
