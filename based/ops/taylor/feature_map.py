"""The 2nd-order Taylor feature map of BASED (Arora et al., 2024, section 4).

phi(q) . phi(k) = 1 + s + s^2 / 2 with s = scale * q.k, the Taylor expansion of exp(s) to second order.
"""
from __future__ import annotations

import math
from functools import lru_cache

import torch

FEATURE_MAPS = ("compact", "full")


def check_feature_map(kind: str) -> str:
    if kind not in FEATURE_MAPS:
        raise ValueError(f"unknown feature_map {kind!r}: use one of {FEATURE_MAPS}")
    return kind


def taylor_feature_dim(dim: int, kind: str = "compact") -> int:
    """Width of phi(x) for x of size `dim`: 1 + d + d^2 (full) or 1 + d + d(d+1)/2 (compact)."""
    check_feature_map(kind)
    if dim <= 0:
        raise ValueError(f"feature dim must be positive, got {dim}")
    return 1 + dim + (dim * dim if kind == "full" else dim * (dim + 1) // 2)


@lru_cache(maxsize=None)
def _triu_indices(dim: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    i, j = torch.triu_indices(dim, dim, device=device)
    return i, j


@lru_cache(maxsize=None)
def _compact_weights(dim: int, device: torch.device) -> torch.Tensor:
    # sum_{a,b} x_a x_b y_a y_b / 2 = sum_a (x_a^2/sqrt2)(y_a^2/sqrt2) + sum_{a<b} (x_a x_b)(y_a y_b):
    # diagonal terms carry 1/sqrt(2), off-diagonal ones carry 1.
    i, j = _triu_indices(dim, device)
    return torch.where(i == j, 1 / math.sqrt(2), 1.0).to(device)


def taylor_feature_map(x: torch.Tensor, kind: str = "compact", scale: float | None = None) -> torch.Tensor:
    """Map x [..., d] to phi(x) [..., D_feat] so that phi(q) . phi(k) = 1 + s + s^2/2, s = scale * q.k.

    Args:
        x: [..., d] queries or keys.
        kind: "full" gives [1, sqrt(scale) x, scale vec(x x^T) / sqrt(2)] (1 + d + d^2 features, the
            reference code's map); "compact" keeps the d(d+1)/2 distinct products of the symmetric
            outer product (1 + d + d(d+1)/2 features, same kernel, 44% less state at d=16).
        scale: defaults to d ** -0.5.
    """
    check_feature_map(kind)
    d = x.shape[-1]
    scale = d**-0.5 if scale is None else scale
    one = torch.ones_like(x[..., :1])
    linear = x * math.sqrt(scale)
    if kind == "full":
        quad = (x.unsqueeze(-1) * x.unsqueeze(-2)).flatten(-2) * (scale / math.sqrt(2))
    else:
        i, j = _triu_indices(d, x.device)
        # index_select, not x[..., i]: its backward is an index_add, where advanced indexing's is a sorting
        # index_put (35% of a stacked Based MQAR training step on an H100, benchmarks/results/mqar-stacked-profile-*).
        quad = x.index_select(-1, i) * x.index_select(-1, j) * (_compact_weights(d, x.device).to(x.dtype) * scale)
    return torch.cat([one, linear, quad], dim=-1)
