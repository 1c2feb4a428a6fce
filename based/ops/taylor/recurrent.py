"""Recurrent form: one token at a time against the fp32 state, as in decoding.

    S_t = S_{t-1} + phi(k_t) v_t^T,  z_t = z_{t-1} + phi(k_t),  y_t = phi(q_t) S_t / (phi(q_t) . z_t + eps)
"""
from __future__ import annotations

import torch

from .common import DEFAULT_EPS, State, triton_available, zero_state
from .feature_map import taylor_feature_map
from .pending import Pending, pending_step


def _triton_step_ok(q, k, v, kv_state: torch.Tensor, k_state: torch.Tensor, pending: Pending | None) -> bool:
    if not all(t.is_contiguous() for t in (kv_state, k_state, *(pending or ()))):
        return False
    if kv_state.dtype != torch.float32 or k_state.dtype != torch.float32:
        return False
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad or kv_state.requires_grad):
        return False  # the kernel is not differentiable: keep autograd on the PyTorch path
    return triton_available(q)


def taylor_linear_attn_step(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_state: torch.Tensor,
    k_state: torch.Tensor,
    feature_map: str = "compact",
    scale: float | None = None,
    eps: float = DEFAULT_EPS,
    backend: str = "auto",
    pending: Pending | None = None,
) -> torch.Tensor:
    """Decode one token and update the state in place.

    Args:
        q, k: [B, H, d]; v: [B, H, dv]
        kv_state: [B, H, D_feat, dv] fp32, k_state: [B, H, D_feat] fp32 (both updated in place)
        backend: "torch", "triton" (one fused kernel; needs contiguous states) or "auto" (Triton on
            CUDA when installed and the states are contiguous, else PyTorch).
        pending: (k [B, H, P, d], v [B, H, P, dv], n [B, H] int32) from based.ops.taylor.zero_pending: defer
            the state's update, reading kv_state every token but writing it every P + 1 (pending.py);
            updated in place. The state of the sequence is then kv_state plus the pending tokens.
    Returns:
        y: [B, H, dv] in v's dtype
    """
    if backend not in ("auto", "torch", "triton"):
        raise ValueError(f"unknown backend {backend!r}: use one of ('auto', 'torch', 'triton')")
    if backend == "triton" or (backend == "auto" and _triton_step_ok(q, k, v, kv_state, k_state, pending)):
        from .triton import triton_taylor_linear_attn_step

        return triton_taylor_linear_attn_step(q, k, v, kv_state, k_state, feature_map, scale, eps, pending=pending)
    if pending is not None:
        return pending_step(q, k, v, kv_state, k_state, pending, feature_map, scale, eps)
    fq = taylor_feature_map(q.float(), feature_map, scale)  # [B, H, F]
    fk = taylor_feature_map(k.float(), feature_map, scale)
    kv_state.add_(fk.unsqueeze(-1) * v.float().unsqueeze(-2))
    k_state.add_(fk)
    num = (fq.unsqueeze(-2) @ kv_state).squeeze(-2)
    den = (fq * k_state).sum(-1, keepdim=True)
    return (num / (den + eps)).to(v.dtype)


def recurrent_taylor_linear_attn(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    feature_map: str = "compact",
    scale: float | None = None,
    eps: float = DEFAULT_EPS,
    initial_state: State | None = None,
    output_final_state: bool = False,
) -> tuple[torch.Tensor, State | None]:
    B, T, H, d = q.shape
    dv = v.shape[-1]
    fq = taylor_feature_map(q.float(), feature_map, scale)  # [B, T, H, F]
    fk = taylor_feature_map(k.float(), feature_map, scale)
    vf = v.float()
    if initial_state is None:
        kv, ks = zero_state(B, H, d, dv, q.device, feature_map)
    else:
        kv, ks = initial_state
    outs = []
    for t in range(T):
        # Out of place so gradients flow through the whole recurrence.
        kv = kv + fk[:, t].unsqueeze(-1) * vf[:, t].unsqueeze(-2)
        ks = ks + fk[:, t]
        num = (fq[:, t].unsqueeze(-2) @ kv).squeeze(-2)
        den = (fq[:, t] * ks).sum(-1, keepdim=True)
        outs.append(num / (den + eps))
    o = torch.stack(outs, dim=1).to(v.dtype) if T else v.new_zeros(B, 0, H, dv)
    return o, ((kv, ks) if output_final_state else None)
