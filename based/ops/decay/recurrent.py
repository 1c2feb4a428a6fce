"""Recurrent form: one token against the fp32 state, updated in place, as in decoding.

    S <- exp(g) S + k v^T,    o = scale * q^T S
"""
from __future__ import annotations

import torch


def decay_linear_attn_step(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    log_decay: torch.Tensor,
    state: torch.Tensor,
    scale: float = 1.0,
) -> torch.Tensor:
    """Decode one token and update `state` in place.

    Args:
        q, k: [B, H, dk]; v: [B, H, dv]
        log_decay: [B, H] (per token) or [H] (constant per head), <= 0
        state: S [B, H, dk, dv] fp32, updated in place
    Returns:
        o: [B, H, dv] in v's dtype
    """
    B, H, dk = q.shape
    if k.shape != q.shape or v.shape[:2] != (B, H) or v.dim() != 3:
        raise ValueError(f"step expects q, k [B, H, dk] and v [B, H, dv], got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    if tuple(state.shape) != (B, H, dk, v.shape[-1]):
        raise ValueError(f"state must be [B, H, dk, dv]=({B}, {H}, {dk}, {v.shape[-1]}), got {tuple(state.shape)}")
    if tuple(log_decay.shape) not in ((B, H), (H,)):
        raise ValueError(f"log_decay must be [B, H]=({B}, {H}) or [H]=({H},), got {tuple(log_decay.shape)}")
    decay = torch.exp(log_decay.float()).expand(B, H)
    # addcmul_ broadcasts k [B, H, dk, 1] * v [B, H, 1, dv] into the state: no [B, H, dk, dv] temporary.
    state.mul_(decay[..., None, None].to(state.dtype))
    state.addcmul_(k.to(state.dtype).unsqueeze(-1), v.to(state.dtype).unsqueeze(-2))
    o = (q.to(state.dtype).unsqueeze(-2) @ state).squeeze(-2)
    return (scale * o).to(v.dtype)
