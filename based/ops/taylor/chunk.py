"""Chunked form, linear in T: inside a chunk the masked kernel scores (parallel form), across chunks
the running fp32 state (kv, k_sum) read through phi(q).

For chunk c with queries Q_c, keys K_c, values V_c and state S = sum of phi(k) v^T before the chunk:
    num_c = phi(Q_c) S + tril(A(Q_c, K_c)) V_c,    den_c = phi(Q_c) z + rowsum(tril(A(Q_c, K_c)))
    S += phi(K_c)^T V_c,                           z += sum phi(K_c)
"""
from __future__ import annotations

import torch

from .common import DEFAULT_EPS, State, zero_state
from .feature_map import taylor_feature_map
from .parallel import taylor_kernel_scores

DEFAULT_CHUNK_SIZE = 64


def chunk_taylor_linear_attn(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    feature_map: str = "compact",
    scale: float | None = None,
    eps: float = DEFAULT_EPS,
    initial_state: State | None = None,
    output_final_state: bool = False,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> tuple[torch.Tensor, State | None]:
    B, T, H, d = q.shape
    dv = v.shape[-1]
    scale = d**-0.5 if scale is None else scale
    qf, kf, vf = (t.float().transpose(1, 2) for t in (q, k, v))  # [B, H, T, *]
    if initial_state is None:
        kv, ks = zero_state(B, H, d, dv, q.device, feature_map)
    else:
        kv, ks = initial_state
    outs = []
    for start in range(0, T, chunk_size):
        qc, kc, vc = (t[:, :, start : start + chunk_size] for t in (qf, kf, vf))
        fq, fk = taylor_feature_map(qc, feature_map, scale), taylor_feature_map(kc, feature_map, scale)
        a = taylor_kernel_scores(qc, kc, scale)
        num = fq @ kv + a @ vc
        den = (fq * ks.unsqueeze(2)).sum(-1) + a.sum(-1)
        outs.append(num / (den + eps).unsqueeze(-1))
        # Out of place so autograd keeps each chunk's state.
        kv = kv + fk.transpose(-1, -2) @ vc
        ks = ks + fk.sum(2)
    o = torch.cat(outs, dim=2).transpose(1, 2).to(v.dtype)
    return o, ((kv, ks) if output_final_state else None)
