"""Token-mixing operators, layout [B, T, H, D]. Pure PyTorch everywhere; fused Triton kernels on GPU."""
from .argmax import argmax_rows
from .conv import conv_state_zeros, naive_short_conv, short_conv, short_conv_step
from .decode_attn import decode_attn, decode_attn_step
from .sliding_window import naive_sliding_window_attn, sliding_window_attn
from .taylor import (
    FEATURE_MAPS,
    chunk_taylor_linear_attn,
    fold_pending,
    naive_taylor_linear_attn,
    parallel_taylor_linear_attn,
    recurrent_taylor_linear_attn,
    taylor_feature_dim,
    taylor_feature_map,
    taylor_linear_attn,
    taylor_linear_attn_step,
    zero_pending,
    zero_state,
)

__all__ = [
    "FEATURE_MAPS", "taylor_feature_map", "taylor_feature_dim", "taylor_linear_attn", "taylor_linear_attn_step",
    "naive_taylor_linear_attn", "parallel_taylor_linear_attn", "chunk_taylor_linear_attn",
    "recurrent_taylor_linear_attn", "zero_state", "zero_pending", "fold_pending",
    "sliding_window_attn", "naive_sliding_window_attn",
    "short_conv", "short_conv_step", "naive_short_conv", "conv_state_zeros",
    "decode_attn", "decode_attn_step", "argmax_rows",
]
