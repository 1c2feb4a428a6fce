"""One-token softmax attention over a KV cache kept as a ring: the decode step of Attention and
SlidingWindowAttention.

The cache has L rows; position p lives in row p % L, so after writing positions up to `last` row r holds
position last - ((last - r) mod L), and a row whose position is < 0 was never written. Full attention
sizes the ring to the longest context (it never wraps); sliding-window attention sizes it to the window,
so every written row is in the window. Either way the query attends to exactly the written rows.

The Triton kernel (CUDA) reads each cached key and value once, in place ([B, L, H, D], no transposed
copies), skips the rows past `last` (full attention with a short context reads only what it holds) and
keeps an online softmax in fp32; the PyTorch form is the same maths through SDPA with a mask.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..common import check_backend
from ..rotary import apply_rotary
from ..taylor.common import triton_available


def cached_positions(last: torch.Tensor, L: int) -> torch.Tensor:
    """Position held by each ring row [B, L] once positions up to `last` [B] are written; < 0 = empty."""
    rows = torch.arange(L, device=last.device)
    return last.unsqueeze(-1) - torch.remainder(last.unsqueeze(-1) - rows, L)


def _check(q, k_cache, v_cache, last):
    if q.dim() != 3:
        raise ValueError(f"q must be [B, H, D] (one token per sequence), got shape {tuple(q.shape)}")
    B, H, D = q.shape
    if k_cache.dim() != 4 or tuple(k_cache.shape[:1]) + tuple(k_cache.shape[2:]) != (B, H, D):
        raise ValueError(f"k_cache must be [B, L, H, D] = [{B}, L, {H}, {D}], got {tuple(k_cache.shape)}")
    if v_cache.shape[:3] != k_cache.shape[:3]:
        raise ValueError(f"v_cache must be [B, L, H, Dv] with B, L, H of k_cache, got {tuple(v_cache.shape)}")
    if last.shape != (B,):
        raise ValueError(f"last must hold one position per sequence, shape [{B}], got {tuple(last.shape)}")


def torch_decode_attn(q, k_cache, v_cache, last, scale: float | None = None) -> torch.Tensor:
    """Reference: SDPA over the whole ring with the unwritten rows masked out."""
    B = q.shape[0]
    visible = cached_positions(last, k_cache.shape[1]) >= 0  # [B, L]
    o = F.scaled_dot_product_attention(
        q.unsqueeze(2), k_cache.to(q.dtype).transpose(1, 2), v_cache.to(q.dtype).transpose(1, 2),
        attn_mask=visible.view(B, 1, 1, -1), scale=scale,
    )
    return o.squeeze(2)


def _triton_wins(B: int, L: int, H: int) -> bool:
    # One program per (sequence, head) walks its rows alone: with few programs and long caches SDPA's
    # split over the keys is faster (H200, benchmarks/results/decode-attn-h200-2026-11-29.json: 1 x 16
    # heads over 1024 cached tokens, Triton 0.115 ms vs SDPA 0.078 ms; 16 x 16 heads, 0.132 vs 0.166).
    return L <= 512 or B * H >= 128


def decode_attn(q, k_cache, v_cache, last, scale: float | None = None, backend: str = "auto") -> torch.Tensor:
    """Attention of one new token per sequence over its ring cache (which already holds that token).

    Args:
        q: [B, H, D] queries (rotary applied).
        k_cache, v_cache: [B, L, H, D] and [B, L, H, Dv]; keys with rotary applied.
        last: LongTensor [B], the position of the new token (written rows: positions last - L + 1 .. last).
        scale: softmax scale (default D ** -0.5).
        backend: "auto" (Triton on CUDA when it wins, else PyTorch), "triton" or "torch".
    Returns:
        [B, H, Dv] in q's dtype.
    """
    _check(q, k_cache, v_cache, last)
    check_backend(backend)
    use_triton = backend == "triton" or (backend == "auto" and triton_available(q) and _triton_wins(*k_cache.shape[:3]))
    if not use_triton:
        return torch_decode_attn(q, k_cache, v_cache, last, scale)
    from .triton import triton_decode_attn

    return triton_decode_attn(q, k_cache, v_cache, last, scale)


def ring_write(
    k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor
) -> None:
    """Write keys and values [B, T, H, D] at positions [B, T] into ring rows position % L, in place.

    Only the last L tokens are written: more would put two tokens in one row in no set order.
    """
    L = k_cache.shape[1]
    k, v, positions = k[:, -L:], v[:, -L:], positions[:, -L:]
    batch = torch.arange(k.shape[0], device=k.device).unsqueeze(-1)
    rows = torch.remainder(positions, L)
    k_cache[batch, rows] = k.to(k_cache.dtype)
    v_cache[batch, rows] = v.to(v_cache.dtype)


def decode_attn_step(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    positions: torch.Tensor,
    inv_freq: torch.Tensor | None = None,
    scale: float | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """A whole attention decode step: rotate the new token's q and k at `positions` (rotary, when
    inv_freq is given), write k and v into ring row positions % L, then decode_attn.

    Args:
        q, k: [B, H, D] before rotary (D even); v: [B, H, Dv].
        k_cache, v_cache: [B, L, H, D] and [B, L, H, Dv], updated in place.
        positions: LongTensor [B], each sequence's position of the new token.
        inv_freq: [D/2] fp32 rotary frequencies (RotaryEmbedding.inv_freq), or None for no rotary.
        backend: "auto" (one Triton kernel on CUDA where decode_attn would take Triton), "triton", "torch".
    Returns:
        [B, H, Dv] in q's dtype.
    """
    _check(q, k_cache, v_cache, positions)
    if k.shape != q.shape or v.shape[:2] != q.shape[:2] or v.shape[-1] != v_cache.shape[-1]:
        raise ValueError(
            f"k must be [B, H, D] like q {tuple(q.shape)} and v [B, H, Dv], got {tuple(k.shape)}, {tuple(v.shape)}"
        )
    if q.shape[-1] % 2:
        raise ValueError(f"decode_attn_step needs an even head dim (rotate-half pairs), got {q.shape[-1]}")
    check_backend(backend)
    B, L, H = k_cache.shape[:3]
    if backend == "triton" or (backend == "auto" and triton_available(q) and _triton_wins(B, L, H)):
        from .triton import triton_decode_attn_step

        return triton_decode_attn_step(q, k, v, k_cache, v_cache, positions, inv_freq, scale)
    if inv_freq is not None:
        angles = positions.float().view(B, 1, 1) * inv_freq  # [B, 1, D/2]
        cos, sin = angles.cos(), angles.sin()
        q, k = apply_rotary(q.unsqueeze(1), cos, sin)[:, 0], apply_rotary(k.unsqueeze(1), cos, sin)[:, 0]
    ring_write(k_cache, v_cache, k.unsqueeze(1), v.unsqueeze(1), positions.unsqueeze(1))
    return decode_attn(q, k_cache, v_cache, positions, scale, backend="torch" if backend == "torch" else "auto")


__all__ = ["decode_attn", "decode_attn_step", "ring_write", "torch_decode_attn", "cached_positions"]
