"""RMSNorm (Zhang & Sennrich, 2019), the pre-norm of every BASED and Transformer++ block."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x^2) + eps) * weight, computed in fp32 and cast back to x's dtype.

    Args:
        dim: size of the last axis.
        eps: added to the mean square.
    """

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        if dim <= 0:
            raise ValueError(f"RMSNorm dim must be positive, got {dim}")
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # F.rms_norm runs PyTorch's fused kernel where it has one (CUDA) instead of the formula's six
        # elementwise and reduction kernels; compiled, Inductor fuses either. On CUDA that kernel reads a bf16 or
        # fp16 x as it is and computes in fp32, rounding once, so x and the weight go in as they are there: the
        # conversions to fp32 and back were two more passes over x (146 kernels of a 1.3b prefill, by their bytes
        # ~6% of its GPU time on an H100). Elsewhere (the CPU's kernel) the fp32 form is kept.
        if x.is_cuda and x.dtype == self.weight.dtype and not torch.compiler.is_compiling():
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        return F.rms_norm(x.float(), self.weight.shape, self.weight.float(), self.eps).to(x.dtype)
