"""Small-batch projections of a decode step, each with its neighbours fused in: RMSNorm before, and after it
the bias, the residual add, SwiGLU, or BaseConv's short conv and gate.

At batch 1 a decode step is memory-bound on its weights (2.7 GB for the 1.3b preset: 0.63 ms at the H200's
copy rate), and cuBLAS's GEMVs read them at about 60% of the bandwidth, with one more kernel for every norm,
add and activation between them (374 kernels a token). Here every output row of a weight is read once,
whole, by a program that also normalises the input row itself (it is a few KB, read from L2 by each
program), so a block of the model is four or five kernels.

    norm_linear: y = [residual +] norm(x) @ W.T [+ bias]                  (W may be several, same K)
    norm_linear_argmax: the same (one W) and each row's argmax, for greedy decoding's LM head
    norm_glu:    [a, b] = norm(x) @ W.T [+ bias];  y = a * silu(b)         (SwiGLU's fc1)
                                               or y = silu(conv(a)) * b    (BaseConv's in_proj, one step)

norm(x) is RMSNorm with weight norm_weight (skipped when None), rounded to x's dtype; the projections
accumulate in fp32 and round where the eager layers round (after the projection, after the add), so the
PyTorch form here is exactly the layers' code and the kernels agree with it to the last rounding.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from ..argmax import argmax_rows
from ..common import check_backend
from ..conv import short_conv_step
from ..taylor.common import triton_available

MAX_ROWS = 16  # rows of x past which the kernels (one weight pass per 16 rows at most) lose to cuBLAS
# Inputs per row: the kernels hold whole weight rows, at most 64 values per thread (16 warps x 32 threads x 64
# over two rows).
MAX_K = 16384


def _weights(weight, bias) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor | None, ...]]:
    weights = (weight,) if isinstance(weight, torch.Tensor) else tuple(weight)
    if not 1 <= len(weights) <= 3:
        raise ValueError(f"norm_linear takes one to three weights, got {len(weights)}")
    if bias is None:
        biases = (None,) * len(weights)
    else:
        biases = (bias,) if isinstance(bias, torch.Tensor) else tuple(bias)
    if len(biases) != len(weights):
        raise ValueError(f"{len(weights)} weights need as many biases (or None), got {len(biases)}")
    return weights, biases


def _check(x: torch.Tensor, weights, biases, norm_weight, residual=None, n_out=None, index=None, gathered=None) -> None:
    if x.dim() != 2:
        raise ValueError(f"x must be [rows, K], got shape {tuple(x.shape)}")
    K = x.shape[1]
    rows = x.shape[0] if index is None else index.shape[0] if index.dim() == 1 else -1
    if index is not None and (index.dim() != 1 or index.dtype != torch.long or index.device != x.device):
        raise ValueError(f"index must be a torch.int64 tensor [rows] on {x.device} (rows of the table x), got "
                         f"{index.dtype} {tuple(index.shape)} on {index.device}")
    if gathered is not None and index is None:
        raise ValueError("gathered (the rows index picks, written for later use) needs index")
    if gathered is not None and (tuple(gathered.shape) != (rows, K) or gathered.dtype != x.dtype
                                 or not gathered.is_contiguous() or gathered.device != x.device):
        raise ValueError(f"gathered must be a contiguous {x.dtype} tensor [rows, K]=({rows}, {K}) on {x.device}, "
                         f"got {gathered.dtype} {tuple(gathered.shape)}")
    for w, b in zip(weights, biases):
        if w.dim() != 2 or w.shape[1] != K:
            raise ValueError(f"each weight must be [N, K={K}], got shape {tuple(w.shape)}")
        if b is not None and tuple(b.shape) != (w.shape[0],):
            raise ValueError(f"bias must be [N={w.shape[0]}], got shape {tuple(b.shape)}")
    if norm_weight is not None and tuple(norm_weight.shape) != (K,):
        raise ValueError(f"norm_weight must be [K={K}], got shape {tuple(norm_weight.shape)}")
    if residual is not None and tuple(residual.shape) != (rows, n_out):
        raise ValueError(f"residual must be [rows, N]=({rows}, {n_out}), got shape {tuple(residual.shape)}")


def _use_triton(backend: str, x: torch.Tensor, weights, index=None) -> bool:
    check_backend(backend)
    rows = x.shape[0] if index is None else index.shape[0]
    fits = (rows <= MAX_ROWS and x.shape[1] <= MAX_K and x.stride(-1) == 1
            and all(w.is_contiguous() for w in weights))
    if backend == "triton" and not fits:
        raise ValueError(
            f"the Triton projections need at most {MAX_ROWS} rows of x, K <= {MAX_K}, contiguous rows and "
            f"contiguous weights, got x {tuple(x.shape)} with strides {x.stride()}"
        )
    return backend == "triton" or (backend == "auto" and fits and triton_available(x))


def _gathered(x: torch.Tensor, index, gathered) -> torch.Tensor:
    """The PyTorch forms' input rows: x, or x[index] (also copied to gathered when given)."""
    if index is None:
        return x
    rows = F.embedding(index, x)
    return rows if gathered is None else gathered.copy_(rows)


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """RMSNorm as based.layers.RMSNorm computes it (fp32, rounded to x's dtype); identity when weight is None."""
    if weight is None:
        return x
    return F.rms_norm(x.float(), weight.shape, weight.float(), eps).to(x.dtype)


