"""Selective scan in Triton for training: one kernel forward, one backward, nothing of size [B, T, D, N] in memory.

A program owns one sequence and a block of channels, and walks T in chunks of CH steps. Inside a chunk the
recurrence h_t = a_t h_{t-1} + x_t (a_t = exp(delta_t A), x_t = delta_t u_t B_t) is an associative scan over
time on a [CH, BD, BN] register tile, so a chunk costs log-depth steps, not CH dependent ones; the state is
carried across chunks in registers.

Forward saves the state at each chunk start (ckpt [B, T / CH, D, N], fp32): with CH = 16 that is N / 16 of u's
size, where the PyTorch chunked scan keeps several [B, T, D, N] tensors for autograd.

Backward walks the chunks in reverse. Per chunk it rebuilds h_{t-1} from the checkpoint (a scan over the
inputs shifted one step), then runs the adjoint recurrence
    dh_t = a_{t+1} dh_{t+1} + dy_t C_t
as a reverse scan (a_{t+1} is read from delta at t + 1, so no register shift is needed), and from h_{t-1},
dh_t forms every gradient:
    du_t = delta_t sum_n dh_t B_t + D dy_t         ddelta_t = sum_n dh_t (u_t B_t + A a_t h_{t-1})
    dA   = sum_t dh_t delta_t a_t h_{t-1}           dB_t = sum_d dh_t delta_t u_t,   dC_t = sum_d dy_t h_t
dB, dC sum over the channel blocks of a group: fp32 atomic adds into a zeroed buffer. dA, dD sum over the
batch: each program writes its own partial row ([B, D, N], [B, D]), summed in PyTorch (deterministic).

B and C may be grouped, [B, T, G, N]: channel d reads group d // (D / G) (mamba_ssm's grouped B/C). That is
how torch.func.vmap over k runs is served: the runs are folded into channels (D -> k D) and their B, C into
groups, so k runs cost one launch.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

CHUNK = 16  # CH: steps per register tile
# CH * BD * BN elements per register tile. At 8 warps (ptxas, sm_90, N = 24): forward ~100 registers a thread,
# backward ~160 at half the tile (it keeps h_{t-1}, a_t, dh_t and their products live), no spills.
TILE_FWD, TILE_BWD = 4096, 2048
NUM_WARPS = 8


@triton.jit
def _linear_combine(a1, x1, a2, x2):
    # (a1, x1) then (a2, x2): h -> a2 (a1 h + x1) + x2
    return a1 * a2, x1 * a2 + x2


@triton.jit
def _fwd_kernel(
    u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, h0_ptr, y_ptr, hT_ptr, ckpt_ptr,
    T, DIM, G, N, DG, NC,
    CH: tl.constexpr, BD: tl.constexpr, BN: tl.constexpr, HAS_D: tl.constexpr, HAS_H0: tl.constexpr,
    SAVE_CKPT: tl.constexpr,
):
    pid_d = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)  # offsets past 2^31 at long T, large batch
    offs_t = tl.arange(0, CH)
    offs_d = pid_d * BD + tl.arange(0, BD)
    offs_n = tl.arange(0, BN)
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
    if HAS_D:
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
        if HAS_D:
            y += Dskip[None, :] * u
        tl.store(y_ptr + td_offs, y.to(y_ptr.dtype.element_ty), mask=mask_td)
        h = tl.sum(tl.where(last, hs, 0.0), 0)
    tl.store(hT_ptr + b * DIM * N + state_offs, h, mask=mask_dn)


@triton.jit
def _bwd_kernel(
    u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, ckpt_ptr, dy_ptr, dhT_ptr,
    du_ptr, ddelta_ptr, dA_ptr, dB_ptr, dC_ptr, dD_ptr, dh0_ptr,
    T, DIM, G, N, DG, NC,
    CH: tl.constexpr, BD: tl.constexpr, BN: tl.constexpr, HAS_D: tl.constexpr,
):
    pid_d = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)  # offsets past 2^31 at long T, large batch
    offs_t = tl.arange(0, CH)
    offs_d = pid_d * BD + tl.arange(0, BD)
    offs_n = tl.arange(0, BN)
    mask_d = offs_d < DIM
    mask_n = offs_n < N
    mask_dn = mask_d[:, None] & mask_n[None, :]
    g = (pid_d * BD) // DG
    A = tl.load(A_ptr + offs_d[:, None] * N + offs_n[None, :], mask=mask_dn, other=0.0).to(tl.float32)  # [BD, BN]
    state_offs = offs_d[:, None] * N + offs_n[None, :]
    if HAS_D:
        Dskip = tl.load(D_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    dh = tl.load(dhT_ptr + b * DIM * N + state_offs, mask=mask_dn, other=0.0).to(tl.float32)  # [BD, BN]
    dA = tl.zeros([BD, BN], dtype=tl.float32)
    dD = tl.zeros([BD], dtype=tl.float32)
    first = offs_t[:, None, None] == 0
    for i in range(NC):
        c = NC - 1 - i
        t = c * CH + offs_t
        mask_t = t < T
        mask_td = mask_t[:, None] & mask_d[None, :]
        mask_tn = mask_t[:, None] & mask_n[None, :]
        td_offs = (b * T + t[:, None]) * DIM + offs_d[None, :]
        tn_offs = ((b * T + t[:, None]) * G + g) * N + offs_n[None, :]
        dt = tl.load(delta_ptr + td_offs, mask=mask_td, other=0.0).to(tl.float32)  # [CH, BD]
        u = tl.load(u_ptr + td_offs, mask=mask_td, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + td_offs, mask=mask_td, other=0.0).to(tl.float32)
        Bt = tl.load(B_ptr + tn_offs, mask=mask_tn, other=0.0).to(tl.float32)  # [CH, BN]
        Ct = tl.load(C_ptr + tn_offs, mask=mask_tn, other=0.0).to(tl.float32)
        # h_{t-1}: the scan of the chunk's inputs shifted one step, from the checkpoint (row 0: the identity).
        mask_p = (offs_t > 0) & mask_t
        dt_p = tl.load(delta_ptr + td_offs - DIM, mask=mask_p[:, None] & mask_d[None, :], other=0.0).to(tl.float32)
        u_p = tl.load(u_ptr + td_offs - DIM, mask=mask_p[:, None] & mask_d[None, :], other=0.0).to(tl.float32)
        B_p = tl.load(B_ptr + tn_offs - G * N, mask=mask_p[:, None] & mask_n[None, :], other=0.0).to(tl.float32)
        a_p = tl.where(mask_p[:, None, None], tl.exp(dt_p[:, :, None] * A[None, :, :]), 1.0)
        x_p = (dt_p * u_p)[:, :, None] * B_p[:, None, :]
        decay, local = tl.associative_scan((a_p, x_p), 0, _linear_combine)
        h_start = tl.load(ckpt_ptr + (b * NC + c) * DIM * N + state_offs, mask=mask_dn, other=0.0)
        h_prev = local + decay * h_start[None, :, :]  # [CH, BD, BN]
        a = tl.where(mask_t[:, None, None], tl.exp(dt[:, :, None] * A[None, :, :]), 1.0)
        h = a * h_prev + (dt * u)[:, :, None] * Bt[:, None, :]
        tl.atomic_add(dC_ptr + tn_offs, tl.sum(dy[:, :, None] * h, 1), mask=mask_tn)
        # Adjoint: dh_t = a_{t+1} dh_{t+1} + dy_t C_t, with dh carried in from the chunk after (or dh_T).
        mask_nx = (t + 1) < T
        dt_nx = tl.load(delta_ptr + td_offs + DIM, mask=mask_nx[:, None] & mask_d[None, :], other=0.0).to(tl.float32)
        a_nx = tl.where(mask_nx[:, None, None], tl.exp(dt_nx[:, :, None] * A[None, :, :]), 1.0)
        dh_in = dy[:, :, None] * Ct[:, None, :]
        carry, local_dh = tl.associative_scan((a_nx, dh_in), 0, _linear_combine, reverse=True)
        dh_t = local_dh + carry * dh[None, :, :]  # [CH, BD, BN]
        dh = tl.sum(tl.where(first, dh_t, 0.0), 0)
        da = dh_t * h_prev * a  # gradient through a_t = exp(delta_t A), times a_t
        ddelta = tl.sum(dh_t * u[:, :, None] * Bt[:, None, :] + da * A[None, :, :], 2)  # [CH, BD]
        du = tl.sum(dh_t * Bt[:, None, :], 2) * dt
        if HAS_D:
            du += Dskip[None, :] * dy
        dD += tl.sum(dy * u, 0)
        dA += tl.sum(da * dt[:, :, None], 0)
        tl.atomic_add(dB_ptr + tn_offs, tl.sum(dh_t * (dt * u)[:, :, None], 1), mask=mask_tn)
        tl.store(du_ptr + td_offs, du.to(du_ptr.dtype.element_ty), mask=mask_td)
        tl.store(ddelta_ptr + td_offs, ddelta.to(ddelta_ptr.dtype.element_ty), mask=mask_td)
    # dh now holds dh_0; the initial state enters as a_0 h_init.
    dt0 = tl.load(delta_ptr + b * T * DIM + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    tl.store(dh0_ptr + b * DIM * N + state_offs, tl.exp(dt0[:, None] * A) * dh, mask=mask_dn)
    tl.store(dA_ptr + b * DIM * N + state_offs, dA, mask=mask_dn)
    tl.store(dD_ptr + b * DIM + offs_d, dD, mask=mask_d)


def _tiles(T: int, dim: int, groups: int, N: int, chunk_size: int | None, tile: int) -> tuple[int, int, int]:
    """(CH, BD, BN): BN covers N; BD a power of two dividing the channels per group, sized so a tile holds
    about `tile` elements."""
    CH = triton.next_power_of_2(chunk_size or min(CHUNK, T))
    BN = triton.next_power_of_2(N)
    per_group = dim // groups
    BD = max(1, min(tile // (CH * BN), triton.next_power_of_2(per_group)))
    while per_group % BD:
        BD //= 2
    return CH, BD, BN


def _fwd(u, delta, A, B, C, D, h0, chunk_size=None, save_ckpt=True):
    """Plain tensors: u, delta [b, T, D]; A [D, N]; B, C [b, T, G, N]; D [D] or None; h0 [b, D, N] or None.
    Returns y [b, T, D], hT [b, D, N] fp32, ckpt [b, T / CH, D, N] fp32."""
    Bsz, T, dim = u.shape
    G, N = B.shape[2], B.shape[3]
    CH, BD, BN = _tiles(T, dim, G, N, chunk_size, TILE_FWD)
    NC = triton.cdiv(T, CH)
    y = torch.empty_like(u)
    hT = u.new_empty(Bsz, dim, N, dtype=torch.float32)
    ckpt = u.new_empty(Bsz, NC if save_ckpt else 0, dim, N, dtype=torch.float32)
    # Channel blocks of one sequence launch next to each other: they share the sectors of u, delta and B, C.
    _fwd_kernel[(triton.cdiv(dim, BD), Bsz)](
        u, delta, A, B, C, D if D is not None else u, h0 if h0 is not None else u, y, hT, ckpt,
        T, dim, G, N, dim // G, NC, CH=CH, BD=BD, BN=BN, HAS_D=D is not None, HAS_H0=h0 is not None,
        SAVE_CKPT=save_ckpt, num_warps=NUM_WARPS,
    )
    return y, hT, ckpt


def _bwd(u, delta, A, B, C, D, ckpt, dy, dhT, chunk_size=None):
    """Gradients (du, ddelta, dA, dB, dC, dD, dh0) of _fwd's (y, hT) given dy, dhT; ckpt from _fwd."""
    Bsz, T, dim = u.shape
    G, N = B.shape[2], B.shape[3]
    CH, BD, BN = _tiles(T, dim, G, N, chunk_size, TILE_BWD)  # the forward's CH: its checkpoints
    NC = triton.cdiv(T, CH)
    du, ddelta = torch.empty_like(u), torch.empty_like(delta)
    dB = torch.zeros(B.shape, device=B.device, dtype=torch.float32)
    dC = torch.zeros(C.shape, device=C.device, dtype=torch.float32)
    dA = u.new_empty(Bsz, dim, N, dtype=torch.float32)
    dD = u.new_empty(Bsz, dim, dtype=torch.float32)
    dh0 = u.new_empty(Bsz, dim, N, dtype=torch.float32)
    _bwd_kernel[(triton.cdiv(dim, BD), Bsz)](
        u, delta, A, B, C, D if D is not None else u, ckpt, dy.contiguous(), dhT.contiguous(),
        du, ddelta, dA, dB, dC, dD, dh0,
        T, dim, G, N, dim // G, NC, CH=CH, BD=BD, BN=BN, HAS_D=D is not None, num_warps=NUM_WARPS,
    )
    return (du, ddelta, dA.sum(0).to(A.dtype), dB.to(B.dtype), dC.to(C.dtype),
            None if D is None else dD.sum(0).to(D.dtype), dh0)


