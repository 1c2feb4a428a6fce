"""Triton kernels of norm_linear and norm_glu, and their launch.

Persistent and prefetching: a few programs per SM (as many as fit at once; grid (programs, rows of x)) each
walk the weight in blocks of BN output rows, a whole row (K <= MAX_K) per block. Each program issues its
first block's load before it normalises its row of x, and the next block's load before it reduces the
current one, so two blocks are in flight while it computes; one-block-per-program grids waited on every
load in turn (fc1 of the 1.3b preset at 1.8 TB/s, its LM head at 1.9 TB/s). The normalised row stays in
registers, computed once per program.
"""
from __future__ import annotations

import json
import os

import torch
import triton
import triton.language as tl

from ..argmax.triton import _best_of
from ..launch import grid_sms, interpreted, pdl_options, ticket_counters, wait_for_inputs


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
def _input_row(x, s_x, index, gathered, i_m, pid, nw, K, eps, BK: tl.constexpr, NORM: tl.constexpr,
               GATHER: tl.constexpr):
    """_normed_row of row i_m of x or, under GATHER, of row index[i_m] of the table x (an embedding lookup in
    the kernel), which program 0 also copies to gathered[i_m] (contiguous rows of K) for a later residual."""
    if GATHER:
        p_x = x + tl.load(index + i_m) * s_x
        if pid == 0:
            cols = tl.arange(0, BK)
            tl.store(gathered + i_m * K + cols, tl.load(p_x + cols, mask=cols < K), mask=cols < K)
    else:
        p_x = x + i_m * s_x
    return _normed_row(p_x, nw, K, eps, BK, NORM)


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
def _better(v, cols, n_valid, best_v, best_i):
    """The running (best value, its column) after a block of logits v at columns cols: columns from n_valid on
    (the LM head's padding) never count, NaN counts as +inf and ties go to the lowest column, as argmax_rows."""
    v = tl.where(v != v, float("inf"), v)
    v = tl.where(cols < n_valid, v, float("-inf"))
    b_max = tl.max(v, 0)
    first = tl.min(tl.where(v == b_max, cols, n_valid), 0)
    # A block all -inf still offers its first column, so a row that is -inf everywhere gets column 0.
    better = (b_max > best_v) | ((b_max == best_v) & (first < best_i))
    return tl.where(better, b_max, best_v), tl.where(better, first, best_i)


@triton.jit
def _argmax_ticket(best_v, best_i, part_v, part_i, count, ids, advance, log, L, i_m, pid, G, n_valid,
                   GP: tl.constexpr, ADVANCE: tl.constexpr, LOG: tl.constexpr):
    """Store this program's answer for row i_m; the row's last program to finish (an atomic ticket) writes
    the best of all G answers to ids[i_m] and, under ADVANCE, adds one to advance[i_m] (under LOG after
    writing the id to log[i_m, advance[i_m] % L] too)."""
    tl.store(part_v + i_m * G + pid, best_v)
    tl.store(part_i + i_m * G + pid, best_i)
    # acq_rel: the answers stored above are visible to whichever program takes the last ticket.
    if tl.atomic_add(count + i_m, 1, sem="acq_rel") == G - 1:
        first = _best_of(part_v + i_m * G, part_i + i_m * G, G, n_valid, GP)
        tl.store(ids + i_m, first)
        if ADVANCE:
            pos = tl.load(advance + i_m)
            if LOG:
                tl.store(log + i_m * L + pos % L, first)
            tl.store(advance + i_m, pos + 1)
        tl.store(count + i_m, 0)  # ready for the next launch (ticket_counters)