def norm_linear(
    x: torch.Tensor,
    weight: torch.Tensor | Sequence[torch.Tensor],
    bias: torch.Tensor | Sequence[torch.Tensor | None] | None = None,
    norm_weight: torch.Tensor | None = None,
    eps: float = 1e-5,
    residual: torch.Tensor | None = None,
    backend: str = "auto",
    index: torch.Tensor | None = None,
    gathered: torch.Tensor | None = None,
) -> torch.Tensor:
    """[residual +] rms_norm(x) @ W.T [+ bias], for x [rows, K] and W [N, K] (nn.Linear's layout).

    Args:
        weight: one matrix, or up to three with the same K whose outputs are concatenated (separate q, k, v
            projections read in one launch).
        bias: one per weight, or None.
        norm_weight: RMSNorm's weight [K], or None for no norm.
        residual: [rows, sum N] added after the projection is rounded, as `x + layer(x)` does.
        backend: "auto" (Triton on CUDA up to MAX_ROWS rows, else PyTorch), "triton" or "torch".
        index: long [rows]: x is then a table (an embedding) and the input rows are x[index], looked up in the
            kernel (a decode step's first projection needs no embedding kernel before it).
        gathered: [rows, K], with index: where the looked-up rows are written (the block's residual).
    Returns:
        [rows, sum N] in x's dtype.
    """
    weights, biases = _weights(weight, bias)
    n_out = sum(w.shape[0] for w in weights)
    _check(x, weights, biases, norm_weight, residual, n_out, index, gathered)
    if _use_triton(backend, x, weights, index):
        from .triton import triton_norm_linear

        return triton_norm_linear(x, weights, biases, norm_weight, eps, residual, index=index, gathered=gathered)
    h = rms_norm(_gathered(x, index, gathered), norm_weight, eps)
    y = torch.cat([F.linear(h, w, b) for w, b in zip(weights, biases)], dim=-1) if len(weights) > 1 else F.linear(
        h, weights[0], biases[0]
    )
    return y if residual is None else residual + y


