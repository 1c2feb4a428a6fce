"""Input checks and state handling shared by every form of Taylor linear attention."""
from __future__ import annotations

import functools

import torch

from ..common import check_layout
from .feature_map import check_feature_map, taylor_feature_dim

# Guards the division only: the denominator sum_s (1 + a_s + a_s^2/2) is >= 1/2 per visible token.
DEFAULT_EPS = 1e-6

State = tuple[torch.Tensor, torch.Tensor]


def check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, feature_map: str) -> None:
    check_feature_map(feature_map)
    check_layout(q, k, v)
    if q.shape[-1] <= 0 or v.shape[-1] <= 0:
        raise ValueError(f"feature dim and head dim must be positive, got d={q.shape[-1]}, dv={v.shape[-1]}")


def check_state(state: State | None, q: torch.Tensor, v: torch.Tensor, feature_map: str) -> None:
    if state is None:
        return
    if not (isinstance(state, (tuple, list)) and len(state) == 2):
        raise ValueError("initial_state must be a tuple (kv [B, H, D_feat, dv], k_sum [B, H, D_feat])")
    B, _, H, d = q.shape
    F, dv = taylor_feature_dim(d, feature_map), v.shape[-1]
    kv, ks = state
    if tuple(kv.shape) != (B, H, F, dv) or tuple(ks.shape) != (B, H, F):
        raise ValueError(
            f"initial_state shapes {tuple(kv.shape)}, {tuple(ks.shape)} do not match "
            f"(B, H, D_feat, dv)=({B}, {H}, {F}, {dv}) and (B, H, D_feat)=({B}, {H}, {F}) "
            f"for feature_map={feature_map!r}"
        )


def triton_available(x: torch.Tensor) -> bool:
    """True when x is on CUDA and the Triton kernels import (triton installed), and x is no torch.func
    (vmap, grad) wrapper: the kernels' autograd Functions have no vmap rule, the PyTorch forms need none.
    Inside torch.compile the PyTorch forms too: dynamo cannot trace the wrapper check (a graph break in the
    middle of a compiled stacked MQAR step), and the compiler fuses those forms itself."""
    if torch.compiler.is_compiling():
        return False
    return x.is_cuda and _triton_imports() and not torch._C._functorch.is_functorch_wrapped_tensor(x)


@functools.cache
def _triton_imports() -> bool:
    # Cached: a failed import is not kept in sys.modules, so each call would try it again (a decode
    # step calls this once per layer).
    try:
        from . import triton as _  # noqa: F401
    except ImportError:
        return False
    return True


def zero_state(batch_size: int, num_heads: int, feature_dim: int, head_dim: int, device, feature_map="compact") -> State:
    """A fresh fp32 state (kv [B, H, D_feat, dv], k_sum [B, H, D_feat]) for `feature_dim`-wide q/k."""
    F = taylor_feature_dim(feature_dim, feature_map)
    return (
        torch.zeros(batch_size, num_heads, F, head_dim, device=device, dtype=torch.float32),
        torch.zeros(batch_size, num_heads, F, device=device, dtype=torch.float32),
    )