@triton.jit
def _norm_linear_kernel(
    x, s_x, nw, w0, w1, w2, b0, b1, b2, res, s_r, y, s_y, K, N0, N1, N2, eps,
    n_valid, part_v, part_i, count, ids, advance, log, L, index, gathered,
    BN: tl.constexpr, BK: tl.constexpr, NORM: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr,
    ARGMAX: tl.constexpr, ADVANCE: tl.constexpr, LOG: tl.constexpr, GP: tl.constexpr, GATHER: tl.constexpr,
    PDL: tl.constexpr,
):
    pid = tl.program_id(0)
    G = tl.num_programs(0)
    i_m = tl.program_id(1).to(tl.int64)
    n_blocks = tl.cdiv(N0, BN) + tl.cdiv(N1, BN) + tl.cdiv(N2, BN)
    o = tl.arange(0, BN)
    w, b, n, row0, col0 = _segment(pid, w0, w1, w2, b0, b1, b2, N0, N1, N2, BN)
    b_w = _load_rows(w, row0 + o, row0 + o < n, K, BK)  # in flight while the row is normalised
    b_b = _load_vec(b, row0 + o, row0 + o < n, BN, HAS_BIAS)
    wait_for_inputs(PDL)
    b_x = _input_row(x, s_x, index, gathered, i_m, pid, nw, K, eps, BK, NORM, GATHER).to(tl.float32)
    p_r = res + i_m * s_r
    b_r = _load_vec(p_r + col0, row0 + o, row0 + o < n, BN, HAS_RES)
    best_v = tl.full([], float("-inf"), tl.float32)  # ARGMAX: this program's best logit and its column
    best_i = n_valid
    # Everything a block needs (weight rows, bias, residual) is loaded a block ahead: a load issued where it
    # is used would cost its whole latency on every block.
    for blk in range(pid, n_blocks, G):
        w, b, n, row0, col0 = _segment(blk + G, w0, w1, w2, b0, b1, b2, N0, N1, N2, BN)
        b_w_next = _load_rows(w, row0 + o, row0 + o < n, K, BK)
        b_b_next = _load_vec(b, row0 + o, row0 + o < n, BN, HAS_BIAS)
        b_r_next = _load_vec(p_r + col0, row0 + o, row0 + o < n, BN, HAS_RES)
        w, b, n, row0, col0 = _segment(blk, w0, w1, w2, b0, b1, b2, N0, N1, N2, BN)
        rows = row0 + o
        out = (tl.sum(b_w.to(tl.float32) * b_x[None, :], 1) + b_b).to(y.dtype.element_ty)  # rounded as F.linear's
        if HAS_RES:
            out = (b_r + out.to(tl.float32)).to(y.dtype.element_ty)
        tl.store(y + i_m * s_y + col0 + rows, out, mask=rows < n)
        if ARGMAX:
            best_v, best_i = _better(out.to(tl.float32), col0 + rows, n_valid, best_v, best_i)
        b_w, b_b, b_r = b_w_next, b_b_next, b_r_next
    if ARGMAX:
        _argmax_ticket(best_v, best_i, part_v, part_i, count, ids, advance, log, L, i_m, pid, G, n_valid, GP,
                       ADVANCE, LOG)


@triton.jit
def _glu_rows(blk, H, BN: tl.constexpr):
    """The a and b weight rows of block blk's channels, interleaved (a0 b0 a1 b1 ...), and their mask."""
    r = tl.arange(0, 2 * BN)
    ch = blk * BN + r // 2
    return (r % 2) * H + ch, ch < H


@triton.jit
def _conv_operands(p_s, s_sk, cw, cb, blk, H, BN: tl.constexpr, TAPS: tl.constexpr, TP: tl.constexpr,
                   HAS_CB: tl.constexpr):
    """Block blk's conv inputs: the state's taps 1 .. TAPS-1 [BN, TP] (the ones that stay, at their column),
    the weights they meet after the shift [BN, TP], the weight of the new input [BN] and the bias [BN]."""
    c = blk * BN + tl.arange(0, BN)
    j = tl.arange(0, TP)
    mask = (c < H)[:, None] & (j >= 1)[None, :] & (j < TAPS)[None, :]
    old = tl.load(p_s + c[:, None] + j[None, :] * s_sk, mask=mask, other=0.0)
    w_old = tl.load(cw + c[:, None] * TAPS + j[None, :] - 1, mask=mask, other=0.0)
    w_new = tl.load(cw + c * TAPS + TAPS - 1, mask=c < H, other=0.0)
    return old, w_old, w_new, _load_vec(cb, c, c < H, BN, HAS_CB)


