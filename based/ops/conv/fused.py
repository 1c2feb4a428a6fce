"""Fused Triton kernels of short_conv: for training (no state in or out) forward, backward and a vmap rule; for
prefill (no gradient) a forward that continues from a state and applies the activation and a gate.

In PyTorch a causal depthwise conv on [B, T, C] activations is a transpose, a copy padded with K - 1 zeros,
cuDNN's depthwise conv on [B, C, T] and a transpose back; its backward adds the same copies and cuDNN's
depthwise weight gradient, and an activation after it (Mamba's SiLU) is a kernel of its own each way. Under
torch.func.vmap over stacked runs (the MQAR sweep) each run's weight is folded into the conv's groups, which
copies the activations once more each way. Here the conv reads and writes [B, T, C] in place:

    forward:  y[b, t, c] = act(bias[c] + sum_{i<K} w[c, i] x[b, t - K + 1 + i, c])      (act: identity or SiLU)
    backward: g = dy * act'(pre) (one pass, SiLU only), then one pass that writes dx and per-block partial
              sums of dw and dbias, summed in PyTorch (no atomics: the same bits every run)

Tiles of BT steps x BC channels; the K shifted loads of a tile are neighbours in memory, mostly cache hits.

Stacked runs: the weight comes per run, [R, C, K] (bias [R, C]); sequence b reads run b // (B / R). vmap's
runs are folded into the batch (based/ops/vmap_fold.py), so a stacked model launches each kernel once.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..vmap_fold import KernelBackward, fold_runs, unfold_runs

BLOCK_T, BLOCK_C, NUM_WARPS = 64, 64, 4


@triton.jit
def _tile(base, o_t, o_c, T, C, s_t, shift):
    """[BT, BC] of a [T, C] sequence at rows o_t + shift (zero outside 0 .. T - 1)."""
    rows = o_t + shift
    m = ((rows >= 0) & (rows < T))[:, None] & (o_c < C)[None, :]
    return tl.load(base + rows.to(tl.int64)[:, None] * s_t + o_c[None, :], mask=m, other=0.0).to(tl.float32)


@triton.jit
def _pre(x_base, w_ptr, b_ptr, o_t, o_c, T, C, s_t, K: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr,
         HAS_BIAS: tl.constexpr):
    """The conv before its activation, [BT, BC] in fp32."""
    m_c = o_c < C
    acc = tl.zeros([BT, BC], dtype=tl.float32)
    for i in tl.static_range(K):
        w_i = tl.load(w_ptr + o_c * K + i, mask=m_c, other=0.0).to(tl.float32)
        acc += _tile(x_base, o_t, o_c, T, C, s_t, i - (K - 1)) * w_i[None, :]
    if HAS_BIAS:
        acc += tl.load(b_ptr + o_c, mask=m_c, other=0.0).to(tl.float32)[None, :]
    return acc


@triton.jit
def _fwd_kernel(x, s_xb, s_xt, w, b, y, T, C, RB,
                K: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr, HAS_BIAS: tl.constexpr, SILU: tl.constexpr):
    o_t = tl.program_id(0) * BT + tl.arange(0, BT)
    o_c = tl.program_id(1) * BC + tl.arange(0, BC)
    seq = tl.program_id(2).to(tl.int64)
    run = seq // RB
    acc = _pre(x + seq * s_xb, w + run * C * K, b + run * C, o_t, o_c, T, C, s_xt, K, BT, BC, HAS_BIAS)
    if SILU:
        acc = acc * tl.sigmoid(acc)
    m = (o_t < T)[:, None] & (o_c < C)[None, :]
    tl.store(y + seq * T * C + o_t.to(tl.int64)[:, None] * C + o_c[None, :], acc.to(y.dtype.element_ty), mask=m)


@triton.jit
def _silu_grad_kernel(x, s_xb, s_xt, w, b, dy, g, T, C, RB,
                      K: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr, HAS_BIAS: tl.constexpr):
    """g = dy * SiLU'(pre), pre recomputed from x: d/da a sigmoid(a) = s (1 + a (1 - s))."""
    o_t = tl.program_id(0) * BT + tl.arange(0, BT)
    o_c = tl.program_id(1) * BC + tl.arange(0, BC)
    seq = tl.program_id(2).to(tl.int64)
    run = seq // RB
    a = _pre(x + seq * s_xb, w + run * C * K, b + run * C, o_t, o_c, T, C, s_xt, K, BT, BC, HAS_BIAS)
    s = tl.sigmoid(a)
    offs = seq * T * C + o_t.to(tl.int64)[:, None] * C + o_c[None, :]
    m = (o_t < T)[:, None] & (o_c < C)[None, :]
    d = tl.load(dy + offs, mask=m, other=0.0).to(tl.float32)
    tl.store(g + offs, d * s * (1 + a * (1 - s)), mask=m)


