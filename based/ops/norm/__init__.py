"""LayerNorm and RMSNorm over the last dim, with fused Triton kernels for training (fused.py).

The fused form pays where PyTorch's own fused kernels do not apply: under torch.func.vmap over stacked runs,
each with its own weight (the MQAR sweep's stacked trainer), which PyTorch batches as separate elementwise
kernels. Taken on CUDA outside torch.compile unless BASED_NORM_FUSED=0; elsewhere F.layer_norm / F.rms_norm.
Two compound forms go through one kernel each way too: `residual=True`, x + norm(x) (Zoology's identity MLP),
and gated_rms_norm, Mamba-2's rmsnorm(x * silu(z)) * weight (fused for one group per row).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..common import fused_training_call

try:
    from .fused import fused_gated_rms_norm, fused_layer_norm, fused_rms_norm
except ImportError:  # pragma: no cover - Triton is a dependency on Linux
    fused_layer_norm = fused_rms_norm = fused_gated_rms_norm = None


def _fused(x: torch.Tensor, kernel) -> bool:
    return not torch.compiler.is_compiling() and fused_training_call(x, kernel, None, False, "BASED_NORM_FUSED")


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, eps: float = 1e-5,
               residual: bool = False) -> torch.Tensor:
    """F.layer_norm(x, (D,), weight, bias, eps) with weight, bias [D]; residual=True: x + that."""
    if _fused(x, fused_layer_norm):
        return fused_layer_norm(x, weight, bias, eps, residual)
    y = F.layer_norm(x, weight.shape, weight, bias, eps)
    return x + y if residual else y


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-5, residual: bool = False) -> torch.Tensor:
    """x / sqrt(mean(x^2) + eps) * weight in fp32, cast back to x's dtype (based.layers.RMSNorm's arithmetic);
    residual=True: x + that."""
    if _fused(x, fused_rms_norm):
        return fused_rms_norm(x, weight, eps, residual)
    y = F.rms_norm(x.float(), weight.shape, weight.float(), eps).to(x.dtype)
    return x + y if residual else y


def gated_rms_norm(x: torch.Tensor, z: torch.Tensor, weight: torch.Tensor, eps: float = 1e-5,
                   group_size: int | None = None) -> torch.Tensor:
    """rmsnorm(x * silu(z)) * weight normalised over groups of group_size channels (None: the whole last dim),
    in fp32, the result in z's dtype (mamba_ssm's RMSNormGated with norm_before_gate=False). x, z [..., D],
    weight [D]; the fused kernels take one group per row only."""
    D = x.shape[-1]
    group_size = group_size or D
    if group_size == D and _fused(x, fused_gated_rms_norm):
        return fused_gated_rms_norm(x, z, weight, eps)
    xf = (x.float() * F.silu(z.float())).unflatten(-1, (-1, group_size))
    y = F.rms_norm(xf, (group_size,), eps=eps).flatten(-2)
    return (y * weight.float()).to(z.dtype)


__all__ = ["layer_norm", "rms_norm", "gated_rms_norm"]
