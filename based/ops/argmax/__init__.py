"""Row argmax of logits: greedy decoding's token choice.

At large batch the logits are the biggest tensor a decode step reads (8,798 rows x 50,304 bf16 = 885 MB
for the 1.3b preset) and PyTorch's reduction reads them at 1.2-1.6 TB/s (0.6-0.75 ms per step on an
H200); the Triton kernel keeps a running best per lane and reduces once per row. Ties go to the lowest
index, as torch.argmax.
"""
from __future__ import annotations

import torch

from ..common import check_backend
from ..taylor.common import triton_available

TRITON_MIN_ROWS = 256  # one program per row: fewer rows leave the GPU idle, where torch.argmax splits rows
# Below this many rows each row is split over programs, whose answers the last to finish combines: batch 1
# of the 1.3b preset took 16 us per step in torch.argmax (one block for 50,257 values).
SPLIT_MAX_ROWS = 64


def argmax_rows(logits: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """Index of each row's largest value, [B, V] -> [B] (long). NaN counts as the largest value.

    backend: "auto" (on CUDA Triton from TRITON_MIN_ROWS rows, and below SPLIT_MAX_ROWS split over programs;
    else torch.argmax), "triton" or "torch".
    """
    if logits.dim() != 2:
        raise ValueError(f"logits must be [batch, vocab], got shape {tuple(logits.shape)}")
    check_backend(backend)
    B = logits.shape[0]
    if backend == "triton" or (
        backend == "auto" and (B >= TRITON_MIN_ROWS or B < SPLIT_MAX_ROWS) and triton_available(logits)
    ):
        from .triton import triton_argmax_rows

        return triton_argmax_rows(logits, split=B < SPLIT_MAX_ROWS)
    return logits.argmax(-1)


__all__ = ["argmax_rows"]