@triton.jit
def _bwd_kernel(x, s_xb, s_xt, w, g, dx, dw_part, db_part, T, C, RB,
                K: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr):
    """dx of this tile; this tile's sums of dw [K, BC] and dbias [BC] into its row of the partial buffers."""
    o_t = tl.program_id(0) * BT + tl.arange(0, BT)
    o_c = tl.program_id(1) * BC + tl.arange(0, BC)
    seq = tl.program_id(2).to(tl.int64)
    run = seq // RB
    m_c = o_c < C
    g_base = g + seq * T * C
    x_base = x + seq * s_xb
    w_run = w + run * C * K
    g_t = _tile(g_base, o_t, o_c, T, C, C, 0)
    acc = tl.zeros([BT, BC], dtype=tl.float32)
    part = (seq * tl.num_programs(0) + tl.program_id(0)) * K * C  # this tile's row of dw_part [.., K, C]
    for i in tl.static_range(K):
        w_i = tl.load(w_run + o_c * K + i, mask=m_c, other=0.0).to(tl.float32)
        acc += _tile(g_base, o_t, o_c, T, C, C, K - 1 - i) * w_i[None, :]  # y[t + K-1-i] read x[t] via tap i
        dw_i = tl.sum(g_t * _tile(x_base, o_t, o_c, T, C, s_xt, i - (K - 1)), axis=0)
        tl.store(dw_part + part + i * C + o_c, dw_i, mask=m_c)
    tl.store(db_part + (seq * tl.num_programs(0) + tl.program_id(0)) * C + o_c, tl.sum(g_t, axis=0), mask=m_c)
    m = (o_t < T)[:, None] & m_c[None, :]
    tl.store(dx + seq * T * C + o_t.to(tl.int64)[:, None] * C + o_c[None, :], acc.to(dx.dtype.element_ty), mask=m)


@triton.jit
def _infer_kernel(x, s_xb, s_xt, st, s_sb, s_sc, s_sk, w, b, gate, s_gb, s_gt, y, T, C,
                  K: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr, HAS_STATE: tl.constexpr,
                  HAS_BIAS: tl.constexpr, SILU: tl.constexpr, HAS_GATE: tl.constexpr):
    """Prefill (no gradient): y = act(conv) * gate, the inputs before x read from the state [B, C, K] (any
    strides; tap K - 1 is x's previous input), computed in fp32 and rounded once."""
    o_t = tl.program_id(0) * BT + tl.arange(0, BT)
    o_c = tl.program_id(1) * BC + tl.arange(0, BC)
    seq = tl.program_id(2).to(tl.int64)
    m_c = o_c < C
    acc = tl.zeros([BT, BC], dtype=tl.float32)
    for i in tl.static_range(K):
        w_i = tl.load(w + o_c * K + i, mask=m_c, other=0.0).to(tl.float32)
        rows = o_t + (i - (K - 1))
        v = _tile(x + seq * s_xb, o_t, o_c, T, C, s_xt, i - (K - 1))
        if HAS_STATE:  # rows -1 .. -(K - 1): state taps K - 1 .. 1 (only the first tile has any)
            m_s = (rows < 0)[:, None] & m_c[None, :]
            p = st + seq * s_sb + o_c.to(tl.int64)[None, :] * s_sc + (K + rows).to(tl.int64)[:, None] * s_sk
            v += tl.load(p, mask=m_s, other=0.0).to(tl.float32)
        acc += v * w_i[None, :]
    if HAS_BIAS:
        acc += tl.load(b + o_c, mask=m_c, other=0.0).to(tl.float32)[None, :]
    if SILU:
        acc = acc * tl.sigmoid(acc)
    m = (o_t < T)[:, None] & m_c[None, :]
    if HAS_GATE:
        acc *= tl.load(gate + seq * s_gb + o_t.to(tl.int64)[:, None] * s_gt + o_c[None, :], mask=m,
                       other=0.0).to(tl.float32)
    tl.store(y + seq * T * C + o_t.to(tl.int64)[:, None] * C + o_c[None, :], acc.to(y.dtype.element_ty), mask=m)


