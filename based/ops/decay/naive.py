"""fp32 ground truth: the recurrence, one token at a time. Slow and simple on purpose.

    S_t = exp(g_t) S_{t-1} + k_t v_t^T,    o_t = scale * q_t^T S_t
"""
from __future__ import annotations

import torch

from .common import per_token_log_decay


def naive_decay_linear_attn(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    log_decay: torch.Tensor,
    scale: float = 1.0,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Shapes: q, k [B, T, H, dk]; v [B, T, H, dv]; log_decay [B, T, H] or [H]; state [B, H, dk, dv].
    Computed in fp32 (fp64 inputs stay fp64)."""
    B, T, H, dk = q.shape
    dtype = torch.promote_types(q.dtype, torch.float32)
    qf, kf, vf = (t.to(dtype) for t in (q, k, v))
    g = per_token_log_decay(log_decay, B, T, H).to(dtype)  # [B, H, T]
    S = (q.new_zeros(B, H, dk, v.shape[-1], dtype=dtype) if initial_state is None
         else initial_state.to(dtype))
    outs = []
    for t in range(T):
        S = torch.exp(g[:, :, t])[..., None, None] * S + kf[:, t].unsqueeze(-1) * vf[:, t].unsqueeze(-2)
        outs.append(scale * (qf[:, t].unsqueeze(-2) @ S).squeeze(-2))
    o = torch.stack(outs, dim=1).to(v.dtype)
    return o, (S if output_final_state else None)
