"""SwiGLU's gate, up * silu(gate), on the halves of one projection.

In PyTorch the halves of `fc1(x).chunk(2, -1)` are strided views: SiLU reads one with a non-vectorised kernel
and writes a temporary, the product reads both again. Without a gradient to take on CUDA (prefill, decode) one
Triton pass (based/ops/swiglu_triton.py) reads both halves once and writes the product, fp32 inside and rounded
once (PyTorch rounds SiLU's output to the input dtype before the product, so bf16 results can differ in the
last bit). BASED_SWIGLU_FUSED=0 keeps PyTorch; autograd, torch.func and Inductor always take it.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .common import fused_inference_call


def swiglu(up: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """up * silu(gate) for two [..., N] tensors of one shape."""
    if _fused(up, gate):
        from .swiglu_triton import triton_swiglu

        return triton_swiglu(up, gate)
    return up * F.silu(gate)


def _fused(up: torch.Tensor, gate: torch.Tensor) -> bool:
    if up.shape != gate.shape or up.dtype != gate.dtype or up.dim() < 2 or up.stride(-1) != 1 or gate.stride(-1) != 1:
        return False
    return fused_inference_call(up, "BASED_SWIGLU_FUSED", gate)
