"""fp32 ground truth: explicit feature map, quadratic causal sums. Slow and simple on purpose."""
from __future__ import annotations

import torch

from .common import DEFAULT_EPS, State
from .feature_map import taylor_feature_map


def naive_taylor_linear_attn(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    feature_map: str = "compact",
    scale: float | None = None,
    eps: float = DEFAULT_EPS,
    initial_state: State | None = None,
    output_final_state: bool = False,
) -> tuple[torch.Tensor, State | None]:
    """y_t = sum_{s<=t} phi(q_t).phi(k_s) v_s / (sum_{s<=t} phi(q_t).phi(k_s) + eps), in fp32 (fp64 kept).

    Shapes: q, k [B, T, H, d]; v [B, T, H, dv]; state (kv [B, H, F, dv], k_sum [B, H, F]).
    """
    dtype = torch.promote_types(q.dtype, torch.float32)
    fq = taylor_feature_map(q.to(dtype), feature_map, scale).transpose(1, 2)  # [B, H, T, F]
    fk = taylor_feature_map(k.to(dtype), feature_map, scale).transpose(1, 2)
    vv = v.to(dtype).transpose(1, 2)  # [B, H, T, dv]
    T = q.shape[1]
    mask = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
    a = (fq @ fk.transpose(-1, -2)).masked_fill(~mask, 0)  # [B, H, T, T]
    num, den = a @ vv, a.sum(-1)
    if initial_state is not None:
        kv0, ks0 = initial_state
        num = num + fq @ kv0.to(dtype)
        den = den + (fq * ks0.to(dtype).unsqueeze(2)).sum(-1)
    o = (num / (den + eps).unsqueeze(-1)).transpose(1, 2).to(v.dtype)
    final = None
    if output_final_state:
        kv = fk.transpose(-1, -2) @ vv
        ks = fk.sum(2)
        if initial_state is not None:
            kv, ks = kv + initial_state[0].to(dtype), ks + initial_state[1].to(dtype)
        final = (kv.float() if dtype == torch.float32 else kv, ks.float() if dtype == torch.float32 else ks)
    return o, final
