"""The fused Triton short conv for training (based/ops/conv/fused.py) against the sum written out in fp64: output and
every gradient (x, weight, bias), with and without SiLU, at lengths and widths that leave partial tiles, kernel
sizes 1 to 9, strided inputs, and under vmap(grad) over stacked runs.

Without CUDA the kernels run under TRITON_INTERPRET=1 on tiny shapes (tests/conftest.py); a child process compiles
them for sm_90. The `gpu` tests compare with the PyTorch form at the MQAR sweep's sizes:
pytest -m gpu tests/ops/test_conv_fused.py
"""
import json
import os

import torch
import torch.nn.functional as F

if not torch.cuda.is_available() and __name__ != "__main__":  # run as a script: the compile check's child
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

pytest.importorskip("triton")

from torch.func import grad, vmap  # noqa: E402

from based.ops.conv import naive_short_conv, short_conv  # noqa: E402
from based.ops.conv import _final_state, _shifted_sum  # noqa: E402
from based.ops.conv.fused import fused_short_conv, fused_short_conv_inference  # noqa: E402
from tests.conftest import rel_err, saved_numels  # noqa: E402
from tests.ops._triton_check import assert_compiles, ptx_status, signature  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _inputs(B, T, C, K, seed, runs=0, device=DEVICE):
    g = torch.Generator().manual_seed(seed)
    lead = (runs,) if runs else ()
    x = torch.randn(*lead, B, T, C, generator=g)
    w, b = torch.randn(*lead, C, K, generator=g) / K**0.5, torch.randn(*lead, C, generator=g)
    return [t.to(device) for t in (x, w, b)]


def _naive(x, w, b, silu):
    y = naive_short_conv(x.double(), w.double(), None if b is None else b.double())
    return F.silu(y) if silu else y


def _fused(x, w, b, silu):
    return fused_short_conv(x, w, b, "silu" if silu else None)


def _run(op, x, w, b, silu, dtype):
    """y and the gradients of a fixed random loss of it: x, w and b (None without bias)."""
    leaves = [None if t is None else t.to(dtype).clone().requires_grad_() for t in (x, w, b)]
    y = op(*leaves, silu)
    wy = torch.randn(y.shape, generator=torch.Generator().manual_seed(2)).to(y)
    (y * wy).sum().backward()
    return [y] + [None if t is None else t.grad for t in leaves]


@pytest.mark.parametrize("B, T, C, K", [(2, 5, 3, 3), (1, 70, 70, 4), (2, 9, 66, 1), (1, 33, 5, 9), (3, 1, 8, 3)])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("silu", [False, True])
def test_matches_naive(B, T, C, K, bias, silu):
    x, w, b = _inputs(B, T, C, K, seed=T + C + K)
    b = b if bias else None
    got = _run(_fused, x, w, b, silu, torch.float32)
    ref = _run(_naive, x, w, b, silu, torch.float64)
    for name, a, r in zip(("y", "x", "weight", "bias"), got, ref):
        if r is None:
            assert a is None, name
            continue
        assert a.dtype == torch.float32 and a.shape == r.shape and torch.isfinite(a).all(), name
        assert rel_err(a, r) < 1e-5, name


def test_strided_rows_are_read_in_place():
    """A split of a wider projection (Mamba's xs, z = in_proj(x).split) goes in as a view."""
    xz, w, b = _inputs(2, 11, 20, 4, seed=3)
    x = xz[..., :10]
    assert not x.is_contiguous()
    y = fused_short_conv(x, w[:10], b[:10], "silu")
    assert rel_err(y, _naive(x, w[:10], b[:10], True)) < 1e-6


def test_bf16_inputs_give_bf16_outputs():
    x, w, b = (t.bfloat16() for t in _inputs(2, 13, 9, 3, seed=4))
    y, dx, dw, db = _run(_fused, x, w, b, True, torch.bfloat16)
    ref = _run(_naive, x, w, b, True, torch.float64)
    assert y.dtype == dx.dtype == dw.dtype == db.dtype == torch.bfloat16
    for name, a, r in zip(("y", "x", "weight", "bias"), (y, dx, dw, db), ref):
        assert rel_err(a, r) < 1e-2, name


def test_saves_only_its_inputs():
    """The backward recomputes the conv (and the SiLU's input): autograd keeps x, weight and bias alone."""
    leaves = [t.requires_grad_() for t in _inputs(2, 7, 5, 3, seed=1)]
    saved = saved_numels(lambda: fused_short_conv(*leaves, "silu"))
    assert sorted(saved) == sorted([leaves[0].numel(), leaves[1].numel(), leaves[2].numel()])


