"""Taylor linear attention: one signature, several forms (see README.md in this folder for the maths)."""
from __future__ import annotations

import torch

from .chunk import chunk_taylor_linear_attn
from .common import DEFAULT_EPS, State, check_qkv, check_state, zero_state
from .feature_map import FEATURE_MAPS, taylor_feature_dim, taylor_feature_map
from .naive import naive_taylor_linear_attn
from .parallel import parallel_taylor_linear_attn
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


def _triton_available(q: torch.Tensor) -> bool:
    if not q.is_cuda:
        return False
    try:
        from . import triton as _  # noqa: F401
    except ImportError:
        return False
    return True


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
    Returns:
        o: [B, T, H, dv] in v's dtype, and the final state (fp32) or None.
    """
    check_qkv(q, k, v, feature_map)
    check_state(initial_state, q, v, feature_map)
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}: use one of {MODES}")
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}: use one of {BACKENDS}")
    if backend == "triton" or (backend == "auto" and mode in ("auto", "chunk") and _triton_available(q)):
        from .triton import triton_taylor_linear_attn

        return triton_taylor_linear_attn(
            q, k, v, feature_map=feature_map, scale=scale, eps=eps,
            initial_state=initial_state, output_final_state=output_final_state,
        )
    if mode == "auto":
        mode = "parallel" if q.shape[1] <= PARALLEL_MAX_T else "chunk"
    return _TORCH_FORMS[mode](
        q, k, v, feature_map=feature_map, scale=scale, eps=eps,
        initial_state=initial_state, output_final_state=output_final_state,
    )


__all__ = [
    "FEATURE_MAPS", "MODES", "State",
    "taylor_feature_map", "taylor_feature_dim", "taylor_linear_attn", "taylor_linear_attn_step",
    "naive_taylor_linear_attn", "parallel_taylor_linear_attn", "chunk_taylor_linear_attn",
    "recurrent_taylor_linear_attn", "zero_state",
]
