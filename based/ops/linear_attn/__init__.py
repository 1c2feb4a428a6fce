"""Causal linear attention with any feature map, applied beforehand: the op behind the feature-map ablations
(Performer, CosFormer, PosELU, ReLU, identity; Taylor has its own op in based.ops.taylor).

    S_t = S_{t-1} + phi(k_t) v_t^T,   z_t = z_{t-1} + phi(k_t),   y_t = phi(q_t) S_t / (phi(q_t) . z_t + eps)

Without normalisation (maps that are not positive, e.g. identity, whose denominator can cross zero):
y_t = phi(q_t) S_t. Layout [B, T, H, F] for phi(q), phi(k) and [B, T, H, dv] for v; state (kv [B, H, F, dv],
k_sum [B, H, F]) in fp32, the layout of Taylor linear attention.
"""
from __future__ import annotations

import torch

State = tuple[torch.Tensor, torch.Tensor]
DEFAULT_CHUNK_SIZE = 64


def linear_attn(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    normalize: bool = True,
    eps: float = 1e-6,
    initial_state: State | None = None,
    output_final_state: bool = False,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> tuple[torch.Tensor, State | None]:
    """Chunked form, linear in T: masked scores inside a chunk, the running state across chunks.

    Args:
        q, k: [B, T, H, F] feature-mapped queries and keys.
        v: [B, T, H, dv].
        normalize: divide by phi(q_t) . z_t + eps.
        initial_state: (kv [B, H, F, dv], k_sum [B, H, F]) to continue from.
    Returns:
        o [B, T, H, dv] in v's dtype, and the final state (fp32) if asked.
    """
    if q.dim() != 4 or q.shape != k.shape or v.shape[:3] != q.shape[:3]:
        raise ValueError(f"q, k must be [B, T, H, F] and v [B, T, H, dv], got {q.shape}, {k.shape}, {v.shape}")
    B, T, H, F = q.shape
    qf, kf, vf = (t.float().transpose(1, 2) for t in (q, k, v))  # [B, H, T, *]
    if initial_state is None:
        kv = q.new_zeros(B, H, F, v.shape[-1], dtype=torch.float32)
        ks = q.new_zeros(B, H, F, dtype=torch.float32)
    else:
        kv, ks = initial_state
    mask = torch.ones(chunk_size, chunk_size, dtype=torch.bool, device=q.device).tril()
    outs = []
    for start in range(0, T, chunk_size):
        qc, kc, vc = (t[:, :, start : start + chunk_size] for t in (qf, kf, vf))
        n = qc.shape[2]
        a = (qc @ kc.transpose(-1, -2)).masked_fill(~mask[:n, :n], 0)  # [B, H, n, n]
        num = qc @ kv + a @ vc
        if normalize:
            num = num / ((qc * ks.unsqueeze(2)).sum(-1) + a.sum(-1) + eps).unsqueeze(-1)
        outs.append(num)
        # Out of place so autograd keeps each chunk's state.
        kv = kv + kc.transpose(-1, -2) @ vc
        ks = ks + kc.sum(2)
    o = torch.cat(outs, dim=2).transpose(1, 2).to(v.dtype)
    return o, ((kv, ks) if output_final_state else None)


def linear_attn_step(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_state: torch.Tensor, k_state: torch.Tensor,
    normalize: bool = True, eps: float = 1e-6,
) -> torch.Tensor:
    """One token: q, k [B, H, F], v [B, H, dv]; updates kv_state [B, H, F, dv] and k_state [B, H, F] in
    place and returns y [B, H, dv] in v's dtype."""
    qf, kf = q.float(), k.float()
    kv_state.add_(kf.unsqueeze(-1) * v.float().unsqueeze(-2))
    k_state.add_(kf)
    y = (qf.unsqueeze(-2) @ kv_state).squeeze(-2)
    if normalize:
        y = y / ((qf * k_state).sum(-1, keepdim=True) + eps)
    return y.to(v.dtype)


def naive_linear_attn(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, normalize: bool = True, eps: float = 1e-6
) -> torch.Tensor:
    """fp64 ground truth: the sums over s <= t written out with a [T, T] causal mask."""
    qd, kd, vd = (t.double().transpose(1, 2) for t in (q, k, v))
    T = q.shape[1]
    a = (qd @ kd.transpose(-1, -2)) * torch.ones(T, T, dtype=torch.float64, device=q.device).tril()
    o = a @ vd
    if normalize:
        o = o / (a.sum(-1, keepdim=True) + eps)
    return o.transpose(1, 2).to(v.dtype)


__all__ = ["linear_attn", "linear_attn_step", "naive_linear_attn"]