def _loss(op, silu):
    def loss(x, w, b, wy):
        y = op(x, w, b, silu)
        return (y * wy).sum() + y.square().sum()
    return loss


@pytest.mark.parametrize("shared", [(), ("x",), ("w", "b")], ids=["all_batched", "shared_x", "shared_w_b"])
@pytest.mark.parametrize("silu", [False, True])
def test_vmap_grad_matches_naive_per_run(shared, silu):
    """vmap(grad) over k = 3 runs (the stacked MQAR trainer) against the reference run by run; `shared` inputs are
    one tensor for all runs (in_dims None)."""
    runs = 3
    stacked = _inputs(2, 6, 5, 3, seed=9, runs=runs) + [torch.randn(runs, 2, 6, 5, device=DEVICE)]
    in_dims = tuple(None if n in shared else 0 for n in ("x", "w", "b")) + (0,)
    args = [s[0] if d is None else s for s, d in zip(stacked, in_dims)]
    got = vmap(grad(_loss(_fused, silu), argnums=(0, 1, 2)), in_dims=in_dims)(*args)
    for i in range(runs):
        run_args = [(a if d is None else a[i]).double() for a, d in zip(args, in_dims)]
        ref = grad(_loss(_naive, silu), argnums=(0, 1, 2))(*run_args)
        for name, a, r in zip(("x", "w", "b"), got, ref):
            assert rel_err(a[i], r) < 1e-5, (name, i)


def test_vmap_without_bias():
    x, w, _ = _inputs(2, 6, 5, 3, seed=7, runs=2)
    y = vmap(lambda x, w: fused_short_conv(x, w))(x, w)
    for i in range(2):
        assert rel_err(y[i], _naive(x[i], w[i], None, False)) < 1e-6


def test_short_conv_takes_the_fused_path_on_cuda_only(monkeypatch):
    """short_conv: fused on CUDA without states, unless BASED_CONV_FUSED=0; PyTorch otherwise (and equal)."""
    from based.ops import conv

    calls = []
    monkeypatch.setattr(conv, "fused_short_conv", lambda *a: calls.append(1) or fused_short_conv(*a))
    x, w, b = _inputs(1, 5, 4, 3, seed=0)
    y, _ = short_conv(x, w, b, activation="silu")
    short_conv(x, w, b, output_final_state=True)
    assert len(calls) == (1 if DEVICE == "cuda" else 0)
    assert rel_err(y, _naive(x, w, b, True)) < 1e-6
    monkeypatch.setenv("BASED_CONV_FUSED", "0")
    short_conv(x, w, b)
    assert len(calls) == (1 if DEVICE == "cuda" else 0)
    with pytest.raises(ValueError, match="activation must be None or 'silu'"):
        short_conv(x, w, b, activation="gelu")


def _state(B, C, K, seed, tap_major):
    g = torch.Generator().manual_seed(seed)
    if tap_major:  # as conv_state_zeros stores decode states: [B, K, C] in memory
        return torch.randn(B, K, C, generator=g).transpose(1, 2).to(DEVICE)
    return torch.randn(B, C, K, generator=g).to(DEVICE)


def _prefill_naive(x, w, b, state, silu, gate):
    """act(conv) * gate in fp64, continuing from state (zeros if None)."""
    B, T, C = x.shape
    st = torch.zeros(B, C, w.shape[1], dtype=torch.float64, device=x.device) if state is None else state.double()
    y = _shifted_sum(x.double(), w.double(), None if b is None else b.double(), st, torch.float64)
    y = F.silu(y) if silu else y
    return y if gate is None else y * gate.double()


@pytest.mark.parametrize("B, T, C, K", [(2, 5, 3, 3), (1, 70, 70, 4), (2, 1, 8, 4), (1, 2, 5, 9), (2, 9, 66, 1)])
@pytest.mark.parametrize("state", [None, "tap_major", "channel_major"])
@pytest.mark.parametrize("silu, gated, bias", [(True, True, True), (False, False, False), (True, False, True)])
def test_prefill_kernel_matches_naive(B, T, C, K, state, silu, gated, bias):
    """The prefill pass continues from a state of either layout (T shorter than the taps included), with the
    activation and a gate read in place from a split projection, as BaseConv calls it."""
    x, w, b = _inputs(B, T, C, K, seed=3)
    st = None if state is None else _state(B, C, K, seed=4, tap_major=state == "tap_major")
    proj = torch.randn(B, T, 2 * C, generator=torch.Generator().manual_seed(5)).to(DEVICE)
    u, gate = proj.split(C, dim=-1)  # strided views: rows 2C apart
    x = u if gated else x
    gate = gate if gated else None
    y = fused_short_conv_inference(x, w, b if bias else None, st, "silu" if silu else None, gate)
    assert y.shape == (B, T, C) and y.is_contiguous()
    assert rel_err(y, _prefill_naive(x, w, b if bias else None, st, silu, gate)) < 1e-6