@triton.jit
def _norm_glu_kernel(
    x, s_x, nw, w, b, y, s_y, state, s_sb, s_sk, cw, cb, K, H, eps, index, gathered,
    BN: tl.constexpr, BK: tl.constexpr, NORM: tl.constexpr, HAS_BIAS: tl.constexpr, CONV: tl.constexpr,
    TAPS: tl.constexpr, HAS_CB: tl.constexpr, GATHER: tl.constexpr, PDL: tl.constexpr,
):
    pid = tl.program_id(0)
    G = tl.num_programs(0)
    i_m = tl.program_id(1).to(tl.int64)
    n_blocks = tl.cdiv(H, BN)
    dtype = y.dtype.element_ty
    TP: tl.constexpr = triton.next_power_of_2(TAPS)
    rows, mask = _glu_rows(pid, H, BN)
    b_w = _load_rows(w, rows, mask, K, BK)  # in flight while the row is normalised
    b_b = _load_vec(b, rows, mask, 2 * BN, HAS_BIAS)
    wait_for_inputs(PDL)
    b_x = _input_row(x, s_x, index, gathered, i_m, pid, nw, K, eps, BK, NORM, GATHER).to(tl.float32)
    p_s = state + i_m * s_sb
    # Everything a block needs (weight rows, biases, the conv state and weights) is loaded a block ahead: a
    # load issued where it is used would cost its whole latency on every block.
    if CONV:
        old, w_old, w_new, b_cb = _conv_operands(p_s, s_sk, cw, cb, pid, H, BN, TAPS, TP, HAS_CB)
    for blk in range(pid, n_blocks, G):
        rows, mask = _glu_rows(blk + G, H, BN)
        b_next = _load_rows(w, rows, mask, K, BK)
        b_b_next = _load_vec(b, rows, mask, 2 * BN, HAS_BIAS)
        if CONV:
            old_next, w_old_next, w_new_next, b_cb_next = _conv_operands(p_s, s_sk, cw, cb, blk + G, H, BN, TAPS,
                                                                         TP, HAS_CB)
        acc = tl.sum(b_w.to(tl.float32) * b_x[None, :], 1) + b_b
        a, g = tl.split(tl.reshape(acc.to(dtype), [BN, 2]))  # rounded as F.linear's output
        a = a.to(tl.float32)
        g = g.to(tl.float32)
        c = blk * BN + tl.arange(0, BN)
        cm = c < H
        if CONV:
            # BaseConv's step (as short_conv_step): shift a into the tap-major state, conv, silu, gate by b.
            a = a.to(state.dtype.element_ty)
            conv = tl.sum(old.to(tl.float32) * w_old.to(tl.float32), 1) + a.to(tl.float32) * w_new.to(tl.float32)
            conv += b_cb
            # Taps 1 .. TAPS-1 move down one and a goes last. Every thread's read of these taps (a block
            # ago) precedes every write: threads holding copies of a channel must not read a shifted tap.
            tl.debug_barrier()
            j = tl.arange(0, TP)
            tl.store(p_s + c[:, None] + (j[None, :] - 1) * s_sk, old,
                     mask=cm[:, None] & (j >= 1)[None, :] & (j < TAPS)[None, :])
            tl.store(p_s + c + (TAPS - 1) * s_sk, a, mask=cm)
            out = conv * tl.sigmoid(conv) * g
            old, w_old, w_new, b_cb = old_next, w_old_next, w_new_next, b_cb_next
        else:
            # SwiGLU: up * silu(gate), silu rounded as F.silu's output.
            out = a * (g * tl.sigmoid(g)).to(dtype).to(tl.float32)
        tl.store(y + i_m * s_y + c, out.to(dtype), mask=cm)
        b_w, b_b = b_next, b_b_next


