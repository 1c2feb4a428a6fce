"""Selective scan in Triton for training: one kernel forward, one backward, nothing of size [B, T, D, N] in memory.
(The forward launches once per power-of-two block of states: N = 24 as 16 + 8, see the note above _fwd_kernel.)

A program owns one sequence and a block of channels, and walks T in chunks of CH steps. Inside a chunk the
recurrence h_t = a_t h_{t-1} + x_t (a_t = exp(delta_t A), x_t = delta_t u_t B_t) is an associative scan over
time on a [CH, BD, BN] register tile, so a chunk costs log-depth steps, not CH dependent ones; the state is
carried across chunks in registers.

Forward saves the state at each chunk start (ckpt [B, T / CH, D, N], fp32): with CH = 16 that is N / 16 of u's
size, where the PyTorch chunked scan keeps several [B, T, D, N] tensors for autograd.

Backward walks the chunks in reverse. Per chunk it rebuilds h_t from the checkpoint (the forward scan again)
and h_{t-1} (h shifted one step), then runs the adjoint recurrence
    dh_t = a_{t+1} dh_{t+1} + dy_t C_t
as a scan over the flipped chunk, and from h_{t-1}, dh_t forms every gradient:
    du_t = delta_t sum_n dh_t B_t + D dy_t         ddelta_t = sum_n dh_t (u_t B_t + A a_t h_{t-1})
    dA   = sum_t dh_t delta_t a_t h_{t-1}           dB_t = sum_d dh_t delta_t u_t,   dC_t = sum_d dy_t h_t
dB, dC: each program sums its channels and writes a [T, N] partial, the group's partials summed in PyTorch;
dA, dD sum over the batch the same way ([B, D, N], [B, D] partial rows). No atomics: deterministic.
The layout and its costs are described above _bwd_kernel.

B and C may be grouped, [B, T, G, N]: channel d reads group d // (D / G) (mamba_ssm's grouped B/C). That is
how torch.func.vmap over k runs is served: the runs are folded into channels (D -> k D) and their B, C into
groups, so k runs cost one launch.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..vmap_fold import KernelBackward, fold_runs, unfold_runs

CHUNK = 16  # CH: steps per register tile
# CH * BD * BN elements per register tile. Forward: 8 warps (4 at blocks of 8 states), 16 elements and 64-72
# registers a thread (ptxas, sm_90a).
# Backward: one warp, a tile of CH * 32 (4 channels x 8 states at N = 24), capped at 168 registers (12 warps an
# SM; uncapped ptxas takes 251, 8 warps): see the note above _bwd_kernel.
TILE_FWD, TILE_BWD = 4096, CHUNK * 32
NUM_WARPS = 8
NUM_WARPS_FWD = {8: 4}  # BN (a forward block of states) -> its warps where not NUM_WARPS; the tile scales with them
NUM_WARPS_BWD, MAXNREG_BWD = 1, 168
PIPELINE_BWD = 2  # 2: prefetch a block's loads one ahead (see _bwd_meta): 10-20% faster on an H100, bitwise equal
CHANNELS_BWD = 64  # channels per backward program: its share of dB, dC is one [T, N] partial, summed after
# N that is not a power of two (MQAR's 24) runs in blocks of STATES_BWD states, looped over in a program, not
# padded to 32 lanes: no idle lanes, 3 shuffle rounds a sum over n, not 5 (the sums add up across the blocks in
# du, ddelta, or fp32 scratch for other dtypes). None: BN covers N.
STATES_BWD = 8
# Under vmap the runs are folded into the channels, so y and the input gradients come back as views with the
# runs at dim 2 ([b, T, k D] memory): every op after them then reads strided rows. True: they are copied to
# runs-first contiguous memory once instead (one copy each; benchmarks/mqar_stacked.py --ssm-runs-first times
# both on a GPU; not yet measured, so off).
RUNS_FIRST_OUT = False


@triton.jit
def _linear_combine(a1, x1, a2, x2):
    # (a1, x1) then (a2, x2): h -> a2 (a1 h + x1) + x2
    return a1 * a2, x1 * a2 + x2


# Forward layout: Triton's default for the [CH, BD, BN] tile puts the CH steps in each thread (the scan along
# time is sequential register code), n on BN lanes, channels on the other lanes and the warps; y's sum over n
# takes log2(BN) shuffle rounds a row. N = 24 padded to BN = 32 ran at 4.2x N = 16's time on an H100 (for 1.5x
# the states): besides 8 idle lanes of 32, the layout Triton derived for [16, 8, 32] loads delta and u in the
# tile's own layout, every lane the 16 steps of its warp's one channel (32 scalar loads a thread and chunk, each
# with its 64-bit address arithmetic, where N = 16 loads 4 vectors and converts them through shared memory),
# and it took 103 registers (2 programs an SM, 64 at N = 16: 4).
# So N runs as one launch per power-of-two block of states (_state_blocks: 24 = 16 + 8, no padding), y summed
# across the launches in global memory (in y when fp32, else fp32 scratch; u, delta are read once per block),
# each block with its own tile and warps: at 8 states 8 warps loaded B, C per lane in the same way, 4 do not
# (NUM_WARPS_FWD).
# Estimated from SASS, not timed on a GPU (benchmarks/ssm_scan.py --sass: ptxas 13.4, sm_90a, d_inner 512 x 4
# runs; the same at 128, 256): instructions of the chunk loop per element (one step, channel and state), regs:
#   before: N 8 45.8 (94 registers), N 16 29.5 (64), N 24 67.0 (103, BN 32: 804 a thread, 80 shuffles a chunk)
#   after:  N 8 29.0 (72),           N 16 29.5 (64), N 24 29.4 (16 states: 472 a thread, 64 shuffles, 64 regs;
#                                                               8 states: 469, 48 shuffles, 64 regs)
# no spills in any. The N = 24 forward then does ~1.0x N = 16's work per state (was 2.3x), so ~1.5x its time is
# the expectation. Its memory traffic grows from ~4.6 to ~8.6 times u's size (u, delta read twice, y written
# and read back once more): ~1.4 ms at 3.35 TB/s at d_inner 512 x 4 runs, batch 256, T 256, under that time.
# Timed since on an H100 (benchmarks/results/ssm-scan-h100-2026-12-07-nblocks.json): N = 24 at d_inner 512,
# 4 runs, batch 256, T 256: 4.8 ms a forward (12.0 before the split), 1.76x N = 16's 2.73 ms.
@triton.jit
def _fwd_kernel(
    u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, h0_ptr, y_ptr, acc_ptr, hT_ptr, ckpt_ptr,
    T, DIM, G, N, DG, NC,
    CH: tl.constexpr, BD: tl.constexpr, BN: tl.constexpr, N0: tl.constexpr, HAS_D: tl.constexpr,
    HAS_H0: tl.constexpr, SAVE_CKPT: tl.constexpr, FIRST: tl.constexpr, LAST: tl.constexpr,
):
    # States N0 .. N0 + BN of N (see _state_blocks): y's sum over them is added to the earlier blocks' (fp32 in
    # acc_ptr unless FIRST) and written to acc_ptr, or to y_ptr in its dtype by the LAST block.
    pid_d = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)  # offsets past 2^31 at long T, large batch
    offs_t = tl.arange(0, CH)
    offs_d = pid_d * BD + tl.arange(0, BD)
    offs_n = N0 + tl.arange(0, BN)
    mask_d = offs_d < DIM
    mask_n = offs_n < N
    mask_dn = mask_d[:, None] & mask_n[None, :]
    g = (pid_d * BD) // DG  # BD divides DG: the block lies in one group
    A = tl.load(A_ptr + offs_d[:, None] * N + offs_n[None, :], mask=mask_dn, other=0.0).to(tl.float32)  # [BD, BN]
    state_offs = offs_d[:, None] * N + offs_n[None, :]  # [BD, BN] within one [D, N] state
    if HAS_H0:
        h = tl.load(h0_ptr + b * DIM * N + state_offs, mask=mask_dn, other=0.0).to(tl.float32)
    else:
        h = tl.zeros([BD, BN], dtype=tl.float32)
    if HAS_D and FIRST:
        Dskip = tl.load(D_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)  # [BD]
    last = offs_t[:, None, None] == CH - 1
    for c in range(NC):
        if SAVE_CKPT:
            tl.store(ckpt_ptr + (b * NC + c) * DIM * N + state_offs, h, mask=mask_dn)
        t = c * CH + offs_t
        mask_t = t < T
        mask_td = mask_t[:, None] & mask_d[None, :]
        mask_tn = mask_t[:, None] & mask_n[None, :]
        td_offs = (b * T + t[:, None]) * DIM + offs_d[None, :]  # [CH, BD]
        tn_offs = ((b * T + t[:, None]) * G + g) * N + offs_n[None, :]  # [CH, BN]
        dt = tl.load(delta_ptr + td_offs, mask=mask_td, other=0.0).to(tl.float32)
        u = tl.load(u_ptr + td_offs, mask=mask_td, other=0.0).to(tl.float32)
        Bt = tl.load(B_ptr + tn_offs, mask=mask_tn, other=0.0).to(tl.float32)
        Ct = tl.load(C_ptr + tn_offs, mask=mask_tn, other=0.0).to(tl.float32)
        # Steps past T decay by 1 and add 0, so the tile's last row is the state after the last real step.
        a = tl.where(mask_t[:, None, None], tl.exp(dt[:, :, None] * A[None, :, :]), 1.0)  # [CH, BD, BN]
        x = (dt * u)[:, :, None] * Bt[:, None, :]  # [CH, BD, BN]
        decay, local = tl.associative_scan((a, x), 0, _linear_combine)
        hs = local + decay * h[None, :, :]  # [CH, BD, BN]
        y = tl.sum(hs * Ct[:, None, :], 2)  # [CH, BD]
        if HAS_D and FIRST:
            y += Dskip[None, :] * u
        if not FIRST:
            y += tl.load(acc_ptr + td_offs, mask=mask_td, other=0.0)
        if LAST:
            tl.store(y_ptr + td_offs, y.to(y_ptr.dtype.element_ty), mask=mask_td)
        else:
            tl.store(acc_ptr + td_offs, y, mask=mask_td)
        h = tl.sum(tl.where(last, hs, 0.0), 0)
    tl.store(hT_ptr + b * DIM * N + state_offs, h, mask=mask_dn)


# Backward layout (why it is not the forward's tile at half size, which ran 15x the forward on an H100):
# - One warp a program; its tile [CH, BD, BN] puts n on the lanes (8 of them at N = 24, see STATES_BWD, and
#   BD = 4 channels on the other 4) and all CH steps in each thread. Both scans along time are then sequential
#   register code, no shared memory or barrier; only the sums over n (du, ddelta) cross lanes, 3 shuffle rounds.
#   The old 8-warp tile split CH over 2 warps and sent its sums over channels through shared memory (46
#   barriers a chunk in its SASS), and padded N = 24 to 32 lanes (5 rounds, a quarter of the lanes idle).
# - One exp per element: a_{t+1} is a_t shifted a row (a scan of _last_two), not exp of delta_{t+1}; h_{t-1} is
#   h shifted likewise, not a second scan of shifted inputs. The adjoint is a forward scan of the flipped chunk:
#   Triton 3.9 lowers reverse=True with a lane-reversing shuffle per element and operand even when the axis is
#   in-thread (2 x 32 shuffles a tile), while tl.flip of an in-thread axis compiles to register renaming.
# - A program walks SUB blocks (CHANNELS_BWD = 64 channels) inside each chunk and accumulates dB, dC in
#   registers, so it writes one [CH, N] partial of each a chunk, 1 / 64 of the per-channel products. The old
#   kernel added every block's [CH, N] into dB, dC with fp32 atomics of Triton's default acq_rel order: each
#   atomic came with a MEMBAR.GPU fence (SASS), 4 a chunk per thread, 128 blocks contending per address.
#   The carries between chunks (a_0 dh_0, dA, dD per block) go through global memory (L1/L2 hits, [BD, BN]),
#   as do the sums over n between state blocks (fp32 [CH, BD] per block and state block).
# - Loads are pipelined one block ahead (PIPELINE_BWD = 2: cp.async into ~2 KB of shared memory): on an H100
#   (benchmarks/results/ssm-scan-h100-2026-12-07.json) 10-20% less backward time, gradients bitwise equal.
# Estimates from the sm_90a SASS (ptxas 13.4 here, no GPU timing) at N = 24, D = 2048 (4 runs x 512), G = 4,
# the inner loop per warp and pass: backward [16 steps, 4 channels, 8 states] ~720 instructions, 106 shuffles,
# 16 exps, no fence, barriers only those of the one-warp load pipeline: ~45 instructions per element, 1.5x the
# forward's 29 (0.7x the padded forward's 67, before the forward ran in blocks of states; STATES_BWD = None:
# ~740 instructions and 164 shuffles for 24 of 32 lanes).
# 168 registers (MAXNREG_BWD): 12 warps an SM, the loop reloads 5 spilled values at N = 24 (8 at N = 16, none
# at N = 8; at 184, 11 warps, none). Grid (D / 64, B) = 8192 programs. So near the forward's time if memory
# latency is hidden (an estimate: benchmarks/ssm_scan.py measures it and sweeps these settings).
@triton.jit
def _last_two(v1, p1, n1, v2, p2, n2):
    # (last element, the one before it, length) of a segment; associative, so a scan of it shifts a tensor by
    # one step along the scan axis: in registers when that axis lies within a thread.
    return v2, tl.where(n2 > 1, p2, v1), n1 + n2


@triton.jit
def _bwd_kernel(
    u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, ckpt_ptr, dy_ptr,
    du_ptr, ddelta_ptr, dA_ptr, dBp_ptr, dCp_ptr, dD_ptr, dh_ptr, s1_ptr, s2_ptr,
    T, NC,
    DIM: tl.constexpr, G: tl.constexpr, N: tl.constexpr, DG: tl.constexpr, P: tl.constexpr,
    CH: tl.constexpr, BD: tl.constexpr, BN: tl.constexpr, NB: tl.constexpr, SUB: tl.constexpr,
    HAS_D: tl.constexpr, EVEN_T: tl.constexpr, STAGES: tl.constexpr,
):
    pid = tl.program_id(0)  # SUB blocks of BD channels, all in one group
    b = tl.program_id(1).to(tl.int64)  # offsets past 2^31 at long T, large batch
    offs_t = tl.arange(0, CH)
    offs_n = tl.arange(0, BN)
    # Offsets within a block, the same for every block: the pointers below are a scalar base plus these, so
    # the compiler keeps one small set of them in registers, not a 64-bit address per element and tensor.
    td_rel = offs_t[:, None] * DIM + tl.arange(0, BD)[None, :]  # [CH, BD]
    dn_rel = tl.arange(0, BD)[:, None] * N + offs_n[None, :]  # [BD, BN]
    d_first = pid * SUB * BD
    g = d_first // DG
    first = offs_t[:, None, None] == 0
    ones = tl.full([CH, BD, BN], 1.0, tl.float32)
    for i in range(NC):
        c = NC - 1 - i
        mask_t = ((c * CH + offs_t) < T) | EVEN_T
        mask_td = mask_t[:, None] & (td_rel >= 0)
        td_base = (b * T + c * CH) * DIM + d_first  # scalar: step c * CH, channel d_first
        for j in range(NB):  # blocks of BN states; the sums over n add up across them in s1, s2
            n0 = j * BN
            mask_n = (n0 + offs_n) < N
            mask_tn = mask_t[:, None] & mask_n[None, :]
            mask_dn = mask_n[None, :] & (dn_rel >= 0)
            tn_offs = ((b * T + c * CH + offs_t[:, None]) * G + g) * N + n0 + offs_n[None, :]  # [CH, BN]
            Bt = tl.load(B_ptr + tn_offs, mask=mask_tn, other=0.0).to(tl.float32)
            Ct = tl.load(C_ptr + tn_offs, mask=mask_tn, other=0.0).to(tl.float32)
            # dB_t, dC_t summed over the program's channels: in-thread over its blocks, across warps once a chunk.
            dB = tl.zeros([CH, BD, BN], dtype=tl.float32)
            dC = tl.zeros([CH, BD, BN], dtype=tl.float32)
            dn_base = b * DIM * N + d_first * N + n0
            for s in tl.range(SUB, num_stages=STAGES):
                td = td_base + s * BD
                dn = dn_base + s * BD * N
                dt = tl.load(delta_ptr + td + td_rel, mask=mask_td, other=0.0).to(tl.float32)  # [CH, BD]
                u = tl.load(u_ptr + td + td_rel, mask=mask_td, other=0.0).to(tl.float32)
                dy = tl.load(dy_ptr + td + td_rel, mask=mask_td, other=0.0).to(tl.float32)
                A = tl.load(A_ptr + (d_first + s * BD) * N + n0 + dn_rel, mask=mask_dn, other=0.0).to(tl.float32)
                h_start = tl.load(ckpt_ptr + (b * NC + c) * DIM * N + (dn - b * DIM * N) + dn_rel, mask=mask_dn,
                                  other=0.0)
                # G_{t+1} = a_{t+1} dh_{t+1} at this chunk's end (dh_T at the last chunk), from the block's last pass
                g_next = tl.load(dh_ptr + dn + dn_rel, mask=mask_dn, other=0.0)
                # The chunk's one exp; steps past T load delta 0, so their a is exp(0) = 1.
                a = tl.exp(dt[:, :, None] * A[None, :, :])  # [CH, BD, BN]
                dtu = dt * u
                # h_t from the checkpoint: the scan with h_start folded into row 0's input, so only its linear part
                # is used and the decay products are dead code along an axis held in one thread.
                x = dtu[:, :, None] * Bt[:, None, :]
                x = tl.where(first, x + a * h_start[None, :, :], x)
                h = tl.associative_scan((a, x), 0, _linear_combine)[1]
                dC += dy[:, :, None] * h
                # h_{t-1}: h shifted one step down, h_start in row 0.
                h_start3 = tl.broadcast_to(h_start[None, :, :], (CH, BD, BN))
                h_prev = tl.associative_scan((h, h_start3, ones), 0, _last_two)[1]
                ah = a * h_prev  # a_t h_{t-1}: a and h_{t-1} are needed no further apart
                a0 = tl.sum(tl.where(first, a, 0.0), 0)  # [BD, BN]
                # The adjoint over the flipped chunk (row j is step CH-1-j), a forward scan: a_{t+1} is then a_t
                # shifted one row down, 1 in row 0, where the G_{t+1} carried in (which holds that decay) joins dy C.
                a_nx = tl.associative_scan((tl.flip(a, 0), ones, ones), 0, _last_two)[1]
                dyC = tl.flip(dy[:, :, None] * Ct[:, None, :], 0)
                dyC = tl.where(first, dyC + g_next[None, :, :], dyC)
                dh = tl.flip(tl.associative_scan((a_nx, dyC), 0, _linear_combine)[1], 0)  # [CH, BD, BN]
                dB += dh * dtu[:, :, None]
                da = dh * ah  # gradient through a_t = exp(delta_t A), times a_t
                s1 = tl.sum(dh * Bt[:, None, :], 2)  # [CH, BD]
                s2 = tl.sum(da * A[None, :, :], 2)
                if NB > 1:  # the earlier state blocks' sums, fp32 in s1_ptr, s2_ptr ([B, T, D])
                    s1 += tl.load(s1_ptr + td + td_rel, mask=mask_td & (j > 0), other=0.0)
                    s2 += tl.load(s2_ptr + td + td_rel, mask=mask_td & (j > 0), other=0.0)
                    tl.store(s1_ptr + td + td_rel, s1, mask=mask_td & (j < NB - 1))
                    tl.store(s2_ptr + td + td_rel, s2, mask=mask_td & (j < NB - 1))
                du = s1 * dt
                if HAS_D:
                    du += tl.load(D_ptr + d_first + s * BD + tl.arange(0, BD)).to(tl.float32)[None, :] * dy
                tl.store(du_ptr + td + td_rel, du.to(du_ptr.dtype.element_ty), mask=mask_td & (j == NB - 1))
                tl.store(ddelta_ptr + td + td_rel, (s1 * u + s2).to(ddelta_ptr.dtype.element_ty),
                         mask=mask_td & (j == NB - 1))
                tl.store(dA_ptr + dn + dn_rel, tl.load(dA_ptr + dn + dn_rel, mask=mask_dn, other=0.0) +
                         tl.sum(da * dt[:, :, None], 0), mask=mask_dn)
                dD_offs = dD_ptr + b * DIM + d_first + s * BD + tl.arange(0, BD)
                mask_dD = (tl.arange(0, BD) >= 0) & (j == 0)
                tl.store(dD_offs, tl.load(dD_offs, mask=mask_dD, other=0.0) + tl.sum(dy * u, 0), mask=mask_dD)
                tl.store(dh_ptr + dn + dn_rel, a0 * tl.sum(tl.where(first, dh, 0.0), 0), mask=mask_dn)
            # This program's share of dB_t, dC_t (sums over its SUB * BD channels); _bwd adds a group's programs.
            part = ((b * T + c * CH + offs_t[:, None]) * P + pid) * N + n0 + offs_n[None, :]
            tl.store(dBp_ptr + part, tl.sum(dB, 1), mask=mask_tn)
            tl.store(dCp_ptr + part, tl.sum(dC, 1), mask=mask_tn)


def _tiles(T: int, dim: int, groups: int, N: int, chunk_size: int | None, tile: int,
           bn_max: int | None = None) -> tuple[int, int, int]:
    """(CH, BD, BN): BN covers N (or bn_max of it); BD a power of two dividing the channels per group, sized so a
    tile holds about `tile` elements."""
    CH = triton.next_power_of_2(chunk_size or min(CHUNK, T))
    BN = min(triton.next_power_of_2(N), bn_max or N + N)
    per_group = dim // groups
    BD = max(1, min(tile // (CH * BN), triton.next_power_of_2(per_group)))
    while per_group % BD:
        BD //= 2
    return CH, BD, BN


def _state_blocks(N: int) -> list[tuple[int, int]]:
    """(N0, BN) per forward launch: N as a sum of powers of two, largest first (24 = 16 + 8, 20 = 16 + 4)."""
    blocks, n0 = [], 0
    while n0 < N:
        BN = 1 << ((N - n0).bit_length() - 1)
        blocks.append((n0, BN))
        n0 += BN
    return blocks


def _fwd_launches(T: int, dim: int, groups: int, N: int, chunk_size: int | None = None) -> list[dict]:
    """_fwd_kernel's tile constexprs per launch (one per state block) and its channel blocks a sequence."""
    out = []
    for i, (N0, BN) in enumerate(blocks := _state_blocks(N)):
        warps = NUM_WARPS_FWD.get(BN, NUM_WARPS)
        CH, BD, _ = _tiles(T, dim, groups, BN, chunk_size, TILE_FWD * warps // NUM_WARPS)
        out.append(dict(CH=CH, BD=BD, BN=BN, N0=N0, FIRST=i == 0, LAST=i == len(blocks) - 1,
                        programs=triton.cdiv(dim, BD), num_warps=warps))
    return out


def _fwd(u, delta, A, B, C, D, h0, chunk_size=None, save_ckpt=True):
    """Plain tensors: u, delta [b, T, D]; A [D, N]; B, C [b, T, G, N]; D [D] or None; h0 [b, D, N] or None.
    Returns y [b, T, D], hT [b, D, N] fp32, ckpt [b, T / CH, D, N] fp32."""
    Bsz, T, dim = u.shape
    G, N = B.shape[2], B.shape[3]
    launches = _fwd_launches(T, dim, G, N, chunk_size)
    NC = triton.cdiv(T, launches[0]["CH"])
    y = torch.empty_like(u)
    hT = u.new_empty(Bsz, dim, N, dtype=torch.float32)
    ckpt = u.new_empty(Bsz, NC if save_ckpt else 0, dim, N, dtype=torch.float32)
    # y summed over the state blocks so far: in y itself when fp32, else in fp32 scratch
    acc = y if len(launches) == 1 or y.dtype == torch.float32 else torch.empty_like(u, dtype=torch.float32)
    for meta in launches:
        # Channel blocks of one sequence launch next to each other: they share the sectors of u, delta and B, C.
        _fwd_kernel[(meta.pop("programs"), Bsz)](
            u, delta, A, B, C, D if D is not None else u, h0 if h0 is not None else u, y, acc, hT, ckpt,
            T, dim, G, N, dim // G, NC, **meta, HAS_D=D is not None, HAS_H0=h0 is not None,
            SAVE_CKPT=save_ckpt,
        )
    return y, hT, ckpt


def _bwd_meta(T: int, dim: int, groups: int, N: int, chunk_size: int | None = None, has_D: bool = True) -> dict:
    """_bwd_kernel's constexprs at a shape: the forward's CH (its checkpoints), blocks of BD channels, SUB of
    them a program (about CHANNELS_BWD channels, inside one group), P programs a sequence."""
    split = STATES_BWD and N > STATES_BWD and N & (N - 1)
    CH, BD, BN = _tiles(T, dim, groups, N, chunk_size, TILE_BWD, STATES_BWD if split else None)
    per_group = dim // groups
    SUB = max(1, min(CHANNELS_BWD, per_group) // BD)
    while per_group % (SUB * BD):
        SUB //= 2
    # A block's carries are stored one pass and read back the next. Pipelined loads (cp.async, STAGES=2) would
    # read them after this thread's own store, which PTX does not spell out for these loads: off until a GPU
    # run checks it (benchmarks/ssm_scan.py times both; tests/ops/test_ssm_fused.py -m gpu checks values).
    return dict(DIM=dim, G=groups, N=N, DG=per_group, P=dim // (SUB * BD), CH=CH, BD=BD, BN=BN,
                NB=triton.cdiv(N, BN), SUB=SUB, HAS_D=has_D, EVEN_T=T % CH == 0,
                STAGES=PIPELINE_BWD if SUB > 1 else 1)


def _bwd(u, delta, A, B, C, D, ckpt, dy, dhT, chunk_size=None):
    """Gradients (du, ddelta, dA, dB, dC, dD, dh0) of _fwd's (y, hT) given dy, dhT; ckpt from _fwd."""
    Bsz, T, dim = u.shape
    G, N = B.shape[2], B.shape[3]
    meta = _bwd_meta(T, dim, G, N, chunk_size, D is not None)
    P = meta["P"]
    du, ddelta = torch.empty_like(u), torch.empty_like(delta)
    dB = u.new_empty(Bsz, T, P, N, dtype=torch.float32)  # per program: sums over its channels
    dC = u.new_empty(Bsz, T, P, N, dtype=torch.float32)
    dA = u.new_zeros(Bsz, dim, N, dtype=torch.float32)  # per sequence, summed below: deterministic
    dD = u.new_zeros(Bsz, dim, dtype=torch.float32)
    dh = dhT.float().contiguous().clone()  # the carried a_t dh_t; a_0 dh_0 = dh0 at the end
    # Sums over n of the state blocks so far (when N spans several), fp32: in du, ddelta themselves when those
    # are fp32 (each block's final values are written by its last state block, after its last read).
    s1, s2 = du, ddelta
    if meta["NB"] > 1 and u.dtype != torch.float32:
        s1, s2 = (u.new_empty(u.shape, dtype=torch.float32) for _ in range(2))
    _bwd_kernel[(P, Bsz)](
        u, delta, A, B, C, D if D is not None else u, ckpt, dy.contiguous(),
        du, ddelta, dA, dB, dC, dD, dh, s1, s2, T, triton.cdiv(T, meta["CH"]), **meta,
        num_warps=NUM_WARPS_BWD, **({"maxnreg": MAXNREG_BWD} if MAXNREG_BWD else {}),
    )
    dB, dC = (x.view(Bsz, T, G, P // G, N).sum(3) for x in (dB, dC))
    return (du, ddelta, dA.sum(0).to(A.dtype), dB.to(B.dtype), dC.to(C.dtype),
            None if D is None else dD.sum(0).to(D.dtype), dh)


def _fold_inputs(info, in_dims, u, delta, A, B, C, D, extra):
    """Per-run [b, T, D] / [D, N] / [b, T, G, N] / [D] / extra [b, (nc,) D, N] -> one problem of k D channels
    and k G groups; `extra` is a list of (tensor, in_dim, position of its channel dim)."""
    k = info.batch_size
    inputs = [(u, 2), (delta, 2), (A, 0), (B, 2), (C, 2), (D, 0)]
    folded = [fold_runs(x, d, k, at, contiguous=True) for (x, at), d in zip(inputs, in_dims[:6])]
    return folded + [fold_runs(x, d, k, at, contiguous=True) for x, d, at in extra]


def _runs_out(outputs: list[torch.Tensor], k: int) -> tuple[list[torch.Tensor], int]:
    """[b, T, k C] outputs -> per-run views at dim 2, or runs-first copies (RUNS_FIRST_OUT); and that dim."""
    views = [unfold_runs(x, k, 2) for x in outputs]
    if not RUNS_FIRST_OUT:
        return views, 2
    return [x.movedim(2, 0).contiguous() for x in views], 0


class _SelectiveScanBackward(KernelBackward):
    """The backward kernel as a Function of its own, so that vmap(grad(...)) can batch it too."""

    @staticmethod
    def forward(u, delta, A, B, C, D, ckpt, dy, dhT, chunk_size):
        return _bwd(u, delta, A, B, C, D, ckpt, dy, dhT, chunk_size)

    @staticmethod
    def vmap(info, in_dims, u, delta, A, B, C, D, ckpt, dy, dhT, chunk_size):
        k = info.batch_size
        u, delta, A, B, C, D, ckpt, dy, dhT = _fold_inputs(
            info, in_dims, u, delta, A, B, C, D, [(ckpt, in_dims[6], 2), (dy, in_dims[7], 2), (dhT, in_dims[8], 1)]
        )
        du, ddelta, dA, dB, dC, dD, dh0 = _SelectiveScanBackward.apply(
            u, delta, A, B, C, D, ckpt, dy, dhT, chunk_size)
        (du, ddelta, dB, dC), at = _runs_out([du, ddelta, dB, dC], k)
        out = (du, ddelta, unfold_runs(dA, k, 0), dB, dC, None if dD is None else unfold_runs(dD, k, 0),
               unfold_runs(dh0, k, 1))
        return out, (at, at, 0, at, at, None if dD is None else 0, 1)


class SelectiveScan(torch.autograd.Function):
    """(u, delta, A, B [b, T, G, N], C, D, h0) -> (y, hT, ckpt); ckpt (chunk-start states) is for backward."""

    @staticmethod
    def forward(u, delta, A, B, C, D, h0, chunk_size):
        return _fwd(u, delta, A, B, C, D, h0, chunk_size)

    @staticmethod
    def setup_context(ctx, inputs, output):
        u, delta, A, B, C, D, h0, _ = inputs
        ctx.mark_non_differentiable(output[2])
        ctx.save_for_backward(u, delta, A, B, C, D, output[2])
        ctx.has_h0, ctx.chunk_size = h0 is not None, inputs[7]

    @staticmethod
    def backward(ctx, dy, dhT, _):
        u, delta, A, B, C, D, ckpt = ctx.saved_tensors
        if dhT is None:
            dhT = torch.zeros(u.shape[0], u.shape[2], A.shape[1], device=u.device, dtype=torch.float32)
        if dy is None:
            dy = torch.zeros_like(u)
        du, ddelta, dA, dB, dC, dD, dh0 = _SelectiveScanBackward.apply(
            u, delta, A, B, C, D, ckpt, dy, dhT, ctx.chunk_size)
        return du, ddelta, dA, dB, dC, dD, dh0 if ctx.has_h0 else None, None

    @staticmethod
    def vmap(info, in_dims, u, delta, A, B, C, D, h0, chunk_size):
        k = info.batch_size
        u, delta, A, B, C, D, h0 = _fold_inputs(info, in_dims, u, delta, A, B, C, D, [(h0, in_dims[6], 1)])
        y, hT, ckpt = SelectiveScan.apply(u, delta, A, B, C, D, h0, chunk_size)
        (y,), at = _runs_out([y], k)
        return (y, unfold_runs(hT, k, 1), unfold_runs(ckpt, k, 2)), (at, 1, 2)  # ckpt: only this backward reads it


def fused_selective_scan(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    chunk_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """selective_scan's signature and results (see based/ops/ssm/__init__.py) as Triton kernels.

    Args:
        u, delta: [B, T, D]; A: [D, N]; B, C: [B, T, N] or grouped [B, T, G, N] (G divides D);
        D: [D] or None; initial_state: [B, D, N].
        chunk_size: steps per register tile (a power of two; default min(16, T)).
    Returns:
        y [B, T, D] in u's dtype, and h [B, D, N] (fp32) after the last token if asked.
    """
    if B.dim() == 3:
        B, C = B.unsqueeze(2), C.unsqueeze(2)
    if u.shape[-1] % B.shape[2]:
        raise ValueError(f"groups of B, C ({B.shape[2]}) must divide the channels ({u.shape[-1]})")
    u, delta, A, B, C = (t.contiguous() for t in (u, delta, A, B, C))
    D = None if D is None else D.contiguous()
    h0 = None if initial_state is None else initial_state.float().contiguous()
    if not torch.is_grad_enabled() and not torch._C._functorch.is_functorch_wrapped_tensor(u):
        y, hT, _ = _fwd(u, delta, A, B, C, D, h0, chunk_size, save_ckpt=False)  # inference: no checkpoints
    else:
        y, hT, _ = SelectiveScan.apply(u, delta, A, B, C, D, h0, chunk_size)
    return y, (hT if output_final_state else None)


__all__ = ["fused_selective_scan"]
