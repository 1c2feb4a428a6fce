"""Cross-entropy of a linear head, hidden @ weight^T, without the logits in memory on CUDA (fused.py).

Taken on CUDA outside torch.compile for widths D <= 128 unless BASED_CE_FUSED=0 (then, and elsewhere, the
logits and F.cross_entropy). The MQAR trainers use it for their query positions (a vocabulary of 8192).
Wider hidden states keep PyTorch's form: the fused kernels' D-chunked path (BD > ONE_K_MAX) measured 0.56-0.59x
of its speed forward + backward at D 256 on an H100 (benchmarks/results/cross-entropy-h100-2026-12-07.json),
where at D 64 / 128 the whole-width kernels are 2.2-2.6x / 1.2-1.4x faster.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..common import fused_training_call

try:
    from .fused import ONE_K_MAX, fused_linear_cross_entropy
except ImportError:  # pragma: no cover - Triton is a dependency on Linux
    ONE_K_MAX, fused_linear_cross_entropy = 0, None


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         ignore_index: int = -100) -> torch.Tensor:
    """F.cross_entropy(hidden @ weight.T, targets, ignore_index=ignore_index) in fp32: the mean over the rows
    whose target is not ignore_index.

    Args:
        hidden: [..., D]; weight: [V, D]; targets: [...] (hidden's leading dims), ids in [0, V) or ignore_index.
    """
    if hidden.shape[:-1] != targets.shape or hidden.shape[-1] != weight.shape[-1]:
        raise ValueError(f"hidden [..., D] with targets of its leading shape and weight [V, D] needed, got "
                         f"{tuple(hidden.shape)}, {tuple(targets.shape)} and {tuple(weight.shape)}")
    h, t = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1)
    if (h.shape[-1] <= ONE_K_MAX and not torch.compiler.is_compiling()
            and fused_training_call(h, fused_linear_cross_entropy, None, False, "BASED_CE_FUSED")):
        return fused_linear_cross_entropy(h, weight, t, ignore_index)
    return F.cross_entropy((h @ weight.T).float(), t, ignore_index=ignore_index)


__all__ = ["linear_cross_entropy"]
