"""Fused Triton LayerNorm and RMSNorm for training, with weights per stacked run and a vmap rule.

PyTorch fuses a norm where its weight is one tensor; under torch.func.vmap over stacked runs (the MQAR sweep:
every run its own weight) the batching rule normalises without the affine part and applies each run's weight
and bias as broadcast multiply-adds, with their backward as further elementwise kernels and reductions. Here
rows of any run go through one kernel each way:

    forward:  y = xhat * w + b,  xhat = (x - mean) * rstd  (RMSNorm: xhat = x * rstd, no mean, no bias)
    backward: dx = rstd (w dy - mean(w dy) - xhat mean(w dy xhat))   (RMSNorm: without the mean(w dy) term),
              dw = sum over rows of dy xhat, db = sum of dy: per-block partial sums, added in PyTorch (no
              atomics: the same bits every run). The backward recomputes mean and rstd from x, so autograd
              keeps x, w and b only.

Statistics in fp32; y and dx in x's dtype. Runs: w, b are [R, D] and the rows come run after run (R divides
the row count); vmap's runs are folded into the rows (based/ops/vmap_fold.py).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..vmap_fold import KernelBackward, fold_runs, runs_at, unfold_runs

NUM_WARPS = 4


def _rows_per_block(D: int) -> int:
    return max(1, min(64, 4096 // triton.next_power_of_2(D)))


@triton.jit
def _load(x_ptr, run, o_r, o_d, RN, D, RMS: tl.constexpr):
    """This block's offsets and mask [BM, BD], and its x centred (LayerNorm) or as is (RMSNorm), fp32."""
    m_d = o_d < D
    m = (o_r < RN)[:, None] & m_d[None, :]
    rows = (run * RN + o_r).to(tl.int64)
    offs = rows[:, None] * D + o_d[None, :]
    x = tl.load(x_ptr + offs, mask=m, other=0.0).to(tl.float32)
    if RMS:
        xc = x
    else:
        xc = tl.where(m, x - (tl.sum(x, axis=1) / D)[:, None], 0.0)
    return offs, m, xc


@triton.jit
def _fwd_kernel(x, w, b, y, RN, D, eps, BM: tl.constexpr, BD: tl.constexpr, RMS: tl.constexpr,
                HAS_BIAS: tl.constexpr):
    run = tl.program_id(1)
    o_r = tl.program_id(0) * BM + tl.arange(0, BM)
    o_d = tl.arange(0, BD)
    offs, m, xc = _load(x, run, o_r, o_d, RN, D, RMS)
    rstd = 1 / tl.sqrt(tl.sum(xc * xc, axis=1) / D + eps)
    w_r = tl.load(w + run * D + o_d, mask=o_d < D, other=0.0).to(tl.float32)
    out = xc * rstd[:, None] * w_r[None, :]
    if HAS_BIAS:
        out += tl.load(b + run * D + o_d, mask=o_d < D, other=0.0).to(tl.float32)[None, :]
    tl.store(y + offs, out.to(y.dtype.element_ty), mask=m)


@triton.jit
def _bwd_kernel(x, w, dy, dx, dw_part, db_part, RN, D, eps, BM: tl.constexpr, BD: tl.constexpr,
                RMS: tl.constexpr):
    run = tl.program_id(1)
    blk = tl.program_id(0)
    o_r = blk * BM + tl.arange(0, BM)
    o_d = tl.arange(0, BD)
    m_d = o_d < D
    offs, m, xc = _load(x, run, o_r, o_d, RN, D, RMS)
    rstd = 1 / tl.sqrt(tl.sum(xc * xc, axis=1) / D + eps)
    xhat = xc * rstd[:, None]
    g = tl.load(dy + offs, mask=m, other=0.0).to(tl.float32)
    w_r = tl.load(w + run * D + o_d, mask=m_d, other=0.0).to(tl.float32)
    wg = g * w_r[None, :]
    inner = wg - xhat * (tl.sum(wg * xhat, axis=1) / D)[:, None]
    if not RMS:
        inner -= (tl.sum(wg, axis=1) / D)[:, None]
    tl.store(dx + offs, (inner * rstd[:, None]).to(dx.dtype.element_ty), mask=m)
    part = (run * tl.num_programs(0) + blk).to(tl.int64) * D
    tl.store(dw_part + part + o_d, tl.sum(g * xhat, axis=0), mask=m_d)
    tl.store(db_part + part + o_d, tl.sum(g, axis=0), mask=m_d)


