"""One-token decode step against the fp32 state, in place:

    o = r^T (S + diag(u) k v^T),    S <- diag(w) S + k v^T,    w = exp(w_log)
"""
from __future__ import annotations

import torch


def rwkv5_step(
    r: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    w_log: torch.Tensor,
    u: torch.Tensor,
    state: torch.Tensor,
) -> torch.Tensor:
    """Decode one token and update the state in place.

    Args:
        r, k: [B, H, dk]; v: [B, H, dv]
        w_log: [H, dk] log decay (<= 0); u: [H, dk] bonus of the current token.
        state: S [B, H, dk, dv] fp32, updated in place.
    Returns:
        o: [B, H, dv] in v's dtype
    """
    if r.dim() != 3 or r.shape != k.shape or v.shape[:2] != r.shape[:2]:
        raise ValueError(f"r, k must be [B, H, dk] and v [B, H, dv], got {tuple(r.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    if tuple(state.shape) != (*r.shape, v.shape[-1]):
        raise ValueError(f"state must be [B, H, dk, dv] = {(*r.shape, v.shape[-1])}, got {tuple(state.shape)}")
    rf, kf, vf = (t.to(state.dtype) for t in (r, k, v))
    # r^T diag(u) k v^T = (sum_i r_i u_i k_i) v^T: no [B, H, dk, dv] temporary beside the state, so a
    # batch whose state fits in memory also fits its step (the decode benchmark's largest batch).
    bonus = (rf * u.to(state.dtype) * kf).sum(-1, keepdim=True) * vf  # [B, H, dv]
    o = (rf.unsqueeze(-2) @ state).squeeze(-2) + bonus
    state.mul_(torch.exp(w_log.to(state.dtype)).unsqueeze(-1)).addcmul_(kf.unsqueeze(-1), vf.unsqueeze(-2))
    return o.to(v.dtype)
