"""Taylor linear attention: one signature, several forms (see README.md in this folder for the maths)."""
from __future__ import annotations

import torch

from .chunk import chunk_taylor_linear_attn
from .common import DEFAULT_EPS, State, check_qkv, check_state, triton_available, zero_state
from .feature_map import FEATURE_MAPS, taylor_feature_dim, taylor_feature_map
from .naive import naive_taylor_linear_attn
from .parallel import parallel_taylor_linear_attn
from .pending import Pending, fold_pending, zero_pending
from .recurrent import recurrent_taylor_linear_attn, taylor_linear_attn_step

MODES = ("auto", "parallel", "chunk", "recurrent")
BACKENDS = ("auto", "torch", "triton")

_TORCH_FORMS = {
    "parallel": parallel_taylor_linear_attn,
    "chunk": chunk_taylor_linear_attn,
    "recurrent": recurrent_taylor_linear_attn,
}

# Below this length the [T, T] score matrix is cheaper than carrying a D_feat x dv state per chunk.
PARALLEL_MAX_T = 128


def _check_varlen(q: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, initial_state, feature_map: str) -> int:
    if q.shape[0] != 1:
        raise ValueError(f"with cu_seqlens, q must be [1, total_T, H, d] (sequences packed along T), got {tuple(q.shape)}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(f"cu_seqlens must be 1-D [N + 1], got shape {tuple(cu_seqlens.shape)}")
    cu = cu_seqlens.tolist()
    if cu[0] != 0 or cu[-1] != q.shape[1] or any(b < a for a, b in zip(cu, cu[1:])):
        raise ValueError(f"cu_seqlens must rise from 0 to total_T={q.shape[1]}, got {cu}")
    N = len(cu) - 1
    if initial_state is not None:
        H, d, dv = q.shape[2], q.shape[3], v.shape[-1]
        F = taylor_feature_dim(d, feature_map)
        kv, ks = initial_state
        if tuple(kv.shape) != (N, H, F, dv) or tuple(ks.shape) != (N, H, F):
            raise ValueError(
                f"with cu_seqlens, initial_state must be ([N, H, D_feat, dv], [N, H, D_feat]) = "
                f"({(N, H, F, dv)}, {(N, H, F)}), got {tuple(kv.shape)}, {tuple(ks.shape)}"
            )
    return N


def _torch_varlen(form, q, k, v, cu_seqlens, initial_state, output_final_state, **kw):
    """Reference path for packed sequences: each sequence on its own."""
    cu = cu_seqlens.tolist()
    outs, kvs, kss = [], [], []
    for n, (s, e) in enumerate(zip(cu, cu[1:])):
        state = None if initial_state is None else (initial_state[0][n : n + 1], initial_state[1][n : n + 1])
        if e == s:
            outs.append(v[:, s:e])
            if output_final_state:
                if state is None:
                    state = zero_state(1, q.shape[2], q.shape[-1], v.shape[-1], q.device, kw["feature_map"])
                kvs.append(state[0])
                kss.append(state[1])
            continue
        o, final = form(q[:, s:e], k[:, s:e], v[:, s:e], initial_state=state,
                        output_final_state=output_final_state, **kw)
        outs.append(o)
        if output_final_state:
            kvs.append(final[0])
            kss.append(final[1])
    o = torch.cat(outs, dim=1)
    return o, ((torch.cat(kvs), torch.cat(kss)) if output_final_state else None)


def taylor_linear_attn(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    mode: str = "auto",
    feature_map: str = "compact",
    scale: float | None = None,
    eps: float = DEFAULT_EPS,
    initial_state: State | None = None,
    output_final_state: bool = False,
    backend: str = "auto",
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, State | None]:
    """Causal linear attention with the 2nd-order Taylor kernel phi(q).phi(k) = 1 + s + s^2/2.

    Args:
        q, k: [B, T, H, d] (d is the feature dimension, 16 in the paper)
        v: [B, T, H, dv]
        mode: "parallel" (quadratic), "chunk" (linear time), "recurrent" (token by token) or "auto".
        feature_map: "compact" (1 + d + d(d+1)/2 features) or "full" (1 + d + d^2); same outputs,
            they differ only in the width D_feat of the state.
        scale: s = scale * q.k; defaults to d ** -0.5.
        eps: added to the denominator.
        initial_state: (kv [B, H, D_feat, dv], k_sum [B, H, D_feat]) fp32, from an earlier call's
            final_state: continues that sequence.
        output_final_state: also return the state after the last token.
        backend: "torch" (pure PyTorch), "triton" (fused GPU kernels) or "auto" (Triton on CUDA when
            installed, else PyTorch).
        cu_seqlens: int32 [N + 1] cumulative lengths of N sequences packed along T (flash-attn / fla
            convention); q, k, v are then [1, total_T, H, *] and states are [N, H, ...].
    Returns:
        o: [B, T, H, dv] in v's dtype, and the final state (fp32) or None.
    """
    check_qkv(q, k, v, feature_map)
    if cu_seqlens is None:
        check_state(initial_state, q, v, feature_map)
    else:
        _check_varlen(q, v, cu_seqlens, initial_state, feature_map)
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}: use one of {MODES}")
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}: use one of {BACKENDS}")
    if backend == "triton" or (backend == "auto" and mode in ("auto", "chunk") and triton_available(q)):
        from .triton import triton_taylor_linear_attn

        return triton_taylor_linear_attn(
            q, k, v, feature_map=feature_map, scale=scale, eps=eps,
            initial_state=initial_state, output_final_state=output_final_state, cu_seqlens=cu_seqlens,
        )
    if mode == "auto":
        mode = "parallel" if q.shape[1] <= PARALLEL_MAX_T else "chunk"
    if cu_seqlens is not None:
        return _torch_varlen(
            _TORCH_FORMS[mode], q, k, v, cu_seqlens, initial_state, output_final_state,
            feature_map=feature_map, scale=scale, eps=eps,
        )
    return _TORCH_FORMS[mode](
        q, k, v, feature_map=feature_map, scale=scale, eps=eps,
        initial_state=initial_state, output_final_state=output_final_state,
    )


__all__ = [
    "FEATURE_MAPS", "MODES", "State",
    "taylor_feature_map", "taylor_feature_dim", "taylor_linear_attn", "taylor_linear_attn_step",
    "naive_taylor_linear_attn", "parallel_taylor_linear_attn", "chunk_taylor_linear_attn",
    "recurrent_taylor_linear_attn", "zero_state", "Pending", "zero_pending", "fold_pending",
]
