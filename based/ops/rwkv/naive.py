"""fp32 ground truth: the RWKV-5 recurrence, one token at a time, out of place (autograd sees every step).

    o_t = r_t^T (S_{t-1} + diag(u) k_t v_t^T),    S_t = diag(w) S_{t-1} + k_t v_t^T,    w = exp(w_log)
"""
from __future__ import annotations

import torch


def naive_rwkv5_attn(
    r: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    w_log: torch.Tensor,
    u: torch.Tensor,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Shapes: r, k [B, T, H, dk]; v [B, T, H, dv]; w_log, u [H, dk]; state [B, H, dk, dv].
    Computes in fp32 (fp64 inputs stay fp64)."""
    dtype = torch.promote_types(r.dtype, torch.float32)
    B, T, H, dk = r.shape
    rf, kf, vf = (t.to(dtype) for t in (r, k, v))
    w = torch.exp(w_log.to(dtype)).unsqueeze(-1)  # [H, dk, 1]
    uu = u.to(dtype).unsqueeze(-1)
    S = r.new_zeros(B, H, dk, v.shape[-1], dtype=dtype) if initial_state is None else initial_state.to(dtype)
    outs = []
    for t in range(T):
        kv = kf[:, t].unsqueeze(-1) * vf[:, t].unsqueeze(-2)  # [B, H, dk, dv]
        outs.append(torch.einsum("bhi,bhij->bhj", rf[:, t], S + uu * kv))
        S = w * S + kv
    o = torch.stack(outs, dim=1).to(v.dtype)
    return o, (S if output_final_state else None)