def _rows(x: torch.Tensor) -> torch.Tensor:
    """x [B, T, C] with unit channel stride (a split or folded view stays a view)."""
    return x if x.stride(-1) == 1 else x.contiguous()


def _grid(B: int, T: int, C: int) -> tuple[int, int, int]:
    return triton.cdiv(T, BLOCK_T), triton.cdiv(C, BLOCK_C), B


def _fwd(x, w, b, silu: bool) -> torch.Tensor:
    """x [B, T, C], w [R, C, K], b [R, C] or None (R runs, R divides B) -> y [B, T, C] in x's dtype."""
    x = _rows(x)
    B, T, C = x.shape
    R, _, K = w.shape
    y = torch.empty(B, T, C, dtype=x.dtype, device=x.device)
    _fwd_kernel[_grid(B, T, C)](
        x, x.stride(0), x.stride(1), w, w if b is None else b, y, T, C, B // R,
        K=K, BT=BLOCK_T, BC=BLOCK_C, HAS_BIAS=b is not None, SILU=silu, num_warps=NUM_WARPS,
    )
    return y


def _bwd(x, w, b, dy, silu: bool):
    """(dx, dw [R, C, K], db [R, C] or None) of _fwd's y given dy."""
    x, dy, w = _rows(x), dy.contiguous(), w.contiguous()  # w: a shared weight comes expanded over the runs
    b = None if b is None else b.contiguous()
    B, T, C = x.shape
    R, _, K = w.shape
    grid = _grid(B, T, C)
    if silu:
        g = torch.empty(B, T, C, dtype=torch.float32, device=x.device)
        _silu_grad_kernel[grid](x, x.stride(0), x.stride(1), w, w if b is None else b, dy, g, T, C, B // R,
                                K=K, BT=BLOCK_T, BC=BLOCK_C, HAS_BIAS=b is not None, num_warps=NUM_WARPS)
    else:
        g = dy
    dx = torch.empty(B, T, C, dtype=x.dtype, device=x.device)
    dw_part = torch.empty(B, grid[0], K, C, dtype=torch.float32, device=x.device)
    db_part = torch.empty(B, grid[0], C, dtype=torch.float32, device=x.device)
    _bwd_kernel[grid](x, x.stride(0), x.stride(1), w, g, dx, dw_part, db_part, T, C, B // R,
                      K=K, BT=BLOCK_T, BC=BLOCK_C, num_warps=NUM_WARPS)
    dw = dw_part.view(R, -1, K, C).sum(1).transpose(1, 2).to(w.dtype)
    db = None if b is None else db_part.view(R, -1, C).sum(1).to(b.dtype)
    return dx, dw, db