def _setup(x: torch.Tensor, w: torch.Tensor):
    D = x.shape[-1]
    x2 = x.reshape(-1, D).contiguous()
    R = w.shape[0]
    RN = x2.shape[0] // R
    BM = _rows_per_block(D)
    return x2, D, R, RN, BM, (triton.cdiv(RN, BM), R)


def _fwd(x, w, b, eps: float, rms: bool) -> torch.Tensor:
    """x [..., D] (rows run after run), w and b [R, D] (b None: no bias) -> y like x."""
    x2, D, R, RN, BM, grid = _setup(x, w)
    y = torch.empty_like(x2)
    _fwd_kernel[grid](x2, w, w if b is None else b, y, RN, D, eps, BM=BM, BD=triton.next_power_of_2(D), RMS=rms,
                      HAS_BIAS=b is not None, num_warps=NUM_WARPS)
    return y.view(x.shape)


def _bwd(x, w, b, dy, eps: float, rms: bool):
    """(dx, dw [R, D], db [R, D] or None) of _fwd's y given dy."""
    w = w.contiguous()  # a weight shared by the runs comes expanded over them
    x2, D, R, RN, BM, grid = _setup(x, w)
    dy2 = dy.reshape(-1, D).contiguous()
    dx = torch.empty_like(x2)
    dw_part = torch.empty(R, grid[0], D, dtype=torch.float32, device=x.device)
    db_part = torch.empty_like(dw_part)
    _bwd_kernel[grid](x2, w, dy2, dx, dw_part, db_part, RN, D, eps, BM=BM, BD=triton.next_power_of_2(D), RMS=rms,
                      num_warps=NUM_WARPS)
    db = None if b is None else db_part.sum(1).to(b.dtype)
    return dx.view(x.shape), dw_part.sum(1).to(w.dtype), db


class _NormBackward(KernelBackward):
    """The backward kernel as a Function of its own, so that vmap(grad(...)) batches it too."""

    @staticmethod
    def forward(x, w, b, dy, eps, rms):
        return _bwd(x, w, b, dy, eps, rms)

    @staticmethod
    def vmap(info, in_dims, x, w, b, dy, eps, rms):
        n = info.batch_size
        # x and dy keep the runs as a leading dim of their own (x may have no other dim before D): its rows
        # come run after run all the same. w and b: [1, D] per run -> [k, D].
        dx, dw, db = _NormBackward.apply(runs_at(x, in_dims[0], n), fold_runs(w, in_dims[1], n),
                                         fold_runs(b, in_dims[2], n), runs_at(dy, in_dims[3], n), eps, rms)
        out = (dx, unfold_runs(dw, n), None if db is None else unfold_runs(db, n))
        return out, (0, 0, None if db is None else 0)


class Norm(torch.autograd.Function):
    """(x [..., D], w [R, D], b [R, D] or None, eps, rms) -> y; the backward recomputes the statistics."""

    @staticmethod
    def forward(x, w, b, eps, rms):
        return _fwd(x, w.contiguous(), None if b is None else b.contiguous(), eps, rms)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, w, b, ctx.eps, ctx.rms = inputs
        ctx.has_bias = b is not None
        ctx.save_for_backward(x, w, b)

    @staticmethod
    def backward(ctx, dy):
        x, w, b = ctx.saved_tensors
        dx, dw, db = _NormBackward.apply(x, w, b, dy, ctx.eps, ctx.rms)
        return dx, dw, db if ctx.has_bias else None, None, None

    @staticmethod
    def vmap(info, in_dims, x, w, b, eps, rms):
        n = info.batch_size
        y = Norm.apply(runs_at(x, in_dims[0], n), fold_runs(w, in_dims[1], n), fold_runs(b, in_dims[2], n),
                       eps, rms)
        return y, 0


def fused_layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, eps: float) -> torch.Tensor:
    """F.layer_norm over the last dim (weight, bias [D]) as Triton kernels."""
    return Norm.apply(x, weight.unsqueeze(0), None if bias is None else bias.unsqueeze(0), eps, False)


def fused_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """F.rms_norm over the last dim (weight [D]) as Triton kernels."""
    return Norm.apply(x, weight.unsqueeze(0), None, eps, True)


__all__ = ["fused_layer_norm", "fused_rms_norm"]
