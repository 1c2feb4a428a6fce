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

Widths D <= 128 (BD, the next power of 2 >= D and >= 16, at most 128) take the whole width in one tile
(ONE_K): the forward and dh programs load their [BM, BD] block of h once, before the vocabulary loop, and
each [BV, BD] tile of W once per step, for the logits z = h W^T (one tl.dot) and, in dh, for p W too; dW's
programs load their W tile once and each h tile once per step, for z = h W^T (as the forward and dh compute
it: the same bits, so that exp(z - lse) agrees with the forward's log-sum-exp at large logits) and p^T h.
Wider hidden states walk D in BK = 32 chunks for the logits (the [BM, BD] / [BV, BD] accumulators leave no
registers for whole-width operands).

Few rows (few programs over the row blocks, e.g. 1024 rows a run x 4 runs at BM 128: 32 programs on an
H100's 132 SMs): the forward and dh split the vocabulary in SPLIT parts, a third grid dim, chosen so that
there are about 2 programs per SM (split_count; BASED_CE_SPLIT=k forces k). Each part writes partials,
merged in PyTorch: (max, sum of exp(z - max), target logit) per row by the log-sum-exp rule, dh as fp32
[SPLIT, N, D] summed over the parts (no atomics: still the same bits every run). dW's grid (vocabulary
blocks x runs, 128 x 4 at BV 64) needs no split.

Tiles: (BM, BV, num_warps, num_stages) per BD, for the forward (FWD_TILES) and the backward (BWD_TILES),
the fastest of `python benchmarks/cross_entropy.py --tiles` on an H100 at BD 64 and 128 (2026-12-07,
benchmarks/results/cross-entropy-tiles-h100-2026-12-07.json). BASED_CE_TILES=BMxBVxWARPS[xSTAGES] (e.g. 128x64x8x2), or
FWD,BWD (e.g. 128x128x8x3,64x64x4x2), read at every call, overrides them at every width;
`python benchmarks/cross_entropy.py --tiles` times alternatives (fwd_ms picks the forward's, bwd_ms the
backward's), to hard-code the best in the tables here.

Matmuls as tl.dot: TF32 unless torch's float32 matmul precision is "highest" (as torch's own matmuls).

Stacked runs: hidden comes run after run ([R * RN, D]), the weight per run [R, V, D] and the targets per run
[R, RN] or shared [1, RN]; vmap's runs are folded into the rows (based/ops/vmap_fold.py).
"""
from __future__ import annotations

import functools
import os
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ..vmap_fold import KernelBackward, fold_runs, unfold_runs

BLOCK_K = 32
ONE_K_MAX = 128  # widest BD whose [BM, BD] / [BV, BD] operands are loaded whole
# BD -> (BM, BV, num_warps, num_stages) of the forward and of the backward (dh and dW): the fastest of the tile
# sweep on an H100 (2c32810, 4 runs, vocabulary 8192, 1k and 16k rows a run), each kernel timed alone. Forward:
# 64 x 64 x 4 warps (BD 64, 16k rows: 0.51 ms against 0.57 at 128 x 128 x 8; BD 128: 0.74 against 0.83 at
# 128 x 64); backward: 128 x 128 x 8 x 2 stages (BD 64: 3.01 against 3.41 at 128 x 64; BD 128: 6.10 against
# 6.73), equal or better at 1k rows too. BD 16 and 32 (not swept) take BD 64's. At BD 128, 128 x 128 x 3 stages
# needs 256 KB of shared memory (227 KB on an H100): 2 stages.
FWD_TILES = {BD: (64, 64, 4, 2) for BD in (16, 32, 64, 128)}
BWD_TILES = {BD: (128, 128, 8, 2) for BD in (16, 32, 64, 128)}
FWD_WIDE, BWD_WIDE = (128, 128, 8, 3), (64, 64, 8, 2)  # BD > ONE_K_MAX: the BK-chunked logits (slower than
# PyTorch's form on an H100, so linear_cross_entropy does not take them: see its docstring)
DEFAULT_SMS = 132  # an H100 SXM's SMs, where no CUDA device is asked (the interpreter)
PROGRAMS_PER_SM = 2  # the vocabulary split's target


class Config(NamedTuple):
    BM: int
    BV: int
    BD: int
    warps: int
    stages: int
    one_k: bool


def parse_tiles(spec: str) -> tuple[int, int, int, int]:
    """"BMxBVxWARPS[xSTAGES]" -> (BM, BV, num_warps, num_stages); stages 2 when left out."""
    try:
        parts = [int(x) for x in spec.strip().lower().split("x")]
    except ValueError:
        parts = []
    if len(parts) == 3:
        parts.append(2)
    if (len(parts) != 4 or min(parts) < 1 or min(parts[:2]) < 16
            or any(x & (x - 1) for x in parts[:3])):
        raise ValueError(f"tiles as BMxBVxWARPS[xSTAGES], BM and BV powers of 2 >= 16, WARPS a power of 2: {spec!r}")
    return tuple(parts)


def config(D: int, backward: bool = False) -> Config:
    """The tiles at width D of the forward or the backward kernels: the tables, or BASED_CE_TILES where set
    ("SPEC" for all three kernels, "FWD_SPEC,BWD_SPEC" for each; read at every call)."""
    BD = max(16, triton.next_power_of_2(D))
    spec = os.environ.get("BASED_CE_TILES")
    if spec:
        specs = spec.split(",")
        if len(specs) > 2:
            raise ValueError(f"BASED_CE_TILES: one spec or FWD,BWD, got {spec!r}")
        tiles = parse_tiles(specs[-1] if backward else specs[0])
    elif BD <= ONE_K_MAX:
        tiles = (BWD_TILES if backward else FWD_TILES)[BD]
    else:
        tiles = BWD_WIDE if backward else FWD_WIDE
    BM, BV, warps, stages = tiles
    return Config(BM, BV, BD, warps, stages, BD <= ONE_K_MAX)


@functools.lru_cache(maxsize=None)
def _sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return DEFAULT_SMS


def split_count(programs: int, vocab_tiles: int, sms: int) -> tuple[int, int]:
    """(SPLIT, vocabulary tiles per part) for a grid of `programs` row blocks x runs: parts of at least 4 tiles
    until there are PROGRAMS_PER_SM programs an SM (1 at large N), or BASED_CE_SPLIT; no part is empty."""
    forced = os.environ.get("BASED_CE_SPLIT")
    if forced:
        if not forced.isdigit() or int(forced) < 1:
            raise ValueError(f"BASED_CE_SPLIT must be a positive number of vocabulary parts, got {forced!r}")
        split = int(forced)
    else:
        split = min(triton.cdiv(PROGRAMS_PER_SM * sms, programs), vocab_tiles // 4)
    split = min(max(split, 1), vocab_tiles)
    per = triton.cdiv(vocab_tiles, split)
    return triton.cdiv(vocab_tiles, per), per


@triton.jit
def _logits(h_ptr, w_ptr, o_m, m_m, o_v, m_v, D, BM: tl.constexpr, BV: tl.constexpr, BK: tl.constexpr,
            PREC: tl.constexpr):
    """z [BM, BV] = h[o_m] @ w[o_v]^T in fp32, D in BK chunks."""
    acc = tl.zeros([BM, BV], dtype=tl.float32)
    for k0 in range(0, D, BK):
        o_k = k0 + tl.arange(0, BK)
        m_k = o_k < D
        h = tl.load(h_ptr + o_m.to(tl.int64)[:, None] * D + o_k[None, :], mask=m_m[:, None] & m_k[None, :],
                    other=0.0).to(tl.float32)
        w = tl.load(w_ptr + o_v.to(tl.int64)[:, None] * D + o_k[None, :], mask=m_v[:, None] & m_k[None, :],
                    other=0.0).to(tl.float32)
        acc = tl.dot(h, tl.trans(w), acc, input_precision=PREC)
    return acc


@triton.jit
def _tile(ptr, o_r, m_r, o_d, m_d, D):
    """Rows o_r of a [*, D] matrix, all BD columns, in fp32: zeros past D and in masked rows."""
    return tl.load(ptr + o_r.to(tl.int64)[:, None] * D + o_d[None, :], mask=m_r[:, None] & m_d[None, :],
                   other=0.0).to(tl.float32)


@triton.jit
def _rows(t_ptr, lse_ptr, g_ptr, run, o_m, m_m, RN, s_tr, IGNORE: tl.constexpr):
    """This row block's targets, lse and loss gradient (0 for ignored rows)."""
    tgt = tl.load(t_ptr + run * s_tr + o_m, mask=m_m, other=IGNORE)
    rows = run.to(tl.int64) * RN + o_m
    lse = tl.load(lse_ptr + rows, mask=m_m, other=0.0)
    g = tl.load(g_ptr + rows, mask=m_m, other=0.0).to(tl.float32)
    return tgt, lse, tl.where(tgt != IGNORE, g, 0.0)


@triton.jit
def _fwd_kernel(h, w, t, nll, lse, part, RN, V, D, s_tr, TPS, IGNORE: tl.constexpr, BM: tl.constexpr,
                BV: tl.constexpr, BK: tl.constexpr, BD: tl.constexpr, ONE_K: tl.constexpr, PARTIAL: tl.constexpr,
                PREC: tl.constexpr):
    """Grid (row blocks, runs, SPLIT): vocabulary tiles [split TPS, (split + 1) TPS). PARTIAL: part [3, SPLIT,
    R RN] gets the running max, the sum of exp(z - max) and the target's logit (0 if not in this part), else
    nll and lse [R RN] their values."""
    run = tl.program_id(1)
    split = tl.program_id(2)
    o_m = tl.program_id(0) * BM + tl.arange(0, BM)
    m_m = o_m < RN
    h_run, w_run = h + run.to(tl.int64) * RN * D, w + run.to(tl.int64) * V * D
    tgt = tl.load(t + run * s_tr + o_m, mask=m_m, other=IGNORE)
    o_d = tl.arange(0, BD)
    m_d = o_d < D
    if ONE_K:
        hb = _tile(h_run, o_m, m_m, o_d, m_d, D)
    m_i = tl.full([BM], float("-inf"), dtype=tl.float32)
    s_i = tl.zeros([BM], dtype=tl.float32)
    z_t = tl.zeros([BM], dtype=tl.float32)
    v_lo = split * TPS * BV
    for v0 in range(v_lo, tl.minimum(V, v_lo + TPS * BV), BV):
        o_v = v0 + tl.arange(0, BV)
        m_v = o_v < V
        if ONE_K:
            z = tl.dot(hb, tl.trans(_tile(w_run, o_v, m_v, o_d, m_d, D)), input_precision=PREC)
        else:
            z = _logits(h_run, w_run, o_m, m_m, o_v, m_v, D, BM, BV, BK, PREC)
        z = tl.where(m_v[None, :], z, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(z, axis=1))
        s_i = s_i * tl.exp(m_i - m_new) + tl.sum(tl.exp(z - m_new[:, None]), axis=1)
        m_i = m_new
        z_t += tl.sum(tl.where(o_v[None, :] == tgt[:, None], z, 0.0), axis=1)
    rows = run.to(tl.int64) * RN + o_m
    if PARTIAL:
        n_rows = tl.num_programs(1).to(tl.int64) * RN
        at = part + split * n_rows + rows
        tl.store(at, m_i, mask=m_m)
        tl.store(at + tl.num_programs(2) * n_rows, s_i, mask=m_m)
        tl.store(at + 2 * tl.num_programs(2) * n_rows, z_t, mask=m_m)
    else:
        l = m_i + tl.log(s_i)
        tl.store(lse + rows, l, mask=m_m)
        # A target outside [0, V) (not ignore_index) makes its loss NaN: F.cross_entropy raises there, and a
        # kernel cannot without a host sync (which a CUDA graph would not allow).
        nll_row = tl.where((tgt < 0) | (tgt >= V), float("nan"), l - z_t)
        tl.store(nll + rows, tl.where(tgt != IGNORE, nll_row, 0.0), mask=m_m)


@triton.jit
def _softmax_grad(z, lse, tgt, g, o_v, m_v):
    """(softmax - onehot(target)) * g on a [BM, BV] tile of logits."""
    p = tl.where(m_v[None, :], tl.exp(z - lse[:, None]), 0.0)
    p -= tl.where(o_v[None, :] == tgt[:, None], 1.0, 0.0)
    return p * g[:, None]


@triton.jit
def _dh_kernel(h, w, t, lse, g, dh, RN, V, D, s_tr, TPS, IGNORE: tl.constexpr, BM: tl.constexpr,
               BV: tl.constexpr, BK: tl.constexpr, BD: tl.constexpr, ONE_K: tl.constexpr, PREC: tl.constexpr):
    """Grid (row blocks, runs, SPLIT): dh [SPLIT, R RN, D] of vocabulary tiles [split TPS, (split + 1) TPS)."""
    run = tl.program_id(1)
    split = tl.program_id(2)
    o_m = tl.program_id(0) * BM + tl.arange(0, BM)
    m_m = o_m < RN
    o_d = tl.arange(0, BD)
    m_d = o_d < D
    h_run, w_run = h + run.to(tl.int64) * RN * D, w + run.to(tl.int64) * V * D
    tgt, l, gg = _rows(t, lse, g, run, o_m, m_m, RN, s_tr, IGNORE)
    if ONE_K:
        hb = _tile(h_run, o_m, m_m, o_d, m_d, D)
    acc = tl.zeros([BM, BD], dtype=tl.float32)
    v_lo = split * TPS * BV
    for v0 in range(v_lo, tl.minimum(V, v_lo + TPS * BV), BV):
        o_v = v0 + tl.arange(0, BV)
        m_v = o_v < V
        wv = _tile(w_run, o_v, m_v, o_d, m_d, D)
        if ONE_K:
            z = tl.dot(hb, tl.trans(wv), input_precision=PREC)
        else:
            z = _logits(h_run, w_run, o_m, m_m, o_v, m_v, D, BM, BV, BK, PREC)
        acc = tl.dot(_softmax_grad(z, l, tgt, gg, o_v, m_v), wv, acc, input_precision=PREC)
    n_rows = tl.num_programs(1).to(tl.int64) * RN
    rows = split * n_rows + run.to(tl.int64) * RN + o_m
    tl.store(dh + rows[:, None] * D + o_d[None, :], acc.to(dh.dtype.element_ty), mask=m_m[:, None] & m_d[None, :])


@triton.jit
def _dw_kernel(h, w, t, lse, g, dw, RN, V, D, s_tr, IGNORE: tl.constexpr, BM: tl.constexpr, BV: tl.constexpr,
               BK: tl.constexpr, BD: tl.constexpr, ONE_K: tl.constexpr, PREC: tl.constexpr):
    """Grid (vocabulary blocks, runs)."""
    run = tl.program_id(1)
    o_v = tl.program_id(0) * BV + tl.arange(0, BV)
    m_v = o_v < V
    o_d = tl.arange(0, BD)
    m_d = o_d < D
    h_run, w_run = h + run.to(tl.int64) * RN * D, w + run.to(tl.int64) * V * D
    if ONE_K:
        wb = _tile(w_run, o_v, m_v, o_d, m_d, D)
    acc = tl.zeros([BV, BD], dtype=tl.float32)
    for m0 in range(0, RN, BM):
        o_m = m0 + tl.arange(0, BM)
        m_m = o_m < RN
        tgt, l, gg = _rows(t, lse, g, run, o_m, m_m, RN, s_tr, IGNORE)
        hv = _tile(h_run, o_m, m_m, o_d, m_d, D)
        # z as the forward computed it (h W^T, not W h^T, which would spare p's transpose): the same bits, so
        # that exp(z - lse) at a large logit agrees with the forward's log-sum-exp
        if ONE_K:
            z = tl.dot(hv, tl.trans(wb), input_precision=PREC)
        else:
            z = _logits(h_run, w_run, o_m, m_m, o_v, m_v, D, BM, BV, BK, PREC)
        acc = tl.dot(tl.trans(_softmax_grad(z, l, tgt, gg, o_v, m_v)), hv, acc, input_precision=PREC)
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


def _plan(h, R, RN, V, D, backward: bool):
    """(Config, SPLIT, vocabulary tiles per part) of the forward or the dh kernel."""
    c = config(D, backward)
    split, per = split_count(triton.cdiv(RN, c.BM) * R, triton.cdiv(V, c.BV), _sms(h.device))
    return c, split, per


def _consts(c: Config, ignore_index: int) -> dict:
    return dict(IGNORE=ignore_index, BM=c.BM, BV=c.BV, BK=BLOCK_K, BD=c.BD, ONE_K=c.one_k, PREC=_precision(),
                num_warps=c.warps, num_stages=c.stages)


def _fwd(h, w, t, ignore_index: int):
    h, w, t, R, RN, V, D, s_tr = _args(h, w, t)
    c, split, per = _plan(h, R, RN, V, D, False)
    if split == 1:  # part: unused
        nll = part = torch.empty(R * RN, dtype=torch.float32, device=h.device)
        lse = torch.empty_like(nll)
    else:  # nll and lse: unused
        nll = lse = part = torch.empty(3, split, R * RN, dtype=torch.float32, device=h.device)
    _fwd_kernel[(triton.cdiv(RN, c.BM), R, split)](h, w, t, nll, lse, part, RN, V, D, s_tr, per,
                                                   PARTIAL=split > 1, **_consts(c, ignore_index))
    if split > 1:  # the parts' log-sum-exps merged; the target's logit is in one part, 0 in the others
        m, s, z_t = part.unbind(0)
        top = m.amax(0)
        lse = top + (s * torch.exp(m - top)).sum(0).log()
        tgt = t.expand(R, RN).reshape(-1)
        nll = torch.where((tgt < 0) | (tgt >= V), float("nan"), lse - z_t.sum(0))
        nll = torch.where(tgt != ignore_index, nll, 0.0)
    return nll, lse


def _bwd(h, w, t, lse, dnll, ignore_index: int):
    h, w, t, R, RN, V, D, s_tr = _args(h, w, t)
    c, split, per = _plan(h, R, RN, V, D, True)
    dnll = dnll.contiguous()
    dh = torch.empty_like(h) if split == 1 else torch.empty((split, *h.shape), dtype=torch.float32, device=h.device)
    dw = torch.empty_like(w)
    consts = _consts(c, ignore_index)
    _dh_kernel[(triton.cdiv(RN, c.BM), R, split)](h, w, t, lse, dnll, dh, RN, V, D, s_tr, per, **consts)
    _dw_kernel[(triton.cdiv(V, c.BV), R)](h, w, t, lse, dnll, dw, RN, V, D, s_tr, **consts)
    if split > 1:
        dh = dh.sum(0).to(h.dtype)
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
    if (hidden.dim() != 2 or weight.dim() != 2 or targets.dim() != 1 or hidden.shape[0] != targets.shape[0]
            or hidden.shape[1] != weight.shape[1]):
        raise ValueError(f"hidden [N, D], weight [V, D] and targets [N] needed (linear_cross_entropy takes any "
                         f"leading dims), got {tuple(hidden.shape)}, {tuple(weight.shape)} and {tuple(targets.shape)}")
    nll, _ = LinearCE.apply(hidden, weight.unsqueeze(0), targets.unsqueeze(0), ignore_index)
    return nll.sum() / (targets != ignore_index).sum()


__all__ = ["fused_linear_cross_entropy"]
