"""Causal softmax attention with rotary embeddings: the mixer of Transformer++ (Touvron et al., 2023).

SlidingWindowAttention (sliding_window.py) subclasses it: it sets `window_size`, which bounds which keys
a query sees and how many rows the decode cache keeps. The decode cache is a ring of `cache_len` rows,
position p in row p % cache_len: for full attention cache_len = max_seq_len, so the ring never wraps.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..ops.decode_attn import cached_positions, decode_attn_step, ring_write
from .rotary import RotaryEmbedding
from .state import Offset, State, check_fits, state_nbytes, token_positions


def check_heads(d_model: int, num_heads: int) -> int:
    """head_dim = d_model / num_heads, which must be a whole, even number (rotary pairs)."""
    if d_model <= 0 or num_heads <= 0:
        raise ValueError(f"d_model and num_heads must be positive, got d_model={d_model}, num_heads={num_heads}")
    if d_model % num_heads:
        raise ValueError(f"d_model={d_model} is not divisible by num_heads={num_heads}")
    head_dim = d_model // num_heads
    if head_dim % 2:
        raise ValueError(f"head_dim = d_model / num_heads = {head_dim} must be even for rotary embeddings")
    return head_dim


class Attention(nn.Module):
    """Full causal softmax attention.

    Args:
        d_model: model width.
        num_heads: heads (d_model / num_heads must be an even integer).
        rotary_base: RoPE base.
        rotary: rotate q and k (RoPE); False for position-free attention (Zoology's MQAR models, whose
            positions come from their BaseConv).
        qkv_bias: bias on the fused Wqkv projection.
        layer_idx: position in the model (bookkeeping only).
    """

    window_size: int | None = None  # keys visible per query, self included; None = all
    # The decode state is a cache of past tokens: a step reads all of it and writes only the new token's row.
    state_is_cache = True

    @property
    def state_grows_with_context(self) -> bool:
        """Whether the decode state holds every token (full attention), so that it bounds the context."""
        return self.window_size is None

    def __init__(
        self,
        d_model: int,
        num_heads: int,
        rotary_base: float = 10000.0,
        qkv_bias: bool = False,
        layer_idx: int | None = None,
        rotary: bool = True,
    ):
        super().__init__()
        self.head_dim = check_heads(d_model, num_heads)
        self.d_model, self.num_heads, self.layer_idx = d_model, num_heads, layer_idx
        self.Wqkv = nn.Linear(d_model, 3 * d_model, bias=qkv_bias)
        self.out_proj = nn.Linear(d_model, d_model, bias=False)
        self.rotary = RotaryEmbedding(self.head_dim, rotary_base) if rotary else None

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Attention within one fresh sequence; q, k, v [B, T, H, D] -> [B, T, H, D]."""
        o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
        return o.transpose(1, 2)

    def cache_len(self, max_seq_len: int | None) -> int:
        """Rows of the decode cache: every position below max_seq_len."""
        if max_seq_len is None or max_seq_len <= 0:
            raise ValueError(f"full attention preallocates its KV cache: pass max_seq_len > 0, got {max_seq_len!r}")
        return max_seq_len

    def state_size(self, seq_len: int) -> int:
        """Values per sequence held for decoding after seq_len tokens (keys and values)."""
        return 2 * self.d_model * seq_len

    def allocate_inference_cache(
        self, batch_size: int, dtype=None, device=None, max_seq_len: int | None = None
    ) -> State:
        """(k_cache, v_cache), each [B, cache_len, H, D]; keys are stored with rotary applied."""
        w = self.Wqkv.weight
        shape = (batch_size, self.cache_len(max_seq_len), self.num_heads, self.head_dim)
        kw = dict(dtype=dtype or w.dtype, device=device or w.device)
        return torch.zeros(shape, **kw), torch.zeros(shape, **kw)

    def inference_state_bytes(self, seq_len: int, batch_size: int = 1, dtype=None) -> int:
        """Bytes that allocate_inference_cache takes for a context of seq_len tokens."""
        return state_nbytes(self.allocate_inference_cache(batch_size, dtype, "meta", max_seq_len=seq_len))

    def forward(self, x: torch.Tensor, state: State | None = None, seqlen_offset: Offset = 0) -> torch.Tensor:
        """x [B, T, d_model] -> [B, T, d_model].

        With `state` (prefill), the chunk's keys and values are also written to it, and at
        seqlen_offset > 0 the queries see the cached earlier tokens as well.
        """
        B, T, _ = x.shape
        q, k, v = self._qkv(x, seqlen_offset)
        if state is None:
            o = self._attend(q, k, v)
        else:
            self._check_fits(state, seqlen_offset, T)
            positions = token_positions(seqlen_offset, B, T, x.device)
            fresh = not isinstance(seqlen_offset, torch.Tensor) and seqlen_offset == 0
            o = self._attend(q, k, v) if fresh else self._attend_cached(q, k, v, state, positions)
            ring_write(*state, k, v, positions)
        return self.out_proj(o.reshape(B, T, self.d_model))

    def step(self, x: torch.Tensor, state: State, seqlen_offset: Offset) -> torch.Tensor:
        """Decode one token per sequence and update `state` in place (no host sync, no data-dependent branch).

        Args:
            x: [B, d_model] or [B, 1, d_model]
            state: from allocate_inference_cache, holding this sequence's positions < seqlen_offset.
            seqlen_offset: position of the token, int or LongTensor [B].
        Returns:
            same shape as x.
        """
        B = x.shape[0]
        o = self.step_attend(self.Wqkv(x.reshape(B, self.d_model)), state, seqlen_offset)
        return self.out_proj(o).view_as(x)

    def step_attend(self, qkv: torch.Tensor, state: State, seqlen_offset: Offset) -> torch.Tensor:
        """The step between the projections: Wqkv's output [B, 3 * d_model] -> attention output [B, d_model]
        (what out_proj takes); rotary, the cache write and the attention in one op (one Triton kernel on
        CUDA)."""
        B = qkv.shape[0]
        self._check_fits(state, seqlen_offset, 1)
        pos = token_positions(seqlen_offset, B, 1, qkv.device)[:, 0]
        q, k, v = qkv.view(B, 3, self.num_heads, self.head_dim).unbind(1)
        inv_freq = None if self.rotary is None else self.rotary.cached_inv_freq(qkv.device)
        o = decode_attn_step(q, k, v, state[0], state[1], pos, inv_freq)
        return o.reshape(B, self.d_model)

    def _qkv(self, x: torch.Tensor, seqlen_offset: Offset) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        B, T, _ = x.shape
        q, k, v = self.Wqkv(x).view(B, T, 3, self.num_heads, self.head_dim).unbind(2)
        if self.rotary is not None:
            q, k = self.rotary(q, k, seqlen_offset)
        return q, k, v

    def _check_fits(self, state: State, seqlen_offset: Offset, T: int) -> None:
        if self.window_size is None:  # a window's ring cache holds any position
            check_fits(state[0].shape[1], seqlen_offset, T, "the KV cache")

    def _attend_cached(self, q, k, v, state: State, positions: torch.Tensor) -> torch.Tensor:
        """Queries at `positions` [B, T] over the cached earlier tokens plus the new ones."""
        k_cache, v_cache = state
        cached = cached_positions(positions[:, 0] - 1, k_cache.shape[1])  # [B, L]
        keys = torch.cat([k_cache.to(q.dtype), k], dim=1)
        values = torch.cat([v_cache.to(v.dtype), v], dim=1)
        qp = positions.unsqueeze(-1)  # [B, T, 1]
        kp = torch.cat([cached, positions], dim=1).unsqueeze(1)  # [B, 1, L + T]
        mask = (kp >= 0) & (kp <= qp)
        if self.window_size is not None:
            mask &= kp > qp - self.window_size
        o = F.scaled_dot_product_attention(
            q.transpose(1, 2), keys.transpose(1, 2), values.transpose(1, 2), attn_mask=mask.unsqueeze(1)
        )
        return o.transpose(1, 2)
