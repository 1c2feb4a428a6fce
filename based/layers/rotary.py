"""Rotary position embeddings (Su et al., 2021), rotate-half layout (GPT-NeoX, flash-attn non-interleaved).

The pair (x_i, x_{i + D/2}) is rotated by the angle p * base^(-2i/D) at position p, so q.k depends only on
the distance between the two positions.
"""
from __future__ import annotations

import torch
from torch import nn

from ..ops.rotary import apply_rotary
from .state import Offset, token_positions

__all__ = ["RotaryEmbedding", "apply_rotary"]


class RotaryEmbedding(nn.Module):
    """Rotates q and k at their positions.

    Holds no parameters or buffers (nothing to save or load); the cos/sin table for int offsets is a
    cache grown on demand. Tensor positions (per-sequence, decode) are computed directly, without
    reading anything back from the device, so a captured decode step stays valid.

    Args:
        dim: head dim (even).
        base: angle base (10000 in RoPE).
    """

    def __init__(self, dim: int, base: float = 10000.0):
        super().__init__()
        if dim <= 0 or dim % 2:
            raise ValueError(f"rotary dim must be a positive even number, got {dim}")
        self.dim, self.base = dim, float(base)
        self._table: tuple[torch.Tensor, torch.Tensor] | None = None
        self._inv_freq: torch.Tensor | None = None

    def inv_freq(self, device) -> torch.Tensor:
        exponent = torch.arange(0, self.dim, 2, device=device, dtype=torch.float32) / self.dim
        return self.base**-exponent

    def cached_inv_freq(self, device) -> torch.Tensor:
        """inv_freq, computed once per device: a decode step reads it every token."""
        device = torch.device(device)
        if self._inv_freq is None or self._inv_freq.device != device:
            self._inv_freq = self.inv_freq(device)
        return self._inv_freq

    def _angles(self, positions: torch.Tensor) -> torch.Tensor:
        return positions.float().unsqueeze(-1) * self.inv_freq(positions.device)

    def cos_sin(
        self, seqlen_offset: Offset, batch_size: int, seq_len: int, device
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [B or 1, T, D/2] for T tokens starting at `seqlen_offset`."""
        if isinstance(seqlen_offset, torch.Tensor):
            angles = self._angles(token_positions(seqlen_offset, batch_size, seq_len, device))
            return angles.cos(), angles.sin()
        end = seqlen_offset + seq_len
        if torch.compiler.is_compiling():
            # A compiled block computes the angles in its fused rotation kernel; writing the host-side
            # table from inside the graph would only add guards and recompiles.
            angles = self._angles(torch.arange(seqlen_offset, end, device=device))
            return angles.cos()[None], angles.sin()[None]
        table = self._table
        if table is None or table[0].shape[0] < end or table[0].device != torch.device(device):
            length = max(2048, 1 << (end - 1).bit_length())
            angles = self._angles(torch.arange(length, device=device))
            table = self._table = (angles.cos(), angles.sin())
        return table[0][None, seqlen_offset:end], table[1][None, seqlen_offset:end]

    def forward(self, q: torch.Tensor, k: torch.Tensor, seqlen_offset: Offset = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """q, k: [B, T, H, D] at positions seqlen_offset + 0 .. T-1 (int or LongTensor [B])."""
        B, T = q.shape[:2]
        cos, sin = self.cos_sin(seqlen_offset, B, T, q.device)
        return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
