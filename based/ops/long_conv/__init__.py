"""Causal long convolution by FFT (H3, Hyena): y[t, c] = sum_{s <= t} k[c, t - s] u[s, c], O(T log T).

Zero-padding to 2T makes the FFT's circular convolution linear, so no output depends on a later input
(up to float rounding of the transform, ~1e-7 relative).
"""
from __future__ import annotations

import torch


def long_conv(u: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Args:
        u: [B, T, C] inputs; k: [C, L] filters, L >= T (only the first T taps are used).
    Returns:
        y [B, T, C] in u's dtype (computed in fp32).
    """
    T = u.shape[1]
    if k.dim() != 2 or k.shape[0] != u.shape[-1] or k.shape[1] < T:
        raise ValueError(f"k must be [C={u.shape[-1]}, L >= T={T}], got shape {tuple(k.shape)}")
    n = 2 * T
    u_f = torch.fft.rfft(u.float().transpose(1, 2), n=n)  # [B, C, T + 1]
    k_f = torch.fft.rfft(k[:, :T].float(), n=n)
    return torch.fft.irfft(u_f * k_f, n=n)[..., :T].transpose(1, 2).to(u.dtype)


def naive_long_conv(u: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """fp64 ground truth: the sum written out."""
    T = u.shape[1]
    ud, kd = u.double(), k.double()
    y = torch.zeros_like(ud)
    for lag in range(T):
        y[:, lag:] += kd[:, lag] * ud[:, : T - lag]
    return y.to(u.dtype)


__all__ = ["long_conv", "naive_long_conv"]
