"""Sliding-window softmax attention with rotary embeddings (BASED's local, exact mixer).

window_size counts the tokens a query sees, itself included (see based.ops.sliding_window_attn). The
reference code's window 256 is handed to FlashAttention as (128, 0), i.e. 129 tokens: window_size=129
here. Our presets use 128.
"""
from __future__ import annotations

import torch

from ..ops import sliding_window_attn
from .attention import Attention


class SlidingWindowAttention(Attention):
    """Causal attention over the last `window_size` tokens; decodes from a ring buffer of exactly
    window_size keys and values, so its state stops growing once the context passes the window.

    Args:
        d_model: model width.
        num_heads: heads (d_model / num_heads must be an even integer).
        window_size: tokens visible per query, itself included (>= 1).
        rotary_base: RoPE base.
        rotary: rotate q and k (RoPE), as Attention.
        qkv_bias: bias on the fused Wqkv projection.
        layer_idx: position in the model (bookkeeping only).
    """

    def __init__(
        self,
        d_model: int,
        num_heads: int,
        window_size: int,
        rotary_base: float = 10000.0,
        qkv_bias: bool = False,
        layer_idx: int | None = None,
        rotary: bool = True,
    ):
        if not isinstance(window_size, int) or isinstance(window_size, bool) or window_size <= 0:
            raise ValueError(f"window_size must be a positive int (tokens visible, self included), got {window_size!r}")
        super().__init__(d_model, num_heads, rotary_base=rotary_base, qkv_bias=qkv_bias, layer_idx=layer_idx,
                         rotary=rotary)
        self.window_size = window_size

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return sliding_window_attn(q, k, v, self.window_size)

    def cache_len(self, max_seq_len: int | None = None) -> int:
        return self.window_size

    def state_size(self, seq_len: int) -> int:
        return 2 * self.d_model * min(self.window_size, seq_len)
