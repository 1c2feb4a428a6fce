"""Chunked form, linear in T (the SSD / Lightning Attention block algorithm), in fp32.

Split T into chunks of C tokens. Inside a chunk, with b_i = g_1 + ... + g_i (cumulative log-decay from
the chunk's start, token i included) and the segment sums seg[i, j] = g_{j+1} + ... + g_i (j <= i):

    o_i = scale * (sum_{j<=i} exp(seg[i, j]) (q_i . k_j) v_j  +  exp(b_i) q_i^T S)     intra + inter
    S  <-  exp(b_C) S  +  sum_j exp(seg[C, j]) k_j v_j^T                                 state to the next chunk

Every exponent is a sum of log-decays (<= 0), never a difference of large cumulative sums that could
overflow: seg comes from a masked cumsum (Mamba-2's `segsum`), the masked entries are -inf before exp.
The intra-chunk terms of every chunk are batched matmuls; only the [dk, dv] state passing loops over chunks.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .common import per_token_log_decay, zero_state

DEFAULT_CHUNK_SIZE = 64


def segsum(g: torch.Tensor) -> torch.Tensor:
    """g [..., C] -> [..., C, C] with out[i, j] = g[j+1] + ... + g[i] for j <= i (0 on the diagonal)
    and -inf above it."""
    C = g.shape[-1]
    x = g.unsqueeze(-1).expand(*g.shape, C)  # x[i, j] = g[i]
    below = torch.ones(C, C, dtype=torch.bool, device=g.device).tril(-1)
    out = x.masked_fill(~below, 0).cumsum(-2)  # out[i, j] = sum_{j < s <= i} g[s]
    return out.masked_fill(~below.logical_or(torch.eye(C, dtype=torch.bool, device=g.device)), float("-inf"))


def chunk_decay_linear_attn(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    log_decay: torch.Tensor,
    scale: float = 1.0,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Shapes: q, k [B, T, H, dk]; v [B, T, H, dv]; log_decay [B, T, H] or [H]; state [B, H, dk, dv]."""
    B, T, H, dk = q.shape
    dv = v.shape[-1]
    C = min(chunk_size, T)
    n = -(-T // C)
    pad = n * C - T
    # Padding tokens at the end: k = v = 0 and g = 0 leave the real outputs and the final state unchanged.
    qf, kf, vf = (F.pad(t.float().transpose(1, 2), (0, 0, 0, pad)).view(B, H, n, C, -1) for t in (q, k, v))
    g = F.pad(per_token_log_decay(log_decay, B, T, H), (0, pad)).view(B, H, n, C)  # [B, H, n, C]
    b = g.cumsum(-1)  # [B, H, n, C]
    L = torch.exp(segsum(g))  # [B, H, n, C, C], lower triangle
    o = ((qf @ kf.transpose(-1, -2)) * L) @ vf  # intra-chunk, [B, H, n, C, dv]
    # Each chunk's own contribution to the state at its end: sum_j exp(seg[C, j]) k_j v_j^T.
    chunk_states = (kf * L[..., -1, :, None]).transpose(-1, -2) @ vf  # [B, H, n, dk, dv]
    chunk_decay = torch.exp(b[..., -1])  # [B, H, n]
    S = zero_state(B, H, dk, dv, q.device) if initial_state is None else initial_state.float()
    entering = []
    for c in range(n):
        entering.append(S)
        # Out of place so autograd keeps each chunk's state.
        S = chunk_decay[:, :, c, None, None] * S + chunk_states[:, :, c]
    o = o + (qf * torch.exp(b).unsqueeze(-1)) @ torch.stack(entering, dim=2)  # inter-chunk
    o = (scale * o).view(B, H, n * C, dv)[:, :, :T].transpose(1, 2).to(v.dtype)
    return o, (S if output_final_state else None)
