"""Short causal depthwise convolution (the 'short conv' of BaseConv, kernel 3 in BASED).

y[b, t, c] = bias[c] + sum_{i<K} weight[c, i] * x[b, t - (K - 1) + i, c], with x = 0 before the sequence
(or the carried state). The state is the last K inputs per channel, newest last: [B, C, K], best stored tap-major
(conv_state_zeros).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..common import check_backend, fused_inference_call, fused_training_call
from ..taylor.common import triton_available as _triton_available

try:  # the fused kernels (CUDA; training: no state; prefill: no gradient): absent without Triton
    from .fused import fused_short_conv, fused_short_conv_inference
except ImportError:  # pragma: no cover - Triton is a dependency on Linux
    fused_short_conv = fused_short_conv_inference = None


def _check(x: torch.Tensor, weight: torch.Tensor):
    if x.dim() != 3:
        raise ValueError(f"x must be [B, T, C], got shape {tuple(x.shape)}")
    if weight.dim() != 2 or weight.shape[0] != x.shape[-1] or weight.shape[1] < 1:
        raise ValueError(f"weight must be [C={x.shape[-1]}, K] with K >= 1 taps, got shape {tuple(weight.shape)}")


def short_conv(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    activation: str | None = None,
    gate: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Causal depthwise conv over time.

    Args:
        x: [B, T, C]; weight: [C, K]; bias: [C] or None
        initial_state: [B, C, K], the K inputs before x (newest last), e.g. a previous final_state.
        activation: None or "silu" (Mamba's), applied to y.
        gate: [B, T, C] or None: y = act(conv(x)) * gate (BaseConv's u2).
    Returns:
        y [B, T, C] and, if asked, the final state [B, C, K].

    On CUDA (BASED_CONV_FUSED=0 keeps the PyTorch form): without a gradient to take (prefill, with or without
    states) one Triton pass that also applies the activation and the gate; in training without a state in
    or out, one fused Triton kernel each way (based/ops/conv/fused.py, with a vmap rule for stacked runs).
    """
    _check(x, weight)
    B, T, C = x.shape
    K = weight.shape[1]
    if activation not in (None, "silu"):
        raise ValueError(f"activation must be None or 'silu', got {activation!r}")
    if initial_state is not None and tuple(initial_state.shape) != (B, C, K):
        raise ValueError(f"initial_state must be [B, C, K]=({B}, {C}, {K}), got {tuple(initial_state.shape)}")
    if gate is not None and gate.shape != x.shape:
        raise ValueError(f"gate must have x's shape {tuple(x.shape)}, got {tuple(gate.shape)}")
    compiling = torch.compiler.is_compiling()
    if fused_short_conv_inference is not None and fused_inference_call(x, "BASED_CONV_FUSED", weight, bias,
                                                                          initial_state, gate):
        y = fused_short_conv_inference(x, weight, bias, initial_state, activation, gate)
        return y, _final_state(x, initial_state, K) if output_final_state else None
    if not compiling and fused_training_call(x, fused_short_conv, initial_state, output_final_state,
                                             "BASED_CONV_FUSED"):
        y = fused_short_conv(x, weight, bias, activation)
        return (y if gate is None else y * gate), None
    if initial_state is None:
        initial_state = x.new_zeros(B, C, K)
    if compiling:
        y = _shifted_sum(x, weight, bias, initial_state, torch.float32)
    else:
        padded = torch.cat([initial_state[..., 1:].to(x.dtype), x.transpose(1, 2)], dim=-1)  # [B, C, K - 1 + T]
        y = F.conv1d(padded, weight.unsqueeze(1).to(x.dtype), bias, groups=C).transpose(1, 2)
    if activation == "silu":
        y = F.silu(y)
    if gate is not None:
        y = y * gate
    return y, _final_state(x, initial_state, K) if output_final_state else None


def _final_state(x: torch.Tensor, initial_state: torch.Tensor | None, K: int) -> torch.Tensor:
    """The last K inputs [B, C, K] (newest last) in x's dtype: x's last K steps, or the state's newest
    inputs before a shorter x; a copy of only those (not of the whole sequence)."""
    B, T, C = x.shape
    xt = x.transpose(1, 2)
    if T >= K:
        return xt[..., T - K:].clone()
    before = x.new_zeros(B, C, K - T) if initial_state is None else initial_state[..., T:].to(x.dtype)
    return torch.cat([before, xt], dim=-1)


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


def conv_state_zeros(batch_size: int, channels: int, kernel_size: int, dtype=None, device=None) -> torch.Tensor:
    """A zeroed decode state [B, C, K] (newest input last) stored tap-major, [B, K, C] in memory.

    A decode step shifts every channel's K inputs by one. Channel-major storage makes that a shuffle of
    K-element rows (6 bytes in bf16), which compiled code moves at a third of the copy bandwidth (the
    1.3b preset at batch 8,916: 7.7 ms of a 103 ms step); tap-major makes it K contiguous rows of C.
    """
    return torch.zeros(batch_size, kernel_size, channels, dtype=dtype, device=device).transpose(1, 2)


def short_conv_step(
    x: torch.Tensor,
    conv_state: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    activation: str | None = None,
    gate: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """One token: shift x [B, C] into conv_state [B, C, K] in place and return y [B, C] in the state's dtype.

    y = act(conv) * gate, with act "silu" or None (as causal_conv1d_update's activation) and gate [B, C]
    or None (BaseConv's u2): computed in fp32 and rounded once. Any strides of conv_state work; on CUDA a
    tap-major state (conv_state_zeros) takes one Triton pass that also applies act and gate.
    backend: "auto" (that Triton pass where it applies, else PyTorch), "triton" or "torch".
    """
    if activation not in (None, "silu"):
        raise ValueError(f"activation must be None or 'silu', got {activation!r}")
    check_backend(backend)
    taps = conv_state.transpose(1, 2)  # [B, K, C]: contiguous rows when stored tap-major
    fits = taps.is_contiguous() and x.stride(-1) == 1 and (gate is None or gate.stride(-1) == 1)
    if backend == "triton" and not fits:
        raise ValueError(
            "the Triton short_conv_step needs a tap-major conv_state (allocate it with conv_state_zeros) and "
            "x and gate with contiguous rows"
        )
    if backend == "triton" or (backend == "auto" and fits and _triton_available(conv_state)):
        from .triton import triton_short_conv_step

        return triton_short_conv_step(x, conv_state, weight, bias, activation, gate)
    new = torch.cat([taps[:, 1:], x.unsqueeze(1).to(taps.dtype)], dim=1)
    y = (new.float() * weight.t().float()).sum(1)
    if bias is not None:
        y = y + bias.float()
    taps.copy_(new)
    if activation == "silu":
        y = F.silu(y)
    if gate is not None:
        y = y * gate.float()
    return y.to(conv_state.dtype)


def naive_short_conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Ground truth: the sum written out, in fp64."""
    _check(x, weight)
    B, T, C = x.shape
    return _shifted_sum(x, weight, bias, x.new_zeros(B, C, weight.shape[1]), torch.float64)


__all__ = ["short_conv", "short_conv_step", "naive_short_conv", "conv_state_zeros"]
