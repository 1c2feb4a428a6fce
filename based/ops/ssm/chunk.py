"""Selective scan in chunks: about 2 sqrt(T) small steps where the reference scan takes T.

The reference (selective_scan's PyTorch form) runs h_t = a_t h_{t-1} + b_t one step at a time: 2T small
kernels forward, more backward, which on a GPU is launch time, not work (MQAR's Mamba runs, issue 20). Here
T is cut into chunks of c steps and

1. every chunk is scanned from a zero state, all chunks at once: c steps over [B, T/c, D, N];
2. the decay from each chunk's start to each of its positions is closed-form, exp(A * cumsum(delta)) (A is
   constant in time, so the cumulative log-decay is A times the cumulative step size); it is <= 1, so
   nothing overflows, unlike forms that divide by a cumulative decay;
3. a short loop over the T/c chunks carries the state across chunk boundaries:
   H_j = local_j[end] + decay_j[end] * H_{j-1};
4. h_t = local_t + decay_t * H_(chunk before t), then y_t = C_t . h_t + D u_t.

Exact up to fp32 rounding (tests/ops/test_ssm_chunk.py compares outputs, final state and gradients with the
reference). Moves about 1.5x the reference's bytes for 1 / 8 of its kernels at T = 256.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def chunk_selective_scan(
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
    """selective_scan's signature and results (see based/ops/ssm/__init__.py), in chunks.

    Args:
        u, delta: [B, T, D]; A: [D, N]; B, C: [B, T, N]; D: [D] or None; initial_state: [B, D, N].
        chunk_size: c, default round(sqrt(T)) (fewest steps: c + T / c).
    Returns:
        y [B, T, D] in u's dtype, and h [B, D, N] (fp32) after the last token if asked.
    """
    from . import _mamba_selective_scan, selective_scan

    fused = (initial_state is None and u.is_cuda and _mamba_selective_scan is not None
             and not torch._C._functorch.is_functorch_wrapped_tensor(u))  # mamba-ssm's kernel has no vmap rule
    if fused or not torch.is_grad_enabled():
        # mamba-ssm's fused kernel where it applies; without gradients the reference, which holds
        # [B, 64, D, N] at a time where this holds [B, T, D, N] several times (evaluation runs T = 1024).
        return selective_scan(u, delta, A, B, C, D, initial_state=initial_state,
                              output_final_state=output_final_state)
    Bsz, T, Dm = u.shape
    N = A.shape[1]
    c = chunk_size or max(1, round(math.sqrt(T)))
    nc = math.ceil(T / c)
    pad = nc * c - T  # padded steps have delta = 0: decay 1, input 0, so they leave the state as it is
    uf, df, Bf, Cf = (F.pad(t.float(), (0, 0, 0, pad)) for t in (u, delta, B, C))
    Af = A.float()
    dt = df.view(Bsz, nc, c, Dm, 1)
    dA = torch.exp(dt * Af)  # [B, nc, c, D, N]
    dBu = (dt * uf.view(Bsz, nc, c, Dm, 1)) * Bf.view(Bsz, nc, c, 1, N)  # [B, nc, c, D, N]
    h = dBu[:, :, 0]
    local = [h]
    for a, b in zip(dA.unbind(2)[1:], dBu.unbind(2)[1:]):  # 1. every chunk from a zero state
        h = torch.addcmul(b, a, h)
        local.append(h)
    local = torch.stack(local, dim=2)  # [B, nc, c, D, N]
    decay = torch.exp(torch.cumsum(dt, dim=2) * Af)  # 2. chunk start -> each position, [B, nc, c, D, N]
    H = u.new_zeros(Bsz, Dm, N, dtype=torch.float32) if initial_state is None else initial_state.float()
    starts = []
    for j in range(nc):  # 3. across chunks
        starts.append(H)
        H = torch.addcmul(local[:, j, -1], decay[:, j, -1], H)
    h_all = torch.addcmul(local, decay, torch.stack(starts, dim=1).unsqueeze(2))  # 4.
    y = torch.einsum("bjcdn,bjcn->bjcd", h_all, Cf.view(Bsz, nc, c, N)).reshape(Bsz, nc * c, Dm)[:, :T]
    if D is not None:
        y = y + uf[:, :T] * D.float()
    return y.to(u.dtype), (H if output_final_state else None)
