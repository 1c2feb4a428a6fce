"""Lightning Attention (TransNormerLLM, Qin et al., 2023): linear attention with a fixed exponential decay
per head, computed intra-block by a masked matmul and inter-block through the decayed state.

    [q, k, v, u] = qkvu_proj(x);   q, k = silu(q), silu(k)
    S_t = lambda_h S_{t-1} + k_t v_t^T,   o_t = q_t^T S_t,   lambda_h = exp(-slope_h)
    y = out_proj(srms_norm(o) * u),   srms_norm(o) = o / rms(o)

Followed (TransNormerLLM's gated linear attention as in the authors' code): one fused q/k/v/u projection
without bias; SiLU on q and k only (v and the output gate u stay linear); no 1/sqrt(d) scale and no
linear-attention denominator, the output's SRMSNorm (RMSNorm without a weight, over all heads) takes its
place; ALiBi slopes per head, scaled with depth as slope_h * (1 - l / (L - 1) + 1e-5) for layer l of L,
so early layers forget fast and the last layer hardly at all.
Omitted: LRPE (the linearised relative position encoding of the first layer); the model's RMSNorm
pre-norms and SwiGLU are used rather than TransNormerLLM's SRMSNorm and SGLU.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..ops.decay import decay_linear_attn, decay_linear_attn_step
from .state import Offset, State, carried_state, state_nbytes


def alibi_exponents(num_heads: int, device=None) -> torch.Tensor:
    """e_h with ALiBi slope_h = 2^-e_h (Press et al., 2022): 8 h / H for a power of two H; otherwise the
    closest power of two p below H, then every other exponent of 2p. Built on `device` (no host copy)."""
    p = 2 ** math.floor(math.log2(num_heads))
    first = 8 * torch.arange(1, p + 1, device=device, dtype=torch.float32) / p
    rest = 4 * (2 * torch.arange(num_heads - p, device=device, dtype=torch.float32) + 1) / p
    return torch.cat([first, rest])


class LightningAttention(nn.Module):
    """TransNormerLLM's gated linear attention with per-head exponential decay.

    Args:
        d_model: model width.
        num_heads: heads; each keeps a [head_dim, head_dim] state.
        head_dim: q/k/v size per head (default d_model // num_heads).
        num_layers: layers of the model: with layer_idx, sets the depth scaling of the decay rates
            (TransNormerLLM). None: no depth scaling.
        layer_idx: position in the model (0-based).
        eps: SRMSNorm's epsilon.
        chunk_size: block size of the chunked (intra/inter) computation.
    """

    def __init__(
        self,
        d_model: int,
        num_heads: int = 16,
        head_dim: int | None = None,
        num_layers: int | None = None,
        layer_idx: int | None = None,
        eps: float = 1e-6,
        chunk_size: int = 64,
    ):
        super().__init__()
        if d_model <= 0 or num_heads <= 0:
            raise ValueError(f"d_model and num_heads must be positive, got d_model={d_model}, num_heads={num_heads}")
        if head_dim is None:
            if d_model % num_heads:
                raise ValueError(f"d_model={d_model} is not divisible by num_heads={num_heads}; pass head_dim")
            head_dim = d_model // num_heads
        if head_dim <= 0:
            raise ValueError(f"head_dim must be positive, got {head_dim}")
        if num_layers is not None and num_layers <= 0:
            raise ValueError(f"num_layers must be positive, got {num_layers}")
        if num_layers is not None and layer_idx is not None and not 0 <= layer_idx < num_layers:
            raise ValueError(f"layer_idx must be in [0, num_layers={num_layers}), got {layer_idx}")
        if chunk_size <= 0:
            raise ValueError(f"chunk_size must be positive, got {chunk_size}")
        self.d_model, self.num_heads, self.head_dim = d_model, num_heads, head_dim
        self.num_layers, self.layer_idx, self.eps, self.chunk_size = num_layers, layer_idx, eps, chunk_size
        # 1 - l / (L - 1) + 1e-5 (TransNormerLLM), 1 without num_layers or layer_idx. Kept as a float, not
        # derived from layer_idx in step: torch.compile guards on the ints it reads (one graph per layer)
        # but turns a float that differs between calls into a graph input (one graph for every layer).
        self.depth_scale = (
            1.0 if num_layers is None or layer_idx is None or num_layers == 1
            else 1 - layer_idx / (num_layers - 1) + 1e-5
        )
        self.inner = num_heads * head_dim
        self.qkvu_proj = nn.Linear(d_model, 4 * self.inner, bias=False)
        self.out_proj = nn.Linear(self.inner, d_model, bias=False)

    def log_decay(self, device=None) -> torch.Tensor:
        """log lambda_h = -slope_h, [H] fp32. A constant, computed rather than kept as a buffer: a Hugging
        Face load leaves non-persistent buffers uninitialised."""
        return -self.depth_scale * torch.exp2(-alibi_exponents(self.num_heads, device))

    def state_size(self, seq_len: int) -> int:
        """Values per sequence held for decoding: H * head_dim * head_dim, whatever seq_len."""
        return self.num_heads * self.head_dim * self.head_dim

    def allocate_inference_cache(
        self, batch_size: int, dtype=None, device=None, max_seq_len: int | None = None
    ) -> State:
        """(S [B, H, head_dim, head_dim],), fp32 whatever `dtype`: it accumulates a decayed sum."""
        device = device or self.qkvu_proj.weight.device
        return (torch.zeros(batch_size, self.num_heads, self.head_dim, self.head_dim, dtype=torch.float32,
                            device=device),)

    def inference_state_bytes(self, seq_len: int, batch_size: int = 1, dtype=None) -> int:
        return state_nbytes(self.allocate_inference_cache(batch_size, dtype, "meta", max_seq_len=seq_len))

    def _qkvu(self, x: torch.Tensor):
        shape = (*x.shape[:-1], self.num_heads, self.head_dim)
        q, k, v, u = self.qkvu_proj(x).chunk(4, dim=-1)
        return F.silu(q).view(shape), F.silu(k).view(shape), v.reshape(shape), u

    def _out(self, o: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """o [..., inner] -> out_proj(srms_norm(o) * u)."""
        o = F.rms_norm(o.float(), (self.inner,), eps=self.eps).to(u.dtype)
        return self.out_proj(o * u)

    def forward(self, x: torch.Tensor, state: State | None = None, seqlen_offset: Offset = 0) -> torch.Tensor:
        """x [B, T, d_model] -> [B, T, d_model]. With `state` (prefill), continues from it (empty at
        seqlen_offset 0) and leaves the state after the last token in it."""
        B, T, _ = x.shape
        q, k, v, u = self._qkvu(x)
        carried = None if state is None else carried_state(state, seqlen_offset)
        o, final = decay_linear_attn(
            q, k, v, self.log_decay(x.device), chunk_size=self.chunk_size,
            initial_state=None if carried is None else carried[0], output_final_state=state is not None,
        )
        if state is not None:
            state[0].copy_(final)
        return self._out(o.reshape(B, T, self.inner), u)

    def step(self, x: torch.Tensor, state: State, seqlen_offset: Offset = 0) -> torch.Tensor:
        """Decode one token per sequence; updates `state` in place. x: [B, d_model] or [B, 1, d_model]."""
        B = x.shape[0]
        q, k, v, u = self._qkvu(x.reshape(B, self.d_model))
        o = decay_linear_attn_step(q, k, v, self.log_decay(x.device), state[0])
        return self._out(o.reshape(B, self.inner), u).view_as(x)