# Block size, warps and programs per SM: measured (benchmarks/gemv.py --sweep, NOTES-kernels.md; H200, batch
# 1, the 1.3b preset's projections, results/gemv-sweep-h200-2026-11-29-v2.json), best near 8192 weight
# values per block, then retuned on whole batch-1 steps (python benchmarks/decode_b1.py with BASED_GEMV_CONFIG;
# results/gemv-step-sweep-h200-2026-11-29.json), where a kernel's neighbours count too:
#   plain projections (norm_linear): 4 warps, 8 programs per SM asked (as many as the registers fit); 4 per
#   SM gave 0.954 ms a step, 5-8 0.942-0.946;
#   SwiGLU's fc1 (norm_glu): two channels (four weight rows) per block, 4 warps, 6 programs per SM: 0.954-0.956
#   ms a step against 0.974 with one channel at 8 per SM (the best of isolated kernel sweeps);
#   BaseConv's in_proj with its conv step: 4 warps, 3 programs per SM (9.0 us against 12.6 on 8 warps x 4;
#   one channel at 4-8 per SM was slower in the step), at most 168 registers a thread: it compiles to 225,
#   which fit 2 programs per SM; at 168 (62 bytes of spill stores) 3 fit, 0.936 ms a step against 0.944
#   (results/gemv-maxnreg-sweep-h200-2026-11-29.json). Capping the other kinds at 128 (4 fit, no spills) was
#   slower (0.964).
# The interpreter (CPU tests) runs programs one after another at milliseconds each: there, fewer and larger
# blocks (INTERPRETED_BLOCK_VALUES).
BLOCK_VALUES = 8192
INTERPRETED_BLOCK_VALUES = 2**15
# kind -> (block_n or None for BLOCK_VALUES per block, warps, programs per SM[, registers per thread at most]).
# BASED_GEMV_CONFIG (JSON, e.g. '{"glu": [1, 4, 8]}') overrides kinds, for tuning a whole decode step without
# editing this table.
CONFIGS = {"linear": (None, 4, 8), "glu": (2, 4, 6), "conv": (None, 4, 3, 168)}
CONFIGS.update({k: tuple(v) for k, v in json.loads(os.environ.get("BASED_GEMV_CONFIG", "{}")).items()})


