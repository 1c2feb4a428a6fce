"""Triton kernels for Taylor linear attention (chunked forward/backward with varlen, fused decode).

Importing this package needs `triton`; based.ops.taylor guards the import and falls back to PyTorch.
"""
from __future__ import annotations

import os

import torch

from ..common import DEFAULT_EPS, State
from . import chunkwise
from .autograd import TaylorChunkFunction
from .decode import triton_taylor_linear_attn_step
from .layout import from_internal, to_internal

FORMS = ("auto", "fused", "chunkwise")
# "fused": triton/chunk.py, one program walks a sequence with the whole state on chip;
# "chunkwise": triton/chunkwise.py, states at chunk boundaries then every chunk in parallel.
FORM = os.environ.get("BASED_TRITON_FORM", "auto")


def _pick_form(form: str, d: int, dv: int, chunks: int = 0, heads: int = 1) -> str:
    """auto: chunkwise where supported and its per-chunk states (`chunks` chunks of `heads` heads)
    stay within CW_MAX_STATE_BYTES, else fused, which needs no memory beyond its inputs."""
    if form not in FORMS:
        raise ValueError(f"unknown Triton form {form!r}: use one of {FORMS}")
    if form == "auto":
        fits = chunkwise.state_bytes(chunks, heads, d, dv) <= chunkwise.CW_MAX_STATE_BYTES
        return "chunkwise" if chunkwise.supported(d, dv) and fits else "fused"
    if form == "chunkwise" and not chunkwise.supported(d, dv):
        raise ValueError(f"the chunkwise Triton form needs head dim <= {chunkwise.CW_MAX_DV}, got {dv}: use form='fused'")
    return form


# Left out of torch.compile graphs (a graph break where a compiled block calls it): the op is already
# fused Triton kernels with its own backward, and its launch logic is host-side Python that Dynamo
# need not trace. The compiled code before and after it stays compiled.
@torch.compiler.disable
def triton_taylor_linear_attn(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    feature_map: str = "compact",
    scale: float | None = None,
    eps: float = DEFAULT_EPS,
    initial_state: State | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    form: str | None = None,
) -> tuple[torch.Tensor, State | None]:
    """Chunked causal Taylor linear attention; differentiable in q, k, v and initial_state.

    Args:
        q, k: [B, T, H, d]; v: [B, T, H, dv]. With cu_seqlens (int32 [N + 1], flash-attn convention)
            B must be 1 and the N sequences are packed along T.
        initial_state: (kv [N, H, D_feat, dv], k_sum [N, H, D_feat]) fp32 in the public layout of
            `feature_map`, or None.
    Returns:
        o [B, T, H, dv] in v's dtype, and (kv, k_sum) [N, H, D_feat(, dv)] fp32 or None.
    """
    d = q.shape[-1]
    scale = d**-0.5 if scale is None else float(scale)
    if cu_seqlens is not None:
        if q.shape[0] != 1:
            raise ValueError(f"with cu_seqlens, q must be [1, total_T, H, d], got {tuple(q.shape)}")
        cu_seqlens = cu_seqlens.to(device=q.device, dtype=torch.int32).contiguous()
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    hs0 = zs0 = None
    if initial_state is not None:
        hs0, zs0 = to_internal(initial_state, d, feature_map, scale)
    chunks = chunkwise.num_chunks(q.shape[0], q.shape[1], None if cu_seqlens is None else cu_seqlens.numel() - 1)
    form = _pick_form(FORM if form is None else form, d, v.shape[-1], chunks, q.shape[2])
    o, _, hsT, zsT = TaylorChunkFunction.apply(q, k, v, hs0, zs0, cu_seqlens, scale, eps, output_final_state, form)
    final = from_internal(hsT, zsT, d, feature_map, scale) if output_final_state else None
    return o, final


__all__ = ["FORMS", "triton_taylor_linear_attn", "triton_taylor_linear_attn_step"]
