"""The autograd function over both Triton forms: forward and backward of "fused" (triton/chunk.py) or
"chunkwise" (triton/chunkwise.py), which take and return the same tensors."""
from __future__ import annotations

import torch

from .chunk import taylor_chunk_bwd, taylor_chunk_fwd
from .chunkwise import taylor_chunkwise_bwd, taylor_chunkwise_fwd

KERNELS = {"fused": (taylor_chunk_fwd, taylor_chunk_bwd), "chunkwise": (taylor_chunkwise_fwd, taylor_chunkwise_bwd)}


class TaylorChunkFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, hs0, zs0, cu_seqlens, scale, eps, output_final_state, form):
        o, den, hsT, zsT = KERNELS[form][0](q, k, v, hs0, zs0, cu_seqlens, scale, eps, output_final_state)
        ctx.save_for_backward(q, k, v, o, den, hs0, zs0, cu_seqlens)
        ctx.scale, ctx.eps, ctx.form = scale, eps, form
        ctx.mark_non_differentiable(den)
        ctx.set_materialize_grads(False)
        return o, den, hsT, zsT

    @staticmethod
    def backward(ctx, do, dden, dhsT, dzsT):
        q, k, v, o, den, hs0, zs0, cu_seqlens = ctx.saved_tensors
        do = torch.zeros_like(o) if do is None else do
        if dhsT is not None and dzsT is None:
            dzsT = torch.zeros(dhsT.shape[:-1], dtype=torch.float32, device=dhsT.device)
        if dzsT is not None and dhsT is None:
            dhsT = torch.zeros(*dzsT.shape, v.shape[-1], dtype=torch.float32, device=dzsT.device)
        dhsT = None if dhsT is None else dhsT.contiguous()
        dzsT = None if dzsT is None else dzsT.contiguous()
        dq, dk, dv, dhs0, dzs0 = KERNELS[ctx.form][1](
            q, k, v, o, den, do.contiguous(), hs0, zs0, dhsT, dzsT, cu_seqlens, ctx.scale, ctx.eps
        )
        return dq, dk, dv, dhs0, dzs0, None, None, None, None, None
