"""Deferred state updates for decoding: the fp32 state is read every token but written every `fold_every`.

A decode step that adds phi(k) v^T to the fp32 state S reads and writes all of S (2 * D_feat * dv * 4 bytes
a head), and at large batch that traffic is the step's biggest cost. The step's output needs S only through
phi(q) S, and phi(q) . phi(k_j) = 1 + s_j + s_j^2/2 needs only the raw k_j. So the last few tokens' k and v
(in the model's dtype: what the projections produced, nothing rounded) wait in a small pending buffer,

    y = (phi(q) S + sum_j w_j v_j + w v) / (phi(q) z + sum_j w_j + w + eps),   w_j = phi(q) . phi(k_j),

and the token that fills the buffer folds all of them into S and z at once: S is written once every
`fold_every` tokens instead of every token, which nearly halves the bytes a step moves.

Pending = (k_pending [B, H, P, d], v_pending [B, H, P, dv], n_pending [B, H] int32), P = fold_every - 1 slots,
n_pending of them in use. The exact state of a sequence is S plus its pending tokens (`fold_pending`).
"""
from __future__ import annotations

import torch

from .feature_map import taylor_feature_map

Pending = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def zero_pending(batch_size: int, num_heads: int, feature_dim: int, head_dim: int, fold_every: int,
                 dtype=torch.float32, device=None) -> Pending:
    """An empty pending buffer for a state folded every `fold_every` (>= 2) tokens."""
    if isinstance(fold_every, bool) or not isinstance(fold_every, int) or fold_every < 2:
        raise ValueError(f"fold_every must be an int >= 2 for a pending buffer, got {fold_every!r}")
    B, H, P = batch_size, num_heads, fold_every - 1
    return (
        torch.zeros(B, H, P, feature_dim, dtype=dtype, device=device),
        torch.zeros(B, H, P, head_dim, dtype=dtype, device=device),
        torch.zeros(B, H, dtype=torch.int32, device=device),
    )


def check_pending(pending: Pending, q: torch.Tensor, v: torch.Tensor) -> None:
    """pending against one decode token's q [B, H, d] and v [B, H, dv]."""
    if not (isinstance(pending, (tuple, list)) and len(pending) == 3):
        raise ValueError("pending must be a tuple (k [B, H, P, d], v [B, H, P, dv], n [B, H] int32)")
    kp, vp, n = pending
    B, H, d = q.shape
    dv = v.shape[-1]
    P = kp.shape[2] if kp.dim() == 4 else -1
    if P < 1 or tuple(kp.shape) != (B, H, P, d) or tuple(vp.shape) != (B, H, P, dv) or tuple(n.shape) != (B, H):
        raise ValueError(
            f"pending shapes {tuple(kp.shape)}, {tuple(vp.shape)}, {tuple(n.shape)} do not match "
            f"(B, H, P, d), (B, H, P, dv), (B, H) with (B, H, d, dv)=({B}, {H}, {d}, {dv}) and P >= 1"
        )
    if n.dtype != torch.int32:
        raise ValueError(f"the pending count must be int32, got {n.dtype}")


def _add_tokens(kv_state, k_state, fk: torch.Tensor, v: torch.Tensor) -> None:
    """S += sum_j phi(k_j) v_j^T, z += sum_j phi(k_j) over dim 2 of fk [B, H, J, F] and v [B, H, J, dv]."""
    kv_state.add_(torch.einsum("bhjf,bhjv->bhfv", fk, v.float()))
    k_state.add_(fk.sum(2))


def fold_pending(kv_state: torch.Tensor, k_state: torch.Tensor, pending: Pending, feature_map: str = "compact",
                 scale: float | None = None) -> None:
    """Add the pending tokens to the fp32 state in place and empty the buffer (before a prefill continues
    the state, or to read it). Masked by each head's count, so no value is read back from the device."""
    kp, vp, n = pending
    used = torch.arange(kp.shape[2], device=n.device) < n.unsqueeze(-1)  # [B, H, P]
    _add_tokens(kv_state, k_state, taylor_feature_map(kp.float(), feature_map, scale) * used.unsqueeze(-1), vp)
    n.zero_()


def pending_step(q, k, v, kv_state, k_state, pending: Pending, feature_map="compact", scale=None, eps=1e-6):
    """taylor_linear_attn_step with deferred updates, in PyTorch (the reference for the Triton kernel)."""
    check_pending(pending, q, v)
    kp, vp, n = pending
    P = kp.shape[2]
    fq = taylor_feature_map(q.float(), feature_map, scale)  # [B, H, F]
    fk = taylor_feature_map(k.float(), feature_map, scale)
    used = (torch.arange(P, device=n.device) < n.unsqueeze(-1)).unsqueeze(-1)  # [B, H, P, 1]
    fkp = taylor_feature_map(kp.float(), feature_map, scale) * used  # [B, H, P, F]
    w = (fkp * fq.unsqueeze(-2)).sum(-1, keepdim=True)  # [B, H, P, 1], 0 for unused slots
    w_now = (fk * fq).sum(-1, keepdim=True)
    num = (fq.unsqueeze(-2) @ kv_state).squeeze(-2) + (w * vp.float()).sum(2) + w_now * v.float()
    den = (fq * k_state).sum(-1, keepdim=True) + w.sum(2) + w_now
    y = (num / (den + eps)).to(v.dtype)
    # This token fills the buffer: fold the P pending tokens and itself; else it takes slot n.
    full = (n == P).view(*n.shape, 1, 1)
    _add_tokens(kv_state, k_state, torch.cat([fkp, fk.unsqueeze(2)], 2) * full,
                torch.cat([vp.float(), v.float().unsqueeze(2)], 2))
    slot = n.long().clamp(max=P - 1).view(*n.shape, 1, 1)
    for buf, x in ((kp, k), (vp, v)):
        idx = slot.expand(*slot.shape[:2], 1, buf.shape[-1])
        buf.scatter_(2, idx, torch.where(full, buf.gather(2, idx), x.unsqueeze(2).to(buf.dtype)))
    n.copy_(torch.where(n == P, 0, n + 1))
    return y
