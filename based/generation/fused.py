"""The decode step for small batches: each projection one kernel with its neighbours fused in.

At batch 1 the step reads every weight once (2.7 GB for the 1.3b preset) and does little else, so its
time is the weights' read time plus a cost per kernel. The eager and compiled steps read the weights
through cuBLAS GEMVs at ~60% of the bandwidth and launch 374 kernels or more; here every projection is one
based.ops.gemv kernel that also applies the RMSNorm before it and the bias, residual add, SwiGLU or BaseConv
step after it, so a block is four kernels (BaseConv, then SwiGLU) or five (linear or sliding-window
attention, whose own step kernel sits between its projections).

    BaseConv block:  norm_glu(norm1, in_proj, short conv, gate) -> norm_linear(out_proj, + x)
    SwiGLU:          norm_glu(norm2, fc1, up * silu(gate))      -> norm_linear(fc2, + x)

Mixers without a fused form here (Mamba, RWKV, ...) run their own step between the fused MLPs.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..layers import Attention, BaseConv, LinearAttention
from ..ops.gemv import MAX_ROWS, norm_glu, norm_linear, norm_linear_argmax

FUSED_MAX_BATCH = 1  # slots up to which Decoder picks this step on CUDA by default (measured, docs/generation.md)


def fused_step(model, backend: str = "auto"):
    """model.step (input_ids [B], per-layer states, seqlen_offset -> logits [B, vocab]) built from
    based.ops.gemv; backend as theirs ("torch" gives the eager layers' own arithmetic, for tests). B must
    be at most based.ops.gemv.MAX_ROWS for the kernels to apply."""
    transformer = model.transformer
    blocks = [_block_step(block, backend) for block in transformer.layers]
    ln_f, lm_head, vocab = transformer.ln_f, model.lm_head, model.config.vocab_size

    def step(input_ids: torch.Tensor, state, seqlen_offset, next_tokens: torch.Tensor | None = None,
             log: torch.Tensor | None = None) -> torch.Tensor:
        """With next_tokens (long [B]), greedy decoding's choice is made in the LM head's kernel: the argmax
        is written there (and into log [B, L] at column seqlen_offset % L, if given) and seqlen_offset advanced
        by one, with no kernel after the head."""
        # The first projection looks the tokens' embeddings up itself (no embedding kernel before it).
        x, index = transformer.embeddings.word_embeddings.weight, input_ids.reshape(-1)
        for block_step, s in zip(blocks, state):
            x = block_step(x, s, seqlen_offset, index)
            index = None
        head = (x, lm_head.weight, lm_head.bias, ln_f.weight, ln_f.eps)
        if next_tokens is None:
            logits = norm_linear(*head, backend=backend)
        else:
            logits, _ = norm_linear_argmax(*head, n_valid=vocab, out=next_tokens, advance=seqlen_offset, log=log,
                                           backend=backend)
        return logits[:, :vocab]

    return step


def _block_step(block, backend: str):
    """x -> the block's output, x + mixer(norm1(x)) then + mlp(norm2(x)), from fused projections."""
    mixer, norm1, norm2, mlp = block.mixer, block.norm1, block.norm2, block.mlp

    def project_in(x, weight, bias, **lookup):
        return norm_linear(x, weight, bias, norm1.weight, norm1.eps, backend=backend, **lookup)

    def take(x, index):
        """(the first projection's input, its lookup arguments, the block's input x): with index, x is the
        embedding table, looked up by the first projection, which also writes the rows for the residual."""
        if index is None:
            return x, {}, x
        rows = x.new_empty(index.shape[0], x.shape[1])
        return x, dict(index=index, gathered=rows), rows

    def project_out(h, x):
        return norm_linear(h, mixer.out_proj.weight, mixer.out_proj.bias, residual=x, backend=backend)

    if isinstance(mixer, BaseConv):
        def mix(x, state, seqlen_offset, index):
            table, lookup, x = take(x, index)
            h = norm_glu(
                table, mixer.in_proj.weight, mixer.in_proj.bias, norm1.weight, norm1.eps, conv_state=state[0],
                conv_weight=mixer.conv.weight.squeeze(1), conv_bias=mixer.conv.bias, backend=backend, **lookup,
            )
            return project_out(h, x)
    elif type(mixer) is LinearAttention:  # not the feature-map ablations (subclasses with their own step)
        projections = (mixer.proj_q, mixer.proj_k, mixer.proj_v)
        sizes = [p.out_features for p in projections]

        def mix(x, state, seqlen_offset, index):
            table, lookup, x = take(x, index)
            qkv = project_in(table, [p.weight for p in projections], [p.bias for p in projections], **lookup)
            return project_out(mixer.step_attend(*qkv.split(sizes, dim=-1), state), x)
    elif isinstance(mixer, Attention):  # sliding-window attention too
        def mix(x, state, seqlen_offset, index):
            table, lookup, x = take(x, index)
            qkv = project_in(table, mixer.Wqkv.weight, mixer.Wqkv.bias, **lookup)
            return project_out(mixer.step_attend(qkv, state, seqlen_offset), x)
    else:
        def mix(x, state, seqlen_offset, index):
            x = x if index is None else F.embedding(index, x)
            return x + mixer.step(norm1(x), state, seqlen_offset)

    def block_step(x, state, seqlen_offset, index=None):
        """With index, x is the embedding table and the block's input its rows index."""
        x = mix(x, state, seqlen_offset, index)
        h = norm_glu(x, mlp.fc1.weight, mlp.fc1.bias, norm2.weight, norm2.eps, backend=backend)
        return norm_linear(h, mlp.fc2.weight, mlp.fc2.bias, residual=x, backend=backend)

    return block_step


__all__ = ["fused_step", "FUSED_MAX_BATCH", "MAX_ROWS"]
