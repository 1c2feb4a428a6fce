"""Chunked form, linear in T: the state across chunks, the masked decayed scores inside a chunk.

For one head, a chunk of c tokens at local positions t, s in [0, c), the state S0 before it and the
per-channel log decay lambda = w_log <= 0 (channel i of the key):

    o_t   = (r_t * e^{lambda t})^T S0                                    (decay relative to the chunk start)
          + sum_{s<t} [sum_i r_ti k_si e^{lambda_i (t - 1 - s)}] v_s      (intra-chunk, masked)
          + (r_t * u . k_t) v_t                                           (the bonus of the current token)
    S_end = diag(e^{lambda c}) S0 + sum_s (k_s * e^{lambda (c - 1 - s)}) v_s^T   (relative to the chunk end)

Every exponent is lambda times a non-negative integer, so every exp is of a number <= 0 and none can
overflow, whatever the decay. The per-channel intra-chunk factor cannot be split into a query part times
a key part without a positive exponent (e^{lambda t} e^{-lambda s}, which overflows fp32 once
|lambda| c > 88), so the intra-chunk scores are summed directly, one lag t - s at a time (e^{lambda (lag-1)}
for all t at once): the same O(T c dk) work as the matmul, and recomputed in the backward pass
(activation checkpointing) rather than stored, so training memory stays O(T d). Across chunks only the
[dk, dv] state is carried, one decayed add per chunk; every chunk's contribution and output are batched
matmuls. All of it in fp32.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

DEFAULT_CHUNK_SIZE = 32


def _intra_scores(r: torch.Tensor, k: torch.Tensor, w_log: torch.Tensor) -> torch.Tensor:
    """r, k [B, H, N, C, dk], w_log [H, dk] -> A [B, H, N, C, C], A[t, s] = sum_i r_ti k_si e^{w_i (t-1-s)}
    for s < t, 0 elsewhere; one sub-diagonal (lag t - s) at a time, so no [C, C, dk] tensor is formed."""
    C = r.shape[-2]
    lam = w_log.view(1, -1, 1, 1, w_log.shape[-1])
    A = r.new_zeros(*r.shape[:-1], C)
    for lag in range(1, C):
        a = (r[..., lag:, :] * (k[..., :-lag, :] * torch.exp(lam * (lag - 1)))).sum(-1)  # A[t, t - lag]
        A.diagonal(offset=-lag, dim1=-2, dim2=-1).copy_(a)  # in place: no [.., C, C] temporaries per lag
    return A


def chunk_rwkv5_attn(
    r: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    w_log: torch.Tensor,
    u: torch.Tensor,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Shapes: r, k [B, T, H, dk]; v [B, T, H, dv]; w_log, u [H, dk]; state [B, H, dk, dv] fp32."""
    B, T, H, dk = r.shape
    dv = v.shape[-1]
    C = chunk_size
    N = -(-T // C)
    pad = N * C - T
    # [B, H, N, C, *]; zero padding: padded keys add nothing, padded outputs are dropped.
    rc, kc, vc = (F.pad(t.float().transpose(1, 2), (0, 0, 0, pad)).unflatten(2, (N, C)) for t in (r, k, v))
    lam = w_log.float()  # [H, dk]
    lam5 = lam.view(1, H, 1, 1, dk)
    pos = torch.arange(C, device=r.device, dtype=torch.float32).view(C, 1)
    # Tokens in each chunk (the last one may be short): its state decays over exactly that many steps.
    lens = (T - C * torch.arange(N, device=r.device)).clamp(max=C).to(torch.float32).view(N, 1, 1)  # [N, 1, 1]
    k_end = kc * torch.exp(lam5 * (lens - 1 - pos).clamp(min=0))  # padded keys: e^0, not e^{positive}, times 0
    contrib = k_end.transpose(-1, -2) @ vc  # [B, H, N, dk, dv]
    chunk_decay = torch.exp(lam.view(1, H, 1, dk) * lens.view(1, 1, N, 1)).unsqueeze(-1)  # [1, H, N, dk, 1]
    S = initial_state.float() if initial_state is not None else r.new_zeros(B, H, dk, dv, dtype=torch.float32)
    before = []
    for n in range(N):
        before.append(S)
        S = chunk_decay[:, :, n] * S + contrib[:, :, n]
    o = (rc * torch.exp(lam5 * pos)) @ torch.stack(before, dim=2)  # [B, H, N, C, dv]
    # Not under torch.func transforms (stacked MQAR training vmaps grad): they refuse checkpoint's hooks.
    if (torch.is_grad_enabled() and any(t.requires_grad for t in (r, k, w_log))
            and not torch._C._functorch.is_functorch_wrapped_tensor(rc)):
        A = checkpoint(_intra_scores, rc, kc, lam, use_reentrant=False)
    else:
        A = _intra_scores(rc, kc, lam)
    A = A + torch.diag_embed((rc * u.float().view(1, H, 1, 1, dk) * kc).sum(-1))
    o = (o + A @ vc).flatten(2, 3)[:, :, :T].transpose(1, 2).to(v.dtype)
    return o, (S if output_final_state else None)
