"""Input checks and state handling shared by every form of RWKV-5 attention."""
from __future__ import annotations

import torch

from ..common import check_layout


def check_inputs(
    r: torch.Tensor, k: torch.Tensor, v: torch.Tensor, w_log: torch.Tensor, u: torch.Tensor,
    initial_state: torch.Tensor | None,
) -> None:
    """r, k [B, T, H, dk]; v [B, T, H, dv]; w_log, u [H, dk]; initial_state [B, H, dk, dv] or None."""
    check_layout(r, k, v, names=("r", "k", "v"))
    B, _, H, dk = r.shape
    for name, t in (("w_log", w_log), ("u", u)):
        if tuple(t.shape) != (H, dk):
            raise ValueError(f"{name} must be [H, dk] = {(H, dk)}, got {tuple(t.shape)}")
    if initial_state is not None:
        if not isinstance(initial_state, torch.Tensor) or tuple(initial_state.shape) != (B, H, dk, v.shape[-1]):
            got = tuple(initial_state.shape) if isinstance(initial_state, torch.Tensor) else type(initial_state)
            raise ValueError(f"initial_state must be [B, H, dk, dv] = {(B, H, dk, v.shape[-1])}, got {got}")
