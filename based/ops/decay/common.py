"""Input checks and state handling shared by every form of decayed linear attention."""
from __future__ import annotations

import torch

from ..common import check_layout


def check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_decay: torch.Tensor) -> None:
    """q, k [B, T, H, dk], v [B, T, H, dv], log_decay [B, T, H] or [H]."""
    check_layout(q, k, v)
    if q.shape[-1] <= 0 or v.shape[-1] <= 0:
        raise ValueError(f"key dim and value dim must be positive, got dk={q.shape[-1]}, dv={v.shape[-1]}")
    B, T, H = q.shape[:3]
    if tuple(log_decay.shape) not in ((B, T, H), (H,)):
        raise ValueError(
            f"log_decay must be [B, T, H]=({B}, {T}, {H}) (per token) or [H]=({H},) (constant per head), "
            f"got {tuple(log_decay.shape)}"
        )


def check_state(state: torch.Tensor | None, q: torch.Tensor, v: torch.Tensor, name: str = "initial_state") -> None:
    if state is None:
        return
    B, _, H, dk = q.shape
    dv = v.shape[-1]
    if not isinstance(state, torch.Tensor) or tuple(state.shape) != (B, H, dk, dv):
        got = tuple(state.shape) if isinstance(state, torch.Tensor) else type(state).__name__
        raise ValueError(f"{name} must be a tensor [B, H, dk, dv]=({B}, {H}, {dk}, {dv}), got {got}")


def per_token_log_decay(log_decay: torch.Tensor, B: int, T: int, H: int) -> torch.Tensor:
    """log_decay as fp32 [B, H, T] (a constant [H] broadcast over batch and time)."""
    g = log_decay.float()
    if g.dim() == 1:
        return g.view(1, H, 1).expand(B, H, T)
    return g.transpose(1, 2)


def zero_state(batch_size: int, num_heads: int, key_dim: int, value_dim: int, device=None) -> torch.Tensor:
    """A fresh fp32 state S [B, H, dk, dv]."""
    return torch.zeros(batch_size, num_heads, key_dim, value_dim, device=device, dtype=torch.float32)
