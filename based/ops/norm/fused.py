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

Two variants (constexpr flags; the plain kernels' arithmetic is unchanged):

    residual:   y = x + norm(x), dx = dy + the norm's dx (Zoology's identity MLP, x = x + layernorm2(x)).
    gated RMS:  u = x silu(z), y = u rstd(u) w (Mamba-2's gated RMSNorm with one group); backward: du by the
                RMSNorm formula with u, dx = du silu(z), dz = du x silu'(z), silu'(z) = s (1 + z (1 - s)),
                s = sigmoid(z). z is read with a row stride of its own (a slice of in_proj's output, no copy);
                y and dz in z's dtype, dx in x's.

Statistics in fp32; y and dx in x's dtype (gated: y in z's). Runs: w, b are [R, D] and the rows come run after
run (R divides the row count); vmap's runs are folded into the rows (based/ops/vmap_fold.py).
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
    """This block's offsets and mask [BM, BD], its x (fp32) and x centred (LayerNorm) or as is (RMSNorm)."""
    m_d = o_d < D
    m = (o_r < RN)[:, None] & m_d[None, :]
    rows = (run * RN + o_r).to(tl.int64)
    offs = rows[:, None] * D + o_d[None, :]
    x = tl.load(x_ptr + offs, mask=m, other=0.0).to(tl.float32)
    if RMS:
        xc = x
    else:
        xc = tl.where(m, x - (tl.sum(x, axis=1) / D)[:, None], 0.0)
    return offs, m, x, xc


@triton.jit
def _load_gate(z_ptr, run, o_r, o_d, RN, stride_z, m):
    """The gate z of this block (rows stride_z apart), fp32, and sigmoid(z)."""
    rows = (run * RN + o_r).to(tl.int64)
    z = tl.load(z_ptr + rows[:, None] * stride_z + o_d[None, :], mask=m, other=0.0).to(tl.float32)
    return z, tl.sigmoid(z)


@triton.jit
def _fwd_kernel(x, z, w, b, y, RN, D, stride_z, eps, BM: tl.constexpr, BD: tl.constexpr, RMS: tl.constexpr,
                HAS_BIAS: tl.constexpr, RESIDUAL: tl.constexpr, GATED: tl.constexpr):
    run = tl.program_id(1)
    o_r = tl.program_id(0) * BM + tl.arange(0, BM)
    o_d = tl.arange(0, BD)
    offs, m, x_r, xc = _load(x, run, o_r, o_d, RN, D, RMS)
    if GATED:  # RMS only: xc is x
        z_r, s = _load_gate(z, run, o_r, o_d, RN, stride_z, m)
        xc = xc * (z_r * s)
    rstd = 1 / tl.sqrt(tl.sum(xc * xc, axis=1) / D + eps)
    w_r = tl.load(w + run * D + o_d, mask=o_d < D, other=0.0).to(tl.float32)
    out = xc * rstd[:, None] * w_r[None, :]
    if HAS_BIAS:
        out += tl.load(b + run * D + o_d, mask=o_d < D, other=0.0).to(tl.float32)[None, :]
    if RESIDUAL:
        out = x_r + out
    tl.store(y + offs, out.to(y.dtype.element_ty), mask=m)


@triton.jit
def _bwd_kernel(x, z, w, dy, dx, dz, dw_part, db_part, RN, D, stride_z, eps, BM: tl.constexpr, BD: tl.constexpr,
                RMS: tl.constexpr, RESIDUAL: tl.constexpr, GATED: tl.constexpr):
    run = tl.program_id(1)
    blk = tl.program_id(0)
    o_r = blk * BM + tl.arange(0, BM)
    o_d = tl.arange(0, BD)
    m_d = o_d < D
    offs, m, x_r, xc = _load(x, run, o_r, o_d, RN, D, RMS)
    if GATED:  # RMS only: xc is x, becomes u = x silu(z)
        z_r, s = _load_gate(z, run, o_r, o_d, RN, stride_z, m)
        xc = xc * (z_r * s)
    rstd = 1 / tl.sqrt(tl.sum(xc * xc, axis=1) / D + eps)
    xhat = xc * rstd[:, None]
    g = tl.load(dy + offs, mask=m, other=0.0).to(tl.float32)
    w_r = tl.load(w + run * D + o_d, mask=m_d, other=0.0).to(tl.float32)
    wg = g * w_r[None, :]
    inner = wg - xhat * (tl.sum(wg * xhat, axis=1) / D)[:, None]
    if not RMS:
        inner -= (tl.sum(wg, axis=1) / D)[:, None]
    d = inner * rstd[:, None]
    if GATED:
        tl.store(dz + offs, (d * x_r * s * (1 + z_r * (1 - s))).to(dz.dtype.element_ty), mask=m)
        d = d * (z_r * s)
    if RESIDUAL:
        d = g + d
    tl.store(dx + offs, d.to(dx.dtype.element_ty), mask=m)
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


def _gate_rows(z: torch.Tensor | None, x2: torch.Tensor):
    """(z as rows [N, D] with unit stride along D, its row stride): a view where z's rows are evenly spaced
    (a slice of a wider projection), else a copy. Without a gate, x's rows (not read)."""
    if z is None:
        return x2, x2.shape[1]
    z2 = z.reshape(x2.shape)
    if z2.stride(1) != 1 and z2.shape[1] > 1:
        z2 = z2.contiguous()
    return z2, z2.stride(0)


def _fwd(x, z, w, b, eps: float, rms: bool, residual: bool) -> torch.Tensor:
    """x [..., D] (rows run after run), z like x or None (no gate), w and b [R, D] (b None: no bias) -> y
    like x, in z's dtype where gated."""
    x2, D, R, RN, BM, grid = _setup(x, w)
    z2, stride_z = _gate_rows(z, x2)
    y = torch.empty(x2.shape, dtype=z2.dtype, device=x2.device)
    _fwd_kernel[grid](x2, z2, w, w if b is None else b, y, RN, D, stride_z, eps, BM=BM,
                      BD=triton.next_power_of_2(D), RMS=rms, HAS_BIAS=b is not None, RESIDUAL=residual,
                      GATED=z is not None, num_warps=NUM_WARPS)
    return y.view(x.shape)


def _bwd(x, z, w, b, dy, eps: float, rms: bool, residual: bool):
    """(dx, dz or None, dw [R, D], db [R, D] or None) of _fwd's y given dy."""
    w = w.contiguous()  # a weight shared by the runs comes expanded over them
    x2, D, R, RN, BM, grid = _setup(x, w)
    z2, stride_z = _gate_rows(z, x2)
    dy2 = dy.reshape(-1, D).contiguous()
    dx = torch.empty_like(x2)
    dz = dx if z is None else torch.empty(x2.shape, dtype=z2.dtype, device=x2.device)
    dw_part = torch.empty(R, grid[0], D, dtype=torch.float32, device=x.device)
    db_part = torch.empty_like(dw_part)
    _bwd_kernel[grid](x2, z2, w, dy2, dx, dz, dw_part, db_part, RN, D, stride_z, eps, BM=BM,
                      BD=triton.next_power_of_2(D), RMS=rms, RESIDUAL=residual, GATED=z is not None,
                      num_warps=NUM_WARPS)
    db = None if b is None else db_part.sum(1).to(b.dtype)
    return dx.view(x.shape), None if z is None else dz.view(x.shape), dw_part.sum(1).to(w.dtype), db


class _NormBackward(KernelBackward):
    """The backward kernel as a Function of its own, so that vmap(grad(...)) batches it too."""

    @staticmethod
    def forward(x, z, w, b, dy, eps, rms, residual):
        return _bwd(x, z, w, b, dy, eps, rms, residual)

    @staticmethod
    def vmap(info, in_dims, x, z, w, b, dy, eps, rms, residual):
        n = info.batch_size
        # x, z and dy keep the runs as a leading dim of their own (x may have no other dim before D): its rows
        # come run after run all the same. w and b: [1, D] per run -> [k, D].
        dx, dz, dw, db = _NormBackward.apply(
            runs_at(x, in_dims[0], n), runs_at(z, in_dims[1], n), fold_runs(w, in_dims[2], n),
            fold_runs(b, in_dims[3], n), runs_at(dy, in_dims[4], n), eps, rms, residual)
        out = (dx, dz, unfold_runs(dw, n), None if db is None else unfold_runs(db, n))
        return out, (0, None if dz is None else 0, 0, None if db is None else 0)


class Norm(torch.autograd.Function):
    """(x [..., D], z like x or None, w [R, D], b [R, D] or None, eps, rms, residual) -> y; the backward
    recomputes the statistics."""

    @staticmethod
    def forward(x, z, w, b, eps, rms, residual):
        return _fwd(x, z, w.contiguous(), None if b is None else b.contiguous(), eps, rms, residual)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, z, w, b, ctx.eps, ctx.rms, ctx.residual = inputs
        ctx.has_bias = b is not None
        ctx.save_for_backward(x, z, w, b)

    @staticmethod
    def backward(ctx, dy):
        x, z, w, b = ctx.saved_tensors
        dx, dz, dw, db = _NormBackward.apply(x, z, w, b, dy, ctx.eps, ctx.rms, ctx.residual)
        return dx, dz, dw, db if ctx.has_bias else None, None, None, None

    @staticmethod
    def vmap(info, in_dims, x, z, w, b, eps, rms, residual):
        n = info.batch_size
        y = Norm.apply(runs_at(x, in_dims[0], n), runs_at(z, in_dims[1], n), fold_runs(w, in_dims[2], n),
                       fold_runs(b, in_dims[3], n), eps, rms, residual)
        return y, 0


def fused_layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, eps: float,
                     residual: bool = False) -> torch.Tensor:
    """F.layer_norm over the last dim (weight, bias [D]) as Triton kernels; residual: x + that."""
    return Norm.apply(x, None, weight.unsqueeze(0), None if bias is None else bias.unsqueeze(0), eps, False,
                      residual)


def fused_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: bool = False) -> torch.Tensor:
    """F.rms_norm over the last dim (weight [D]) as Triton kernels; residual: x + that."""
    return Norm.apply(x, None, weight.unsqueeze(0), None, eps, True, residual)


def fused_gated_rms_norm(x: torch.Tensor, z: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """rmsnorm(x * silu(z)) * weight over the last dim (weight [D]; one group) in fp32 as Triton kernels,
    y in z's dtype."""
    if x.shape != z.shape:
        raise ValueError(f"x and z must have the same shape, got {tuple(x.shape)} and {tuple(z.shape)}")
    return Norm.apply(x, z, weight.unsqueeze(0), None, eps, True, False)


__all__ = ["fused_layer_norm", "fused_rms_norm", "fused_gated_rms_norm"]
