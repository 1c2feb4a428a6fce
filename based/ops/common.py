"""Argument checks shared by the ops: the linear-attention layout [B, T, H, D] (taylor, decay, rwkv) and the
backend switch of the ops with a Triton kernel."""
from __future__ import annotations

import os

import torch


def check_layout(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, names: tuple[str, str, str] = ("q", "k", "v")
) -> None:
    """q, k [B, T, H, dk] of one shape, v [B, T, H, dv] with their B, T, H, and T >= 1.

    Args:
        names: the op's names of q, k, v (RWKV: r, k, v), used in the messages.
    """
    nq, nk, nv = names
    for name, t in zip(names, (q, k, v)):
        if t.dim() != 4:
            raise ValueError(f"{name} must be [B, T, H, D] (4 dims), got shape {tuple(t.shape)}")
    if q.shape != k.shape:
        raise ValueError(
            f"{nq} and {nk} must have the same shape [B, T, H, dk], got {tuple(q.shape)} and {tuple(k.shape)}"
        )
    if v.shape[:3] != q.shape[:3]:
        raise ValueError(f"{nv} must be [B, T, H, dv] with B, T, H of {nq} {tuple(q.shape[:3])}, got {tuple(v.shape)}")
    if q.shape[1] == 0:
        raise ValueError("sequence length T must be at least 1, got an empty sequence")


def check_chunk_size(chunk_size: int) -> None:
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size <= 0:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")


def check_backend(backend: str) -> None:
    """An op's backend: "auto" (its Triton kernel where that applies, else PyTorch), "triton" or "torch"."""
    if backend not in ("auto", "triton", "torch"):
        raise ValueError(f"backend must be 'auto', 'triton' or 'torch', got {backend!r}")


def fused_training_call(x: torch.Tensor, kernel, initial_state, output_final_state: bool, switch: str) -> bool:
    """Whether an op takes its fused Triton training kernel: `kernel` imported (Triton installed), x on CUDA,
    no state in or out (the kernels keep none), and the environment variable `switch` not "0" (for
    comparisons against the PyTorch form)."""
    return (kernel is not None and x.is_cuda and initial_state is None and not output_final_state
            and os.environ.get(switch, "1") != "0")


def fused_inference_call(x: torch.Tensor, switch: str, *tensors: torch.Tensor | None) -> bool:
    """Whether an op takes its Triton inference pass (prefill, decode): no gradient to take through x or
    `tensors` (None skipped), x on CUDA where the Triton kernels import and no torch.func wrapper (these passes
    have no vmap rule; taylor.common.triton_available), and the environment variable `switch` not "0". The
    training kernels' counterpart is fused_training_call."""
    from .taylor.common import triton_available  # here, not above: taylor.common imports this module

    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, *tensors)):
        return False
    return triton_available(x) and os.environ.get(switch, "1") != "0"