def _batched(x, in_dim, k, at):
    """x with its vmapped dim (k runs; expanded where x is shared) moved to position `at`."""
    if x is None:
        return None
    if in_dim is None:
        return x.unsqueeze(at).expand(*x.shape[:at], k, *x.shape[at:])
    return x.movedim(in_dim, at)


def _fold(x, at):
    """Merge dim `at` (runs) into the dim after it: runs become channels (or groups)."""
    if x is None:
        return None
    return x.reshape(*x.shape[:at], x.shape[at] * x.shape[at + 1], *x.shape[at + 2:])


def _fold_inputs(info, in_dims, u, delta, A, B, C, D, extra):
    """Per-run [b, T, D] / [D, N] / [b, T, G, N] / [D] / extra [b, (nc,) D, N] -> one problem of k D channels
    and k G groups; `extra` is a list of (tensor, in_dim, position of its channel dim)."""
    k = info.batch_size
    u_d, delta_d, A_d, B_d, C_d, D_d = in_dims[:6]
    folded = [
        _fold(_batched(u, u_d, k, 2), 2), _fold(_batched(delta, delta_d, k, 2), 2),
        _fold(_batched(A, A_d, k, 0), 0), _fold(_batched(B, B_d, k, 2), 2), _fold(_batched(C, C_d, k, 2), 2),
        _fold(_batched(D, D_d, k, 0), 0),
    ]
    folded += [_fold(_batched(x, d, k, at), at) for x, d, at in extra]
    return [x.contiguous() if x is not None else None for x in folded]