def test_prefill_kernel_in_bf16_rounds_once():
    x, w, b = _inputs(2, 40, 24, 3, seed=6)
    st = _state(2, 24, 3, seed=7, tap_major=True)
    gate = torch.randn_like(x)
    xb, gb, sb = x.bfloat16(), gate.bfloat16(), st.bfloat16()
    y = fused_short_conv_inference(xb, w, b, sb, "silu", gb)
    assert y.dtype == torch.bfloat16
    want = _prefill_naive(xb.float(), w, b, sb.float(), True, gb.float())
    assert rel_err(y, want) < 4e-3  # one bf16 rounding of an fp32 result


@pytest.mark.parametrize("T, K, with_state", [(7, 3, True), (2, 4, True), (2, 4, False), (1, 1, True), (4, 4, False)])
def test_final_state_is_the_last_k_inputs(T, K, with_state):
    """_final_state against the concatenation it replaces: [state, x^T][..., -K:]."""
    x, _, _ = _inputs(2, T, 5, K, seed=8)
    st = _state(2, 5, K, seed=9, tap_major=True) if with_state else None
    full = torch.cat([torch.zeros(2, 5, K, device=DEVICE) if st is None else st, x.transpose(1, 2)], dim=-1)
    assert torch.equal(_final_state(x, st, K), full[..., -K:])


def test_short_conv_gate_and_state_on_every_path(monkeypatch):
    """short_conv(..., initial_state, output_final_state, activation, gate): the PyTorch form and (on CUDA)
    the prefill pass under no_grad give the same y and final state; with a gradient to take and no state,
    the training kernel (CUDA) or PyTorch, the gate applied after it."""
    from based.ops import conv

    calls = []
    monkeypatch.setattr(conv, "fused_short_conv_inference",
                        lambda *a: calls.append("prefill") or fused_short_conv_inference(*a))
    x, w, b = _inputs(2, 11, 6, 4, seed=10)
    st, gate = _state(2, 6, 4, seed=11, tap_major=True), torch.randn_like(x)
    want = _prefill_naive(x, w, b, st, True, gate)
    with torch.no_grad():
        y, final = short_conv(x, w, b, st, True, "silu", gate)
    assert rel_err(y, want) < 1e-6 and torch.equal(final, _final_state(x, st, 4))
    monkeypatch.setenv("BASED_CONV_FUSED", "0")
    y0, final0 = short_conv(x, w, b, st, True, "silu", gate)
    assert rel_err(y0, want) < 1e-6 and torch.equal(final0, final)
    assert calls == (["prefill"] if DEVICE == "cuda" else [])
    monkeypatch.delenv("BASED_CONV_FUSED")
    xg = x.clone().requires_grad_()
    y1, _ = short_conv(xg, w, b, activation="silu", gate=gate)  # a gradient to take: not the prefill pass
    assert calls == (["prefill"] if DEVICE == "cuda" else [])
    assert rel_err(y1.detach(), _prefill_naive(x, w, b, None, True, gate)) < 1e-6
    with pytest.raises(ValueError, match="gate must have x's shape"):
        short_conv(x, w, b, gate=gate[:, 1:])
    xs, ws = torch.stack([x, 2 * x]), torch.stack([w, -w])
    with torch.no_grad():  # under vmap: the training kernel's vmap rule (CUDA) or PyTorch, not the prefill pass
        ys = vmap(lambda x, w: short_conv(x, w, b, activation="silu", gate=gate)[0])(xs, ws)
    assert calls == (["prefill"] if DEVICE == "cuda" else [])
    for i in range(2):
        assert rel_err(ys[i], _prefill_naive(xs[i], ws[i], b, None, True, gate)) < 1e-6


