"""LayerNorm and RMSNorm over the last dim, with fused Triton kernels for training (fused.py).

The fused form pays where PyTorch's own fused kernels do not apply: under torch.func.vmap over stacked runs,
each with its own weight (the MQAR sweep's stacked trainer), which PyTorch batches as separate elementwise
kernels. Taken on CUDA outside torch.compile unless BASED_NORM_FUSED=0; elsewhere F.layer_norm / F.rms_norm.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..common import fused_training_call

try:
    from .fused import fused_layer_norm, fused_rms_norm
except ImportError:  # pragma: no cover - Triton is a dependency on Linux
    fused_layer_norm = fused_rms_norm = None


def _fused(x: torch.Tensor, kernel) -> bool:
    return not torch.compiler.is_compiling() and fused_training_call(x, kernel, None, False, "BASED_NORM_FUSED")


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, eps: float = 1e-5) -> torch.Tensor:
    """F.layer_norm(x, (D,), weight, bias, eps) with weight, bias [D]."""
    if _fused(x, fused_layer_norm):
        return fused_layer_norm(x, weight, bias, eps)
    return F.layer_norm(x, weight.shape, weight, bias, eps)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """x / sqrt(mean(x^2) + eps) * weight in fp32, cast back to x's dtype (based.layers.RMSNorm's arithmetic)."""
    if _fused(x, fused_rms_norm):
        return fused_rms_norm(x, weight, eps)
    return F.rms_norm(x.float(), weight.shape, weight.float(), eps).to(x.dtype)


__all__ = ["layer_norm", "rms_norm"]
