"""Parallel (quadratic) form: the kernel 1 + s + s^2/2 on the [T, T] score matrix, no feature map.

O(T^2) time and memory, but only d-wide dot products: the fastest PyTorch form for short sequences.
"""
from __future__ import annotations

import torch

from .common import DEFAULT_EPS, State
from .feature_map import taylor_feature_map


def taylor_kernel_scores(q: torch.Tensor, k: torch.Tensor, scale: float, causal_offset: int = 0) -> torch.Tensor:
    """A[i, j] = 1 + s + s^2/2 with s = scale q_i.k_j, zero where key j is after query i.

    q [.., Tq, d], k [.., Tk, d]; query i sits at position i + causal_offset of the key axis.
    """
    s = (q @ k.transpose(-1, -2)) * scale
    a = 1 + s + 0.5 * s * s
    Tq, Tk = q.shape[-2], k.shape[-2]
    mask = torch.ones(Tq, Tk, dtype=torch.bool, device=q.device).tril(causal_offset)
    return a.masked_fill(~mask, 0)


def parallel_taylor_linear_attn(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    feature_map: str = "compact",
    scale: float | None = None,
    eps: float = DEFAULT_EPS,
    initial_state: State | None = None,
    output_final_state: bool = False,
) -> tuple[torch.Tensor, State | None]:
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    qf, kf, vf = (t.float().transpose(1, 2) for t in (q, k, v))  # [B, H, T, *]
    a = taylor_kernel_scores(qf, kf, scale)
    num, den = a @ vf, a.sum(-1)
    if initial_state is not None:
        fq = taylor_feature_map(qf, feature_map, scale)
        num = num + fq @ initial_state[0]
        den = den + (fq * initial_state[1].unsqueeze(2)).sum(-1)
    o = (num / (den + eps).unsqueeze(-1)).transpose(1, 2).to(v.dtype)
    final = None
    if output_final_state:
        fk = taylor_feature_map(kf, feature_map, scale)
        kv, ks = fk.transpose(-1, -2) @ vf, fk.sum(2)
        if initial_state is not None:
            kv, ks = kv + initial_state[0], ks + initial_state[1]
        final = (kv, ks)
    return o, final
