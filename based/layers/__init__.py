"""Token mixers and blocks, each with explicit kwargs; forward(x [B, T, d_model]) -> [B, T, d_model].

Every mixer also decodes: allocate_inference_cache(batch_size, dtype, device, max_seq_len) -> state,
forward(x, state, seqlen_offset) fills the state (prefill), step(x, state, seqlen_offset) decodes one token
in place; state_size(seq_len) and inference_state_bytes(seq_len, batch_size, dtype) report its size.
"""
from .attention import Attention
from .base_conv import BaseConv
from .feature_maps import FEATURE_MAP_ABLATIONS, FeatureMapLinearAttention
from .h3 import H3
from .hyena import Hyena
from .lightning import LightningAttention
from .linear_attention import LinearAttention
from .mamba import Mamba
from .mamba2 import Mamba2
from .mlp import SwiGLU
from .norm import RMSNorm
from .rotary import RotaryEmbedding, apply_rotary
from .rwkv import RWKV
from .sliding_window import SlidingWindowAttention

__all__ = [
    "Attention", "BaseConv", "LinearAttention", "SlidingWindowAttention",
    "FeatureMapLinearAttention", "FEATURE_MAP_ABLATIONS", "Mamba", "H3", "Hyena",
    "LightningAttention", "Mamba2", "RWKV",
    "SwiGLU", "RMSNorm", "RotaryEmbedding", "apply_rotary",
]