def _unfold(x, at, k):
    """Split channel dim `at` into (k runs, channels): the inverse of _fold, a view."""
    return x.view(*x.shape[:at], k, x.shape[at] // k, *x.shape[at + 1:])


class _SelectiveScanBackward(torch.autograd.Function):
    """The backward kernel as a Function of its own, so that vmap(grad(...)) can batch it too."""

    @staticmethod
    def forward(u, delta, A, B, C, D, ckpt, dy, dhT, chunk_size):
        return _bwd(u, delta, A, B, C, D, ckpt, dy, dhT, chunk_size)

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, *grads):
        raise NotImplementedError("fused_selective_scan has no double backward")

    @staticmethod
    def vmap(info, in_dims, u, delta, A, B, C, D, ckpt, dy, dhT, chunk_size):
        k = info.batch_size
        u, delta, A, B, C, D, ckpt, dy, dhT = _fold_inputs(
            info, in_dims, u, delta, A, B, C, D, [(ckpt, in_dims[6], 2), (dy, in_dims[7], 2), (dhT, in_dims[8], 1)]
        )
        du, ddelta, dA, dB, dC, dD, dh0 = _SelectiveScanBackward.apply(
            u, delta, A, B, C, D, ckpt, dy, dhT, chunk_size)
        out = (_unfold(du, 2, k), _unfold(ddelta, 2, k), _unfold(dA, 0, k), _unfold(dB, 2, k), _unfold(dC, 2, k),
               None if dD is None else _unfold(dD, 0, k), _unfold(dh0, 1, k))
        return out, (2, 2, 0, 2, 2, None if dD is None else 0, 1)


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
        return (_unfold(y, 2, k), _unfold(hT, 1, k), _unfold(ckpt, 2, k)), (2, 1, 2)


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
