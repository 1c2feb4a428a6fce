"""The rotary rotation itself (rotate-half layout), shared by the attention layers and the fused decode op."""
from __future__ import annotations

import torch

from .common import fused_inference_call


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [B, T, H, D] by angles whose cos, sin are [B or 1, T, D/2]; math in fp32.

    Without a gradient to take on CUDA (prefill, decode; BASED_ROTARY_FUSED=0 keeps PyTorch) one Triton pass
    (based/ops/rotary_triton.py); otherwise the PyTorch form, which autograd, torch.func and Inductor take."""
    if _fused(x, cos, sin):
        from .rotary_triton import triton_apply_rotary

        return triton_apply_rotary(x, cos, sin)
    half = x.shape[-1] // 2
    xf = x.float()
    x1, x2 = xf[..., :half], xf[..., half:]
    cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)  # broadcast over heads
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)


def _fused(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> bool:
    if (x.dim() != 4 or cos.dim() != 3 or cos.shape != sin.shape or cos.shape[-1] * 2 != x.shape[-1]
            or cos.shape[1] != x.shape[1] or cos.shape[0] not in (1, x.shape[0])):
        return False  # shapes the kernel does not index (the PyTorch form broadcasts them)
    return fused_inference_call(x, "BASED_ROTARY_FUSED", cos, sin)