def norm_linear_argmax(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    norm_weight: torch.Tensor | None = None,
    eps: float = 1e-5,
    *,
    n_valid: int | None = None,
    out: torch.Tensor | None = None,
    advance: torch.Tensor | None = None,
    log: torch.Tensor | None = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """norm_linear (one weight) with greedy decoding's choice in its epilogue: (logits [rows, N], ids [rows]).

    ids are argmax_rows(logits[:, :n_valid]): the largest of the first n_valid columns (the LM head's real
    vocabulary; default N), ties to the lowest column, NaN the largest. The kernel's programs each keep their
    best and the last to finish combines them, so no argmax kernel reads the logits again.

    Args:
        out: long [rows] to write ids into (default a new tensor).
        advance: integer [rows] to add one to once ids are written (a decode step's positions), or None.
        log: long [rows, L] (needs advance): each id is also written at column advance % L, advance as it was
            before this call, so that a caller decoding many steps reads their tokens from it once per L steps
            instead of copying every step's (Decoder's log_len).
    """
    if not isinstance(weight, torch.Tensor):
        raise ValueError("norm_linear_argmax takes one weight")
    _check(x, (weight,), (bias,), norm_weight)
    rows, N = x.shape[0], weight.shape[0]
    n_valid = N if n_valid is None else n_valid
    if not 1 <= n_valid <= N:
        raise ValueError(f"n_valid must be in [1, N={N}], got {n_valid}")
    out = torch.empty(rows, dtype=torch.long, device=x.device) if out is None else out
    for name, t, dtypes in (("out", out, (torch.long,)), ("advance", advance, (torch.long, torch.int32))):
        if t is not None and (tuple(t.shape) != (rows,) or t.dtype not in dtypes or t.device != x.device):
            raise ValueError(f"{name} must be a {' or '.join(map(str, dtypes))} tensor [rows={rows}] on {x.device}, "
                             f"got {t.dtype} {tuple(t.shape)} on {t.device}")
    if log is not None and (advance is None or log.dim() != 2 or log.shape[0] != rows or log.shape[1] < 1
                            or log.dtype != torch.long or log.device != x.device):
        raise ValueError(f"log must be a torch.int64 tensor [rows={rows}, L >= 1] on {x.device}, with advance, got "
                         f"{log.dtype} {tuple(log.shape)} on {log.device} and advance={advance is not None}")
    if _use_triton(backend, x, (weight,)):
        from .triton import triton_norm_linear

        logits = triton_norm_linear(x, (weight,), (bias,), norm_weight, eps, None,
                                    argmax=(n_valid, out, advance, log))
        return logits, out
    logits = norm_linear(x, weight, bias, norm_weight, eps, backend="torch")
    out.copy_(argmax_rows(logits[:, :n_valid], backend="torch"))
    if log is not None:
        log.scatter_(1, (advance % log.shape[1]).long()[:, None], out[:, None])
    if advance is not None:
        advance.add_(1)
    return logits, out


def norm_glu(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    norm_weight: torch.Tensor | None = None,
    eps: float = 1e-5,
    conv_state: torch.Tensor | None = None,
    conv_weight: torch.Tensor | None = None,
    conv_bias: torch.Tensor | None = None,
    backend: str = "auto",
    index: torch.Tensor | None = None,
    gathered: torch.Tensor | None = None,
) -> torch.Tensor:
    """A gated projection: [a, b] = rms_norm(x) @ W.T [+ bias], W [2H, K], then

    - without conv_state: a * silu(b), SwiGLU (a = up, b = gate, based.layers.SwiGLU's fc1 layout);
    - with conv_state [rows, H, taps] (conv_state_zeros): silu(conv(a)) * b, one decode step of BaseConv, where
      a is shifted into conv_state in place and conv_weight [H, taps] / conv_bias [H] are the short conv's.

    Returns [rows, H] in x's dtype. backend, index and gathered as for norm_linear.
    """
    if weight.dim() != 2 or weight.shape[0] % 2:
        raise ValueError(f"weight must be [2H, K] (two halves a, b), got shape {tuple(weight.shape)}")
    _check(x, (weight,), (bias,), norm_weight, index=index, gathered=gathered)
    rows = x.shape[0] if index is None else index.shape[0]
    H = weight.shape[0] // 2
    if conv_state is not None:
        if conv_weight is None or conv_weight.dim() != 2 or conv_weight.shape[0] != H:
            raise ValueError(f"conv_weight must be [H={H}, taps] with a conv_state, got "
                             f"{None if conv_weight is None else tuple(conv_weight.shape)}")
        if tuple(conv_state.shape) != (rows, H, conv_weight.shape[1]):
            raise ValueError(f"conv_state must be [rows, H, taps]=({rows}, {H}, {conv_weight.shape[1]}), "
                             f"got {tuple(conv_state.shape)}")
    tap_major = conv_state is None or conv_state.transpose(1, 2).is_contiguous()
    if backend == "triton" and not tap_major:
        raise ValueError("the Triton norm_glu needs a tap-major conv_state: allocate it with conv_state_zeros")
    if tap_major and _use_triton(backend, x, (weight,), index):
        from .triton import triton_norm_glu

        return triton_norm_glu(x, weight, bias, norm_weight, eps, conv_state, conv_weight, conv_bias, index=index,
                               gathered=gathered)
    a, b = F.linear(rms_norm(_gathered(x, index, gathered), norm_weight, eps), weight, bias).chunk(2, dim=-1)
    if conv_state is None:
        return a * F.silu(b)
    return short_conv_step(a, conv_state, conv_weight, conv_bias, activation="silu", gate=b, backend="torch")


__all__ = ["norm_linear", "norm_linear_argmax", "norm_glu", "rms_norm", "MAX_ROWS"]
