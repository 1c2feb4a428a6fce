"""Taylor linear attention (BASED, Arora et al., 2024, section 4): the global mixer with a fixed-size state.

q and k are projected to a small feature_dim per head; the kernel phi(q).phi(k) = 1 + s + s^2/2 with
s = q.k / sqrt(feature_dim) replaces exp(s). Decoding keeps kv [H, D_feat, head_dim] and k_sum [H, D_feat]
per sequence in fp32, whatever the context length, and (fold_every > 1) the last few tokens' k and v, which
it folds into kv and k_sum once every fold_every tokens (based/ops/taylor/pending.py: the step then reads the
fp32 state every token but writes it only then).
"""
from __future__ import annotations

import torch
from torch import nn

from ..ops import (
    FEATURE_MAPS, fold_pending, taylor_feature_dim, taylor_linear_attn, taylor_linear_attn_step, zero_pending,
)
from .state import Offset, State, carried_state, state_nbytes


class LinearAttention(nn.Module):
    """Causal linear attention with the 2nd-order Taylor feature map.

    Args:
        d_model: model width.
        feature_dim: q/k size per head (16 in the paper).
        num_heads: heads.
        head_dim: v size per head (default d_model // num_heads).
        feature_map: "compact" (1 + d + d(d+1)/2 state features) or "full" (1 + d + d^2).
        eps: added to the normaliser.
        fold_every: decoding writes the fp32 state once every this many tokens (1: every token); the tokens
            between wait in a pending buffer of fold_every - 1 slots. Outputs are the same either way.
        layer_idx: position in the model (bookkeeping only).
    """

    def __init__(
        self,
        d_model: int,
        feature_dim: int = 16,
        num_heads: int = 16,
        head_dim: int | None = None,
        feature_map: str = "compact",
        eps: float = 1e-6,
        layer_idx: int | None = None,
        fold_every: int = 8,
    ):
        super().__init__()
        if isinstance(fold_every, bool) or not isinstance(fold_every, int) or fold_every < 1:
            raise ValueError(f"fold_every must be an int >= 1 (1: write the state every token), got {fold_every!r}")
        if d_model <= 0 or num_heads <= 0:
            raise ValueError(f"d_model and num_heads must be positive, got d_model={d_model}, num_heads={num_heads}")
        if feature_dim <= 0:
            raise ValueError(f"feature_dim must be positive, got {feature_dim}")
        if feature_map not in FEATURE_MAPS:
            raise ValueError(f"unknown feature_map {feature_map!r}: use one of {FEATURE_MAPS}")
        if head_dim is None:
            if d_model % num_heads:
                raise ValueError(f"d_model={d_model} is not divisible by num_heads={num_heads}; pass head_dim")
            head_dim = d_model // num_heads
        if head_dim <= 0:
            raise ValueError(f"head_dim must be positive, got {head_dim}")
        self.d_model, self.feature_dim, self.num_heads, self.head_dim = d_model, feature_dim, num_heads, head_dim
        self.feature_map, self.eps, self.layer_idx, self.fold_every = feature_map, eps, layer_idx, fold_every
        self.proj_q = nn.Linear(d_model, num_heads * feature_dim, bias=False)
        self.proj_k = nn.Linear(d_model, num_heads * feature_dim, bias=False)
        self.proj_v = nn.Linear(d_model, num_heads * head_dim, bias=False)
        self.out_proj = nn.Linear(num_heads * head_dim, d_model, bias=False)

    @property
    def state_features(self) -> int:
        """D_feat, the width of phi(k)."""
        return taylor_feature_dim(self.feature_dim, self.feature_map)

    def state_size(self, seq_len: int) -> int:
        """Values per sequence held for decoding: H*head_dim*D_feat + H*D_feat, whatever seq_len."""
        return self.num_heads * self.state_features * (self.head_dim + 1)

    def allocate_inference_cache(
        self, batch_size: int, dtype=None, device=None, max_seq_len: int | None = None
    ) -> State:
        """(kv [B, H, D_feat, head_dim], k_sum [B, H, D_feat]), always fp32: k_sum's first entry counts
        tokens, which bf16 stops representing exactly past 256. With fold_every > 1, then the pending buffer
        (k [B, H, fold_every - 1, feature_dim], v [B, H, fold_every - 1, head_dim] in `dtype`, which holds
        the projections' outputs exactly, and their count [B, H] int32)."""
        device = device or self.proj_q.weight.device
        B, H, F = batch_size, self.num_heads, self.state_features
        state = (
            torch.zeros(B, H, F, self.head_dim, dtype=torch.float32, device=device),
            torch.zeros(B, H, F, dtype=torch.float32, device=device),
        )
        if self.fold_every == 1:
            return state
        dtype = dtype or self.proj_v.weight.dtype
        return state + zero_pending(B, H, self.feature_dim, self.head_dim, self.fold_every, dtype, device)

    def inference_state_bytes(self, seq_len: int, batch_size: int = 1, dtype=None) -> int:
        return state_nbytes(self.allocate_inference_cache(batch_size, dtype, "meta", max_seq_len=seq_len))

    def decode_traffic_bytes(self, batch_size: int = 1, dtype=None) -> int:
        """Bytes a decode step moves through the state, averaged over steps: kv and k_sum read every token
        and written every fold_every-th, the pending buffer read (all of it, an upper bound) and one slot
        written."""
        kv, ks, *pending = self.allocate_inference_cache(batch_size, dtype, "meta")
        fp32, buffered, slots = state_nbytes((kv, ks)), state_nbytes(pending), self.fold_every - 1
        return round(fp32 * (1 + 1 / self.fold_every)) + (buffered + buffered // slots if slots else 0)

    def _qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        shape = x.shape[:-1]
        q = self.proj_q(x).view(*shape, self.num_heads, self.feature_dim)
        k = self.proj_k(x).view(*shape, self.num_heads, self.feature_dim)
        v = self.proj_v(x).view(*shape, self.num_heads, self.head_dim)
        return q, k, v

    def forward(self, x: torch.Tensor, state: State | None = None, seqlen_offset: Offset = 0) -> torch.Tensor:
        """x [B, T, d_model] -> [B, T, d_model]. With `state` (prefill), continues from it (empty at
        seqlen_offset 0) and leaves the state after the last token in it."""
        B, T, _ = x.shape
        q, k, v = self._qkv(x)
        if state is not None and len(state) > 2:  # the pending tokens into kv and k_sum first
            fold_pending(*state[:2], state[2:], self.feature_map)
            state = state[:2]
        initial = None if state is None else carried_state(state, seqlen_offset)
        o, final = taylor_linear_attn(
            q, k, v, feature_map=self.feature_map, eps=self.eps,
            initial_state=initial, output_final_state=state is not None,
        )
        if state is not None:
            for s, f in zip(state, final):
                s.copy_(f)
        return self.out_proj(o.reshape(B, T, -1))

    def step(self, x: torch.Tensor, state: State, seqlen_offset: Offset = 0) -> torch.Tensor:
        """Decode one token per sequence; updates `state` in place. The position is not needed: the
        state carries everything. x: [B, d_model] or [B, 1, d_model] -> same shape."""
        B = x.shape[0]
        y = self.step_attend(*self._qkv(x.reshape(B, self.d_model)), state)
        return self.out_proj(y).view_as(x)

    def step_attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, state: State) -> torch.Tensor:
        """The step between the projections: proj_q/k/v's outputs ([B, H * feature_dim] twice, [B, H * head_dim],
        or those viewed per head) -> [B, H * head_dim] (what out_proj takes), the state updated in place."""
        B = q.shape[0]
        q, k = (t.view(B, self.num_heads, self.feature_dim) for t in (q, k))
        v = v.view(B, self.num_heads, self.head_dim)
        y = taylor_linear_attn_step(q, k, v, *state[:2], feature_map=self.feature_map, eps=self.eps,
                                    pending=state[2:] or None)
        return y.reshape(B, -1)
