"""Public state layouts (compact / full feature maps) <-> the kernels' internal layout.

The kernels keep the state as raw moments of the keys, padded to BK = max(16, next_pow2(d)):
    rows [0]                  H0 = sum v                   (constant feature)
    rows [1, 1 + BK)          H1 = sum k v^T                (linear features)
    rows [1 + BK, 1 + BK + BK^2) H2 = sum vec(k k^T) v^T    (quadratic features, row-major (i, j))
and the same rows for z = sum of the features (v replaced by 1). With s = scale q.k,
    phi(q) . S = H0 + scale q.H1 + scale^2 / 2 vec(q q^T).H2.
The public layouts are fixed scalings of these rows (see feature_map.py); the compact map keeps i <= j
and its entry (i, j) stands for both H2[i, j] and H2[j, i]. Conversions are gathers, so autograd
carries gradients of initial and final states through them.
"""
from __future__ import annotations

import math
from functools import lru_cache

import torch

from ..feature_map import taylor_feature_dim


def block_k(d: int) -> int:
    """Padded feature dim used by the kernels (tl.dot needs K >= 16)."""
    return max(16, 1 << (d - 1).bit_length())


def internal_dim(d: int) -> int:
    bk = block_k(d)
    return 1 + bk + bk * bk


@lru_cache(maxsize=None)
def _maps(d: int, kind: str, scale: float, device: torch.device):
    """(src_in, coef_in, src_out, coef_out): internal row r = coef_in[r] * public[src_in[r]],
    public row p = coef_out[p] * internal[src_out[p]]."""
    bk = block_k(d)
    F = taylor_feature_dim(d, kind)
    FI = 1 + bk + bk * bk
    src_in = torch.zeros(FI, dtype=torch.long)
    coef_in = torch.zeros(FI, dtype=torch.float64)
    src_out = torch.zeros(F, dtype=torch.long)
    coef_out = torch.zeros(F, dtype=torch.float64)
    rs = math.sqrt(scale)
    src_in[0], coef_in[0] = 0, 1.0
    src_out[0], coef_out[0] = 0, 1.0
    for i in range(d):
        # public linear feature sqrt(scale) x_i, internal x_i
        src_in[1 + i], coef_in[1 + i] = 1 + i, 1 / rs
        src_out[1 + i], coef_out[1 + i] = 1 + i, rs
    if kind == "full":
        c = scale / math.sqrt(2)
        for i in range(d):
            for j in range(d):
                p, r = 1 + d + i * d + j, 1 + bk + i * bk + j
                src_in[r], coef_in[r] = p, 1 / c
                src_out[p], coef_out[p] = r, c
    else:
        ii, jj = torch.triu_indices(d, d)
        for p_rel, (i, j) in enumerate(zip(ii.tolist(), jj.tolist())):
            p = 1 + d + p_rel
            w = 1 / math.sqrt(2) if i == j else 1.0
            # compact feature w scale x_i x_j carries H2[i, j] + H2[j, i] for i < j; see module doc.
            c = w * scale
            for r in {1 + bk + i * bk + j, 1 + bk + j * bk + i}:
                src_in[r], coef_in[r] = p, 1 / c
            src_out[p], coef_out[p] = 1 + bk + i * bk + j, c
    return (src_in.to(device), coef_in.float().to(device), src_out.to(device), coef_out.float().to(device))


def to_internal(state, d: int, kind: str, scale: float):
    """(kv [N, H, F, dv], k_sum [N, H, F]) -> (hs [N, H, FI, dv], zs [N, H, FI]) fp32 contiguous."""
    kv, ks = state
    src, coef, _, _ = _maps(d, kind, float(scale), kv.device)
    hs = kv.float().index_select(-2, src) * coef[:, None]
    zs = ks.float().index_select(-1, src) * coef
    return hs.contiguous(), zs.contiguous()


def from_internal(hs: torch.Tensor, zs: torch.Tensor, d: int, kind: str, scale: float):
    """Inverse of to_internal on states the kernels produced."""
    _, _, src, coef = _maps(d, kind, float(scale), hs.device)
    return hs.index_select(-2, src) * coef[:, None], zs.index_select(-1, src) * coef


@lru_cache(maxsize=None)
def feature_tables(d: int, kind: str, scale: float, device: torch.device):
    """Per public feature f: phi_f(x) = coef[f] * x[a[f]] * x[b[f]], index -1 standing for 1."""
    F = taylor_feature_dim(d, kind)
    a = torch.full((F,), -1, dtype=torch.int32)
    b = torch.full((F,), -1, dtype=torch.int32)
    coef = torch.ones(F, dtype=torch.float64)
    for i in range(d):
        a[1 + i], coef[1 + i] = i, math.sqrt(scale)
    if kind == "full":
        for i in range(d):
            for j in range(d):
                p = 1 + d + i * d + j
                a[p], b[p], coef[p] = i, j, scale / math.sqrt(2)
    else:
        ii, jj = torch.triu_indices(d, d)
        for p_rel, (i, j) in enumerate(zip(ii.tolist(), jj.tolist())):
            p = 1 + d + p_rel
            a[p], b[p], coef[p] = i, j, scale * (1 / math.sqrt(2) if i == j else 1.0)
    return a.to(device), b.to(device), coef.float().to(device)
