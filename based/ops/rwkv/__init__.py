"""RWKV-5 ("Eagle", Peng et al., 2024) attention: a matrix-valued state per head with a learned decay per
key channel and a bonus for the current token (see README.md in this folder for the maths).

    o_t = r_t^T (S_{t-1} + diag(u) k_t v_t^T),    S_t = diag(w) S_{t-1} + k_t v_t^T,    w = exp(w_log)

Layout [B, T, H, D] as the other ops; state S [B, H, dk, dv] in fp32.
"""
from __future__ import annotations

import torch

from ..common import check_chunk_size, fused_training_call
from ..decay.common import zero_state  # the same [B, H, dk, dv] fp32 matrix state
from .chunk import DEFAULT_CHUNK_SIZE, chunk_rwkv5_attn
from .common import check_inputs
from .naive import naive_rwkv5_attn
from .recurrent import rwkv5_step

try:  # the fused training kernels need Triton; without it every call takes the chunked form
    from .triton import fused_rwkv5_attn
except ImportError:
    fused_rwkv5_attn = None


def rwkv5_attn(
    r: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    w_log: torch.Tensor,
    u: torch.Tensor,
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Causal RWKV-5 attention, linear in T: chunked, or on CUDA without initial or final state (training) the
    fused Triton kernels of triton.py (BASED_RWKV_FUSED=0 turns them off).

    Args:
        r, k: [B, T, H, dk] receptance and key.
        v: [B, T, H, dv]
        w_log: [H, dk] log of the per-channel decay, <= 0 (RWKV-5: -exp(time_decay)); not checked, as
            that would read it back from the device.
        u: [H, dk] bonus of the current token (RWKV-5's time_faaaa).
        chunk_size: tokens per chunk (16 to 64 are sensible).
        initial_state: S [B, H, dk, dv] from an earlier call's final state: continues that sequence.
        output_final_state: also return S after the last token.
    Returns:
        o [B, T, H, dv] in v's dtype, and the final state (fp32) or None.
    """
    check_inputs(r, k, v, w_log, u, initial_state)
    check_chunk_size(chunk_size)
    if fused_training_call(r, fused_rwkv5_attn, initial_state, output_final_state, "BASED_RWKV_FUSED"):
        return fused_rwkv5_attn(r, k, v, w_log, u), None
    return chunk_rwkv5_attn(
        r, k, v, w_log, u, initial_state=initial_state, output_final_state=output_final_state, chunk_size=chunk_size
    )


__all__ = ["DEFAULT_CHUNK_SIZE", "rwkv5_attn", "rwkv5_step", "chunk_rwkv5_attn", "naive_rwkv5_attn", "zero_state"]
