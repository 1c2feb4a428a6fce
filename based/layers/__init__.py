"""Token mixers and blocks, each with explicit kwargs; forward(x [B, T, d_model]) -> [B, T, d_model].

Every mixer also decodes: allocate_inference_cache(batch_size, dtype, device, max_seq_len) -> state,
forward(x, state, seqlen_offset) fills the state (prefill), step(x, state, seqlen_offset) decodes one token
in place; state_size(seq_len) and inference_state_bytes(seq_len, batch_size, dtype) report its size.
"""
from .attention import Attention
from .base_conv import BaseConv
from .linear_attention import LinearAttention
from .mlp import SwiGLU
from .norm import RMSNorm
from .rotary import RotaryEmbedding, apply_rotary
from .sliding_window import SlidingWindowAttention

__all__ = [
    "Attention", "BaseConv", "LinearAttention", "SlidingWindowAttention",
    "SwiGLU", "RMSNorm", "RotaryEmbedding", "apply_rotary",
]
