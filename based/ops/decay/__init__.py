"""Linear attention with a scalar decay per head and token: Lightning Attention (TransNormerLLM) and
Mamba-2's SSD are both this op (see README.md in this folder for the maths).

    S_t = exp(g_t) S_{t-1} + k_t v_t^T,    o_t = scale * q_t^T S_t,    g_t <= 0

Lightning Attention: g_t = -slope_h, a fixed rate per head. Mamba-2: g_t = dt_t A_h, with k = B, q = C and
v = dt x. Layout [B, T, H, D] as the Taylor op; the state S [B, H, dk, dv] is fp32.
"""
from __future__ import annotations

import torch

from ..common import check_chunk_size, fused_training_call
from .chunk import DEFAULT_CHUNK_SIZE, chunk_decay_linear_attn, segsum
from .common import check_inputs, check_state, zero_state
from .naive import naive_decay_linear_attn
from .recurrent import decay_linear_attn_step

try:  # the fused training kernels need Triton; without it every call takes the chunked form
    from .triton import fused_decay_linear_attn
except ImportError:
    fused_decay_linear_attn = None


# dk, dv up to which the fused kernels run: on an H100 (benchmarks/results/decay-attn-h100-2026-12-07.json,
# forward + backward, 4 stacked runs) they are 1.7-3.4x the chunked form up to 64 but 0.9x at 128 and 0.6x at
# 256 (Lightning with one head), so wider heads take the chunked form until the kernels are tuned for them.
MAX_FUSED_DIM = 64


def _use_fused(q: torch.Tensor, v: torch.Tensor, initial_state: torch.Tensor | None, output_final_state: bool) -> bool:
    """The fused kernels serve training on CUDA (no state in or out, head dims up to MAX_FUSED_DIM);
    BASED_DECAY_FUSED=0 turns them off (for comparisons)."""
    return (max(q.shape[-1], v.shape[-1]) <= MAX_FUSED_DIM
            and fused_training_call(q, fused_decay_linear_attn, initial_state, output_final_state, "BASED_DECAY_FUSED"))


def decay_linear_attn(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    log_decay: torch.Tensor,
    *,
    scale: float = 1.0,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Causal linear attention with a scalar exponential decay per head and token, chunked (linear in T).

    Args:
        q, k: [B, T, H, dk]
        v: [B, T, H, dv]
        log_decay: g, [B, T, H] (per token, Mamba-2) or [H] (constant per head, Lightning), <= 0: the
            state is multiplied by exp(g_t) before token t is added.
        scale: o_t = scale * q_t^T S_t. 1 by default: neither TransNormerLLM nor Mamba-2 scales q.
        chunk_size: tokens per chunk of the PyTorch form (intra-chunk masked matmul, inter-chunk state); the
            fused Triton form (CUDA, no state in or out, see triton.py) picks its own.
        initial_state: S [B, H, dk, dv] (fp32) before the first token, e.g. an earlier call's final state.
        output_final_state: also return S after the last token.
    Returns:
        o: [B, T, H, dv] in v's dtype, and the final state [B, H, dk, dv] (fp32) or None.
    """
    check_inputs(q, k, v, log_decay)
    check_state(initial_state, q, v)
    check_chunk_size(chunk_size)
    if _use_fused(q, v, initial_state, output_final_state):
        return fused_decay_linear_attn(q, k, v, log_decay, scale=scale), None
    return chunk_decay_linear_attn(
        q, k, v, log_decay, scale=scale, initial_state=initial_state,
        output_final_state=output_final_state, chunk_size=chunk_size,
    )


__all__ = [
    "decay_linear_attn", "decay_linear_attn_step", "chunk_decay_linear_attn", "fused_decay_linear_attn",
    "naive_decay_linear_attn", "segsum", "zero_state",
]
