"""Short causal depthwise convolution (the 'short conv' of BaseConv, kernel 3 in BASED).

y[b, t, c] = bias[c] + sum_{i<K} weight[c, i] * x[b, t - (K - 1) + i, c], with x = 0 before the sequence
(or the carried state). The state is the last K inputs per channel, newest last.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _check(x: torch.Tensor, weight: torch.Tensor):
    if x.dim() != 3:
        raise ValueError(f"x must be [B, T, C], got shape {tuple(x.shape)}")
    if weight.dim() != 2 or weight.shape[0] != x.shape[-1]:
        raise ValueError(f"weight must be [C={x.shape[-1]}, K], got shape {tuple(weight.shape)}")


def short_conv(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Causal depthwise conv over time.

    Args:
        x: [B, T, C]; weight: [C, K]; bias: [C] or None
        initial_state: [B, C, K], the K inputs before x (newest last), e.g. a previous final_state.
    Returns:
        y [B, T, C] and, if asked, the final state [B, C, K].
    """
    _check(x, weight)
    B, T, C = x.shape
    K = weight.shape[1]
    xt = x.transpose(1, 2)  # [B, C, T]
    if initial_state is None:
        initial_state = x.new_zeros(B, C, K)
    elif tuple(initial_state.shape) != (B, C, K):
        raise ValueError(f"initial_state must be [B, C, K]=({B}, {C}, {K}), got {tuple(initial_state.shape)}")
    if torch.compiler.is_compiling():
        y = _shifted_sum(x, weight, bias, initial_state, torch.float32)
    else:
        padded = torch.cat([initial_state[..., 1:].to(x.dtype), xt], dim=-1)  # [B, C, K - 1 + T]
        y = F.conv1d(padded, weight.unsqueeze(1).to(x.dtype), bias, groups=C).transpose(1, 2)
    final = torch.cat([initial_state.to(x.dtype), xt], dim=-1)[..., -K:] if output_final_state else None
    return y, final


def _shifted_sum(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, initial_state: torch.Tensor, dtype: torch.dtype
) -> torch.Tensor:
    """short_conv's y as K shifted multiply-adds in `dtype`, rounded once to x's dtype (as conv1d does).

    The form for compiled code (fp32): Inductor fuses the shifts, the bias and the caller's gate into one
    kernel (and the weight gradient into a few reductions), where a depthwise conv1d is an opaque
    call of its own. In fp64, the reference.
    """
    T, K = x.shape[1], weight.shape[1]
    padded = torch.cat([initial_state[..., 1:].transpose(1, 2).to(dtype), x.to(dtype)], dim=1)  # [B, K - 1 + T, C]
    w = weight.to(dtype)
    y = padded[:, :T] * w[:, 0]
    for i in range(1, K):
        y = y + padded[:, i : i + T] * w[:, i]
    if bias is not None:
        y = y + bias.to(dtype)
    return y.to(x.dtype)


def short_conv_step(
    x: torch.Tensor, conv_state: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """One token: shift x [B, C] into conv_state [B, C, K] in place and return y [B, C]."""
    conv_state.copy_(torch.roll(conv_state, shifts=-1, dims=-1))
    conv_state[..., -1] = x
    y = (conv_state * weight.to(conv_state.dtype)).sum(-1)
    return y + bias.to(y.dtype) if bias is not None else y


def naive_short_conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Ground truth: the sum written out, in fp64."""
    _check(x, weight)
    B, T, C = x.shape
    return _shifted_sum(x, weight, bias, x.new_zeros(B, C, weight.shape[1]), torch.float64)


__all__ = ["short_conv", "short_conv_step", "naive_short_conv"]
