"""Triton kernel of argmax_rows: one program per row, a running (value, index) per lane over the row."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..launch import pdl_options, ticket_counters, wait_for_inputs

SPLIT_CHUNK = 2048  # columns per program of the split form


@triton.jit
def _row_best(p_x, lo, hi, BLOCK: tl.constexpr):
    """(largest value, its first column) of the row at p_x over columns [lo, hi); NaN counts as +inf."""
    o = tl.arange(0, BLOCK)
    best_v = tl.full([BLOCK], float("-inf"), tl.float32)
    best_i = tl.zeros([BLOCK], tl.int32) + lo
    for c0 in range(lo, hi, BLOCK):
        cols = c0 + o
        b_x = tl.load(p_x + cols, mask=cols < hi, other=float("-inf")).to(tl.float32)
        b_x = tl.where(b_x != b_x, float("inf"), b_x)  # NaN is the largest, as in torch.argmax
        # Strictly greater: each lane keeps the first column of its maximum.
        better = b_x > best_v
        best_v = tl.where(better, b_x, best_v)
        best_i = tl.where(better, cols, best_i)
    b_max = tl.max(best_v, 0)
    # Lanes still at -inf never saw a larger value: column lo is then a valid (first) answer.
    return b_max, tl.min(tl.where(best_v == b_max, best_i, hi), 0)


@triton.jit
def _best_of(part_v, part_i, n, none, NP: tl.constexpr):
    """The best of n stored answers (value at part_v, column at part_i): the largest value, its lowest column
    (none, a column past every real one, pads the NP lanes)."""
    o = tl.arange(0, NP)
    vs = tl.load(part_v + o, mask=o < n, other=float("-inf"))
    cols = tl.load(part_i + o, mask=o < n, other=none)
    best = tl.max(vs, 0)
    return tl.min(tl.where(vs == best, cols, none), 0).to(tl.int64)


@triton.jit
def _argmax_rows_kernel(x, s_x, out, N, BLOCK: tl.constexpr):
    i_row = tl.program_id(0).to(tl.int64)
    _, first = _row_best(x + i_row * s_x, 0, N, BLOCK)
    tl.store(out + i_row, first.to(tl.int64))


@triton.jit
def _argmax_split_kernel(x, s_x, part_v, part_i, count, out, N, CHUNK, S: tl.constexpr, SP: tl.constexpr,
                         BLOCK: tl.constexpr, PDL: tl.constexpr):
    """Few rows: S programs per row, each over CHUNK columns; the row's last program to finish (an atomic
    ticket) picks the best of their answers, the first chunk's on ties."""
    wait_for_inputs(PDL)
    i_row = tl.program_id(0).to(tl.int64)
    i_c = tl.program_id(1)
    lo = i_c * CHUNK
    b_max, first = _row_best(x + i_row * s_x, lo, tl.minimum(lo + CHUNK, N), BLOCK)
    tl.store(part_v + i_row * S + i_c, b_max)
    tl.store(part_i + i_row * S + i_c, first)
    # acq_rel: the answers stored above are visible to whichever program takes the last ticket.
    if tl.atomic_add(count + i_row, 1, sem="acq_rel") == S - 1:
        tl.store(out + i_row, _best_of(part_v + i_row * S, part_i + i_row * S, S, N, SP))
        tl.store(count + i_row, 0)  # ready for the next launch (ticket_counters)


@torch.compiler.disable
def triton_argmax_rows(logits: torch.Tensor, split: bool = False) -> torch.Tensor:
    """argmax_rows on CUDA; the rows may be strided (a view of a padded LM-head output). split: several
    programs per row, each over SPLIT_CHUNK columns (for few rows, where one program per row leaves the GPU
    idle)."""
    B, N = logits.shape
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    out = torch.empty(B, dtype=torch.long, device=logits.device)
    if not B:
        return out
    if split:
        S = max(1, min(64, triton.cdiv(N, SPLIT_CHUNK)))
        chunk = triton.cdiv(N, S)
        part_v = torch.empty(B, S, dtype=torch.float32, device=logits.device)
        part_i = torch.empty(B, S, dtype=torch.int32, device=logits.device)
        count = ticket_counters(logits.device, B)
        launch = pdl_options(logits.device, B * S)  # launched while the LM head drains
        _argmax_split_kernel[(B, S)](logits, logits.stride(0), part_v, part_i, count, out, N, chunk, S=S,
                                     SP=triton.next_power_of_2(S), BLOCK=1024, PDL=bool(launch), num_warps=4,
                                     **launch)
    else:
        _argmax_rows_kernel[(B,)](logits, logits.stride(0), out, N, BLOCK=2048, num_warps=8)
    return out