class _ShortConvBackward(KernelBackward):
    """The backward kernels as a Function of their own, so that vmap(grad(...)) batches them too."""

    @staticmethod
    def forward(x, w, b, dy, silu):
        return _bwd(x, w, b, dy, silu)

    @staticmethod
    def vmap(info, in_dims, x, w, b, dy, silu):
        n = info.batch_size
        dx, dw, db = _ShortConvBackward.apply(fold_runs(x, in_dims[0], n), fold_runs(w, in_dims[1], n),
                                              fold_runs(b, in_dims[2], n), fold_runs(dy, in_dims[3], n), silu)
        out = (unfold_runs(dx, n), unfold_runs(dw, n), None if db is None else unfold_runs(db, n))
        return out, (0, 0, None if db is None else 0)


class ShortConv(torch.autograd.Function):
    """(x [B, T, C], w [R, C, K], b [R, C] or None, silu) -> y; the backward recomputes the conv from x."""

    @staticmethod
    def forward(x, w, b, silu):
        return _fwd(x, w.contiguous(), None if b is None else b.contiguous(), silu)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, w, b, ctx.silu = inputs
        ctx.has_bias = b is not None
        ctx.save_for_backward(x, w, b)

    @staticmethod
    def backward(ctx, dy):
        x, w, b = ctx.saved_tensors
        dx, dw, db = _ShortConvBackward.apply(x, w, b, dy, ctx.silu)
        return dx, dw, db if ctx.has_bias else None, None

    @staticmethod
    def vmap(info, in_dims, x, w, b, silu):
        n = info.batch_size
        y = ShortConv.apply(fold_runs(x, in_dims[0], n), fold_runs(w, in_dims[1], n), fold_runs(b, in_dims[2], n),
                            silu)
        return unfold_runs(y, n), 0


def fused_short_conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                     activation: str | None = None) -> torch.Tensor:
    """short_conv without initial or final state (see based/ops/conv/__init__.py) as Triton kernels.

    Args:
        x: [B, T, C] (any row strides, channels contiguous); weight: [C, K]; bias: [C] or None;
        activation: None or "silu", applied to the conv's output (its gradient fused into the backward).
    Returns:
        y [B, T, C] in x's dtype (computed in fp32).
    """
    return ShortConv.apply(x, weight.unsqueeze(0), None if bias is None else bias.unsqueeze(0), activation == "silu")


def fused_short_conv_inference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                                initial_state: torch.Tensor | None = None, activation: str | None = None,
                                gate: torch.Tensor | None = None) -> torch.Tensor:
    """short_conv's y for prefill (no gradient) in one Triton pass: act(conv(x)) * gate, continuing from
    initial_state, in place on [B, T, C] (where PyTorch concatenates the state before x, transposes, runs cuDNN's
    depthwise conv, transposes back and applies the activation and the gate as kernels of their own).

    Args:
        x, gate: [B, T, C], channels contiguous (a split of a projection is read in place); gate or None.
        weight: [C, K]; bias: [C] or None; initial_state: [B, C, K] (any strides, newest input last) or None.
    Returns:
        y [B, T, C] in x's dtype (fp32 inside, rounded once).
    """
    x = _rows(x)
    B, T, C = x.shape
    K = weight.shape[1]
    gate = None if gate is None else _rows(gate)
    st = initial_state
    y = torch.empty(B, T, C, dtype=x.dtype, device=x.device)
    _infer_kernel[_grid(B, T, C)](
        x, x.stride(0), x.stride(1), x if st is None else st, *((0, 0, 0) if st is None else st.stride()),
        weight.contiguous(), weight if bias is None else bias, x if gate is None else gate,
        *((0, 0) if gate is None else gate.stride()[:2]), y, T, C,
        K=K, BT=BLOCK_T, BC=BLOCK_C, HAS_STATE=st is not None, HAS_BIAS=bias is not None,
        SILU=activation == "silu", HAS_GATE=gate is not None, num_warps=NUM_WARPS,
    )
    return y


__all__ = ["fused_short_conv", "fused_short_conv_inference"]
