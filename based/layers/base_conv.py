"""BaseConv: the short gated convolution that fills most BASED layers.

    [u1, u2] = in_proj(x),  y = out_proj(silu(conv(u1)) * u2)

conv is a causal depthwise convolution with a short kernel (3), so decoding keeps only the last
kernel_size inputs per channel.
"""
from __future__ import annotations

import torch
from torch import nn

from ..ops import conv_state_zeros, short_conv, short_conv_step
from .state import Offset, State, carried_state, state_nbytes


class BaseConv(nn.Module):
    """Gated short convolution.

    Args:
        d_model: model width.
        kernel_size: taps of the causal depthwise conv (3 in BASED).
        expand: conv channels = expand * d_model; in_proj maps d_model -> 2 * expand * d_model
            (u1 and u2), out_proj expand * d_model -> d_model. The reference (expand_proj=4) is expand=2.
        layer_idx: position in the model (bookkeeping only).
    """

    def __init__(self, d_model: int, kernel_size: int = 3, expand: int = 2, layer_idx: int | None = None):
        super().__init__()
        if d_model <= 0:
            raise ValueError(f"d_model must be positive, got {d_model}")
        if kernel_size <= 0:
            raise ValueError(f"kernel_size must be positive, got {kernel_size}")
        if expand <= 0:
            raise ValueError(f"expand must be positive, got {expand}")
        self.d_model, self.kernel_size, self.layer_idx = d_model, kernel_size, layer_idx
        self.d_inner = expand * d_model
        self.in_proj = nn.Linear(d_model, 2 * self.d_inner, bias=True)
        # Kept as nn.Conv1d for the reference's parameter layout ([C, 1, K]); forward calls
        # based.ops.short_conv, which carries the decode state.
        self.conv = nn.Conv1d(self.d_inner, self.d_inner, kernel_size, groups=self.d_inner, padding=kernel_size - 1)
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=True)

    def state_size(self, seq_len: int) -> int:
        """Values per sequence held for decoding: the last kernel_size conv inputs per channel."""
        return self.d_inner * self.kernel_size

    def allocate_inference_cache(
        self, batch_size: int, dtype=None, device=None, max_seq_len: int | None = None
    ) -> State:
        """(conv_state [B, d_inner, kernel_size],), newest input last."""
        w = self.conv.weight
        return (conv_state_zeros(batch_size, self.d_inner, self.kernel_size, dtype or w.dtype, device or w.device),)

    def inference_state_bytes(self, seq_len: int, batch_size: int = 1, dtype=None) -> int:
        return state_nbytes(self.allocate_inference_cache(batch_size, dtype, "meta", max_seq_len=seq_len))

    def forward(self, x: torch.Tensor, state: State | None = None, seqlen_offset: Offset = 0) -> torch.Tensor:
        """x [B, T, d_model] -> [B, T, d_model]. With `state` (prefill), continues from it (empty at
        seqlen_offset 0) and leaves the last kernel_size inputs in it."""
        u1, u2 = self.in_proj(x).split(self.d_inner, dim=-1)
        carried = None if state is None else carried_state(state, seqlen_offset)
        y, final = short_conv(
            u1, self.conv.weight.squeeze(1), self.conv.bias,
            initial_state=None if carried is None else carried[0], output_final_state=state is not None,
            activation="silu", gate=u2,
        )
        if state is not None:
            state[0].copy_(final)
        return self.out_proj(y)

    def step(self, x: torch.Tensor, state: State, seqlen_offset: Offset = 0) -> torch.Tensor:
        """Decode one token per sequence; updates `state` in place. x: [B, d_model] or [B, 1, d_model]."""
        B = x.shape[0]
        u1, u2 = self.in_proj(x.reshape(B, self.d_model)).split(self.d_inner, dim=-1)
        y = short_conv_step(u1, state[0], self.conv.weight.squeeze(1), self.conv.bias, activation="silu", gate=u2)
        return self.out_proj(y.to(u2.dtype)).view_as(x)
