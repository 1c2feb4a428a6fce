"""Input checks and state handling shared by every form of RWKV-5 attention."""
from __future__ import annotations

import torch


def check_inputs(
    r: torch.Tensor, k: torch.Tensor, v: torch.Tensor, w_log: torch.Tensor, u: torch.Tensor,
    initial_state: torch.Tensor | None,
) -> None:
    """r, k [B, T, H, dk]; v [B, T, H, dv]; w_log, u [H, dk]; initial_state [B, H, dk, dv] or None."""
    for name, t in (("r", r), ("k", k), ("v", v)):
        if t.dim() != 4:
            raise ValueError(f"{name} must be [B, T, H, D] (4 dims), got shape {tuple(t.shape)}")
    if r.shape != k.shape:
        raise ValueError(f"r and k must have the same shape [B, T, H, dk], got {tuple(r.shape)} and {tuple(k.shape)}")
    if v.shape[:3] != r.shape[:3]:
        raise ValueError(f"v must be [B, T, H, dv] with B, T, H of r {tuple(r.shape[:3])}, got {tuple(v.shape)}")
    if r.shape[1] == 0:
        raise ValueError("sequence length T must be at least 1, got an empty sequence")
    check_decay(w_log, u, r.shape[2], r.shape[3])
    if initial_state is not None:
        B, _, H, dk = r.shape
        if not isinstance(initial_state, torch.Tensor) or tuple(initial_state.shape) != (B, H, dk, v.shape[-1]):
            got = tuple(initial_state.shape) if isinstance(initial_state, torch.Tensor) else type(initial_state)
            raise ValueError(f"initial_state must be [B, H, dk, dv] = {(B, H, dk, v.shape[-1])}, got {got}")


def check_decay(w_log: torch.Tensor, u: torch.Tensor, num_heads: int, head_k_dim: int) -> None:
    for name, t in (("w_log", w_log), ("u", u)):
        if tuple(t.shape) != (num_heads, head_k_dim):
            raise ValueError(f"{name} must be [H, dk] = {(num_heads, head_k_dim)}, got {tuple(t.shape)}")