def _config(kind: str, K: int, device, block_n, num_warps, per_sm, maxnreg=None):
    """(BN, BK, warps, programs per SM, launch options) for a kind of CONFIGS (explicit arguments win); the
    glu and conv kinds read two weight rows per output. maxnreg caps the registers per thread (a tuning knob)."""
    pair = 1 if kind == "linear" else 2
    BK = triton.next_power_of_2(K)
    default_n, warps, programs_per_sm, *cap = CONFIGS[kind]
    maxnreg = maxnreg or (cap[0] if cap else None)
    values = BLOCK_VALUES
    if interpreted():  # the table's small blocks would take the CPU tests minutes: larger ones
        default_n, values, maxnreg = None, INTERPRETED_BLOCK_VALUES, None
    block_n = block_n or default_n or max(1, values // (pair * BK))
    launch = pdl_options(device)  # a persistent grid: few programs, each resident for the whole kernel
    if maxnreg:
        launch = {**launch, "maxnreg": maxnreg}
    return block_n, BK, num_warps or warps, per_sm or programs_per_sm, launch


REGISTERS_PER_SM = 65536
_resident: dict = {}  # (kernel, its constexprs and options) -> programs that fit on an SM at once


def _launch(kernel, n_blocks: int, per_sm: int, device, args, meta, rows: int):
    """Launch a persistent grid of per_sm programs per SM, or fewer where the compiled kernel's registers
    fit fewer: programs past what is resident would wait for a second wave (BaseConv's kernel once asked
    for 4 per SM and fit 2, at 12.6 us against 9.0 in one wave). The first launch of a configuration
    learns its registers; decode steps are warmed up before their CUDA graph is captured."""
    key = (kernel, tuple(sorted(meta.items())))
    fit = min(per_sm, _resident.get(key, per_sm))
    programs = max(1, min(n_blocks, fit * grid_sms(device)))
    compiled = kernel[(programs, rows)](*args, **meta)
    regs = getattr(compiled, "n_regs", 0)
    if key not in _resident and regs:
        per_warp = -(-regs // 8) * 8 * 32  # registers are given out per warp, 8 per thread at a time
        _resident[key] = max(1, REGISTERS_PER_SM // (per_warp * meta["num_warps"]))
    return compiled, programs


def _record(stats, kernel, block_n, warps, programs):
    """Fill stats (a dict, for benchmarks/gemv.py) with the launch's configuration and registers."""
    if stats is not None:
        stats.update(block_n=block_n, num_warps=warps, programs=programs, n_regs=getattr(kernel, "n_regs", None),
                     n_spills=getattr(kernel, "n_spills", None))


def _rows(x, index) -> int:
    return x.shape[0] if index is None else index.shape[0]


def _gather(x, index, gathered) -> tuple:
    """The kernels' (index, gathered) arguments: placeholders without a gather."""
    return (index.contiguous(), gathered) if index is not None else (x, x)


@torch.compiler.disable
def triton_norm_linear(x, weights, biases, norm_weight, eps, residual, block_n=None, num_warps=None, per_sm=None,
                       maxnreg=None, stats=None, argmax=None, index=None, gathered=None):
    """argmax: None, or (n_valid, ids, advance, log) for norm_linear_argmax's epilogue (advance and log may be
    None; log needs advance). index / gathered: x is a table and its rows index are the input (_input_row)."""
    M, K = _rows(x, index), x.shape[1]
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
    block_n, BK, warps, per_sm, launch = _config("linear", K, x.device, block_n, num_warps, per_sm, maxnreg)
    n_blocks = sum(triton.cdiv(n, block_n) for n in Ns)
    n_valid, ids, advance, log = argmax if argmax is not None else (0, out, None, None)
    part_v = part_i = count = out
    cap = 1
    if argmax is not None:  # partial answers: one per program and row
        cap = min(n_blocks, per_sm * grid_sms(x.device))
        part_v = torch.empty(M, cap, dtype=torch.float32, device=x.device)
        part_i = torch.empty(M, cap, dtype=torch.int32, device=x.device)
        count = ticket_counters(x.device, M)
    meta = dict(BN=block_n, BK=BK, NORM=norm_weight is not None, HAS_BIAS=biases[0] is not None,
                HAS_RES=residual is not None, ARGMAX=argmax is not None, ADVANCE=advance is not None,
                LOG=log is not None, GP=triton.next_power_of_2(cap), GATHER=index is not None,
                PDL="launch_pdl" in launch, num_warps=warps, **launch)
    args = (x, x.stride(0), norm_weight if norm_weight is not None else x, *w, *b,
            residual if residual is not None else x, residual.stride(0) if residual is not None else 0,
            out, out.stride(0), K, *(Ns + [0] * pad), eps,
            n_valid, part_v, part_i, count, ids, advance if advance is not None else ids,
            log if log is not None else ids, log.shape[1] if log is not None else 1, *_gather(x, index, gathered))
    kernel, programs = _launch(_norm_linear_kernel, n_blocks, per_sm, x.device, args, meta, rows=M)
    _record(stats, kernel, block_n, warps, programs)
    return out


@torch.compiler.disable
def triton_norm_glu(x, weight, bias, norm_weight, eps, conv_state, conv_weight, conv_bias,
                    block_n=None, num_warps=None, per_sm=None, maxnreg=None, stats=None, index=None, gathered=None):
    M, K = _rows(x, index), x.shape[1]
    H = weight.shape[0] // 2
    out = x.new_empty(M, H)
    if M == 0 or H == 0:
        return out
    conv = conv_state is not None
    taps = conv_state.transpose(1, 2) if conv else None  # [rows, taps, H], contiguous rows
    cw = conv_weight.contiguous() if conv else x
    block_n, BK, warps, per_sm, launch = _config("conv" if conv else "glu", K, x.device, block_n, num_warps, per_sm,
                                                 maxnreg)
    meta = dict(BN=block_n, BK=BK, NORM=norm_weight is not None, HAS_BIAS=bias is not None, CONV=conv,
                TAPS=conv_weight.shape[1] if conv else 1, HAS_CB=conv and conv_bias is not None,
                GATHER=index is not None, PDL="launch_pdl" in launch, num_warps=warps, **launch)
    args = (x, x.stride(0), norm_weight if norm_weight is not None else x, weight, bias if bias is not None else x,
            out, out.stride(0), taps if conv else x, taps.stride(0) if conv else 0, taps.stride(1) if conv else 0,
            cw, conv_bias if conv and conv_bias is not None else x, K, H, eps, *_gather(x, index, gathered))
    kernel, programs = _launch(_norm_glu_kernel, triton.cdiv(H, block_n), per_sm, x.device, args, meta, rows=M)
    _record(stats, kernel, block_n, warps, programs)
    return out