def compile_for_sm90() -> dict:
    """{kernel: "ok" or the compiler's error}: the three kernels at Mamba's K = 4 and H3's shift conv K = 64."""
    from based.ops.conv import fused

    results = {}
    for K in (4, 64):
        blocks = dict(K=K, BT=fused.BLOCK_T, BC=fused.BLOCK_C)
        for fn, flags in ((fused._fwd_kernel, dict(HAS_BIAS=True, SILU=True)),
                          (fused._silu_grad_kernel, dict(HAS_BIAS=False)), (fused._bwd_kernel, {})):
            consts = {**blocks, **flags}
            sig = signature(fn, consts, ints=("T", "C", "RB", "s_xb", "s_xt"))
            results[f"{fn.__name__}_K{K}"] = ptx_status(fn, sig, consts, {"num_warps": fused.NUM_WARPS})
        consts = {**blocks, **dict(HAS_STATE=True, HAS_BIAS=True, SILU=True, HAS_GATE=True)}
        sig = signature(fused._infer_kernel, consts, ints=("T", "C", "s_xb", "s_xt", "s_sb", "s_sc", "s_sk", "s_gb",
                                                            "s_gt"), pointers={"x": "*bf16", "gate": "*bf16", "y": "*bf16", "st": "*bf16"})
        results[f"_infer_kernel_K{K}"] = ptx_status(fused._infer_kernel, sig, consts, {"num_warps": fused.NUM_WARPS})
    return results


def test_kernels_compile_for_sm90():
    """The interpreter misses what only the compiler sees: compile the kernels for an H100 in a child process,
    where TRITON_INTERPRET is unset."""
    assert_compiles(__file__)


if __name__ == "__main__":
    print(json.dumps(compile_for_sm90()))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("C, K, silu", [(128, 3, False), (512, 4, True), (64, 32, False)])
def test_gpu_matches_torch_at_sweep_size(C, K, silu, monkeypatch):
    """B 256, T 256: output and every gradient against the PyTorch form (cuDNN's depthwise conv), both fp32,
    and vmap(grad) over 4 stacked runs."""
    x, w, b = _inputs(256, 256, C, K, seed=0)

    def torch_form(x, w, b, silu):
        monkeypatch.setenv("BASED_CONV_FUSED", "0")
        try:
            return short_conv(x, w, b, activation="silu" if silu else None)[0]
        finally:
            monkeypatch.delenv("BASED_CONV_FUSED")

    got = _run(_fused, x, w, b, silu, torch.float32)
    ref = _run(torch_form, x, w, b, silu, torch.float32)
    for name, a, r in zip(("y", "x", "weight", "bias"), got, ref):
        assert torch.isfinite(a).all() and rel_err(a, r) < 1e-5, name
    xs, ws, bs = _inputs(256, 256, C, K, seed=1, runs=4)
    wy = torch.randn_like(xs)
    got = vmap(grad(_loss(_fused, silu), argnums=(0, 1, 2)))(xs, ws, bs, wy)
    for i in range(4):
        ref = grad(_loss(torch_form, silu), argnums=(0, 1, 2))(xs[i], ws[i], bs[i], wy[i])
        for name, a, r in zip(("x", "w", "b"), got, ref):
            assert rel_err(a[i], r) < 1e-5, (name, i)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_prefill_matches_torch_at_1p3b_size(monkeypatch):
    """BaseConv's prefill at the 1.3b preset's width (d_inner 3584, K 3), bf16, 8 prompts of 512 continuing from
    a tap-major state: the Triton pass against the PyTorch form (cuDNN conv, SiLU, gate), and the final state."""
    g = torch.Generator(device="cuda").manual_seed(0)
    proj = torch.randn(8, 512, 2 * 3584, device="cuda", dtype=torch.bfloat16, generator=g)
    u, gate = proj.split(3584, dim=-1)
    w = torch.randn(3584, 3, device="cuda", generator=g).bfloat16() / 3**0.5
    b = torch.randn(3584, device="cuda", generator=g).bfloat16()
    st = torch.randn(8, 3, 3584, device="cuda", generator=g).bfloat16().transpose(1, 2)
    with torch.no_grad():
        y, final = short_conv(u, w, b, st, True, "silu", gate)
        monkeypatch.setenv("BASED_CONV_FUSED", "0")
        y0, final0 = short_conv(u, w, b, st, True, "silu", gate)
    assert rel_err(y, y0) < 1e-2 and torch.equal(final, final0)
    assert rel_err(y, _prefill_naive(u.float(), w.float(), b.float(), st.float(), True, gate.float())) < 4e-3
