"""Feature-map ablations of linear attention (BASED, Arora et al., 2024, section 4.1 and appendix):
the same layer as LinearAttention with phi swapped.

    taylor     1 + x/d^(1/4) + x x^T/(sqrt(2) sqrt(d))  (BASED; the fast Taylor op)   1 + d + d(d+1)/2
    performer  exp(W x' - |x'|^2/2) / sqrt(m), x' = x/d^(1/4), W ~ N(0, I)  (FAVOR+)    m
    cosformer  [relu(x) cos(pi p / 2M), relu(x) sin(pi p / 2M)] at position p       2d
    pos_elu    elu(x) + 1  (Katharopoulos et al., 2020)                               d
    relu       relu(x)                                                                d
    identity   x, without the normaliser (phi(q).z can cross zero)                    d

The right column is D_feat, the width of the state per head.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..ops.linear_attn import linear_attn, linear_attn_step
from ..ops.taylor import taylor_feature_dim
from .linear_attention import LinearAttention
from .state import Offset, State, carried_state, token_positions

FEATURE_MAP_ABLATIONS = ("taylor", "performer", "cosformer", "pos_elu", "relu", "identity")


class FeatureMapLinearAttention(LinearAttention):
    """Causal linear attention with a chosen feature map; "taylor" is LinearAttention itself (compact map).

    Args:
        d_model, feature_dim, num_heads, head_dim, eps, layer_idx: as LinearAttention.
        feature_map: one of FEATURE_MAP_ABLATIONS.
        num_features: performer's random features m (default: Taylor's 1 + d + d(d+1)/2, so the ablation
            compares the two at equal state).
        max_seq_len: cosformer's M, the length over which its cos reweighting decays to 0.
    """

    def __init__(
        self,
        d_model: int,
        feature_map: str = "taylor",
        feature_dim: int = 16,
        num_heads: int = 16,
        head_dim: int | None = None,
        num_features: int | None = None,
        max_seq_len: int = 2048,
        eps: float = 1e-6,
        layer_idx: int | None = None,
    ):
        if feature_map not in FEATURE_MAP_ABLATIONS:
            raise ValueError(f"unknown feature_map {feature_map!r}: use one of {FEATURE_MAP_ABLATIONS}")
        if max_seq_len <= 0:
            raise ValueError(f"max_seq_len must be positive, got {max_seq_len}")
        # fold_every=1: the ablation maps step through based.ops.linear_attn, which has no pending buffer.
        super().__init__(d_model, feature_dim, num_heads, head_dim, "compact", eps, layer_idx, fold_every=1)
        self.kind, self.max_seq_len = feature_map, max_seq_len
        self.normalize = feature_map != "identity"
        d = feature_dim
        self._state_features = {
            "taylor": taylor_feature_dim(d), "performer": num_features or taylor_feature_dim(d), "cosformer": 2 * d,
        }.get(feature_map, d)
        if feature_map == "performer":
            # A buffer, not a parameter: FAVOR+ draws W once; saved so a checkpoint reloads the same map.
            self.register_buffer("random_features", torch.randn(num_heads, self._state_features, d))

    @property
    def state_features(self) -> int:
        return self._state_features

    def state_size(self, seq_len: int) -> int:
        """Values per sequence: H*head_dim*D_feat, plus H*D_feat for the normaliser when there is one."""
        return self.num_heads * self.state_features * (self.head_dim + int(self.normalize))

    def phi(self, x: torch.Tensor, positions: torch.Tensor, is_query: bool) -> torch.Tensor:
        """x [B, T, H, d] at positions [B, T] -> phi(x) [B, T, H, D_feat] (fp32)."""
        x = x.float()
        if self.kind == "performer":
            x = x * self.feature_dim**-0.25
            w = self.random_features.float()  # [H, m, d]
            logits = torch.einsum("bthd,hmd->bthm", x, w) - x.square().sum(-1, keepdim=True) / 2
            if is_query:
                # A per-query factor cancels between numerator and denominator: subtract the max to
                # keep exp in range (keys cannot, their factors do not cancel).
                logits = logits - logits.amax(-1, keepdim=True).detach()
            return torch.exp(logits) / math.sqrt(logits.shape[-1])
        if self.kind == "cosformer":
            angle = (math.pi / 2) * positions.float() / self.max_seq_len  # [B, T]
            angle = angle[..., None, None]
            # phi(q_i).phi(k_j) = relu(q_i).relu(k_j) cos(pi (i - j) / 2M): recency reweighting.
            return torch.cat([F.relu(x) * angle.cos(), F.relu(x) * angle.sin()], dim=-1)
        if self.kind == "pos_elu":
            return F.elu(x) + 1
        if self.kind == "relu":
            return F.relu(x)
        return x  # identity

    def forward(self, x: torch.Tensor, state: State | None = None, seqlen_offset: Offset = 0) -> torch.Tensor:
        if self.kind == "taylor":
            return super().forward(x, state, seqlen_offset)
        B, T, _ = x.shape
        q, k, v = self._qkv(x)
        positions = token_positions(seqlen_offset, B, T, x.device)
        initial = None if state is None else carried_state(state, seqlen_offset)
        o, final = linear_attn(
            self.phi(q, positions, True), self.phi(k, positions, False), v, normalize=self.normalize,
            eps=self.eps, initial_state=initial, output_final_state=state is not None,
        )
        if state is not None:
            for s, f in zip(state, final):
                s.copy_(f)
        return self.out_proj(o.reshape(B, T, -1))

    def step(self, x: torch.Tensor, state: State, seqlen_offset: Offset = 0) -> torch.Tensor:
        if self.kind == "taylor":
            return super().step(x, state, seqlen_offset)
        B = x.shape[0]
        q, k, v = self._qkv(x.reshape(B, 1, self.d_model))
        positions = token_positions(seqlen_offset, B, 1, x.device)
        fq, fk = self.phi(q, positions, True)[:, 0], self.phi(k, positions, False)[:, 0]
        y = linear_attn_step(fq, fk, v[:, 0], *state, normalize=self.normalize, eps=self.eps)
        return self.out_proj(y.reshape(B, -1)).view_as(x)
