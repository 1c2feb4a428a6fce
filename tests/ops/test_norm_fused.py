"""The fused Triton LayerNorm and RMSNorm (based/ops/norm/fused.py) against F.layer_norm / F.rms_norm in fp64: output
and every gradient (x, weight, bias), widths that leave partial blocks, and under vmap(grad) over stacked runs with
per-run and shared inputs; the same for the residual form x + norm(x) and the gated RMSNorm rmsnorm(x silu(z)) w
(Mamba-2's), and the MQAR models with the fused path forced through the interpreter against PyTorch's.

Without CUDA the kernels run under TRITON_INTERPRET=1 on tiny shapes (tests/conftest.py); a child process compiles
them for sm_90. `pytest -m gpu tests/ops/test_norm_fused.py` compares with PyTorch at the MQAR sweep's sizes.
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

from based.ops.norm import gated_rms_norm, layer_norm, rms_norm  # noqa: E402
from based.ops.norm.fused import fused_gated_rms_norm, fused_layer_norm, fused_rms_norm  # noqa: E402
from tests.conftest import rel_err, saved_numels  # noqa: E402
from tests.ops._triton_check import assert_compiles, ptx_status, signature  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
EPS = 1e-5


def _inputs(shape, seed, runs=0, device=DEVICE):
    g = torch.Generator().manual_seed(seed)
    lead = (runs,) if runs else ()
    D = shape[-1]
    x = torch.randn(*lead, *shape, generator=g) * 3 + 1  # a mean and scale far from 0 and 1
    w, b = 1 + torch.randn(*lead, D, generator=g), torch.randn(*lead, D, generator=g)
    return [t.to(device) for t in (x, w, b)]


def _ops(rms: bool, residual: bool = False):
    """(fused, reference) as functions of (x, w, b); residual: x + the norm."""
    def res(x, y):
        return x + y if residual else y

    if rms:
        return (lambda x, w, b: fused_rms_norm(x, w, EPS, residual),
                lambda x, w, b: res(x, F.rms_norm(x, w.shape, w, EPS)))
    return (lambda x, w, b: fused_layer_norm(x, w, b, EPS, residual),
            lambda x, w, b: res(x, F.layer_norm(x, w.shape, w, b, EPS)))


def _gated_ref(x, z, w):
    """Mamba-2's gated RMSNorm (one group) in x's precision."""
    u = x * F.silu(z)
    return F.rms_norm(u, w.shape, eps=EPS) * w


def _gated_inputs(shape, seed, runs=0):
    """(x, z, w): z spread over silu's bend and both tails."""
    x, w, _ = _inputs(shape, seed, runs)
    z = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed + 1)).to(x) * 2.5
    return [x, z, w]


def _run(op, inputs, dtype):
    leaves = [t.to(dtype).clone().requires_grad_() for t in inputs]
    y = op(*leaves)
    wy = torch.randn(y.shape, generator=torch.Generator().manual_seed(2)).to(y)
    (y * wy).sum().backward()
    return [y] + [t.grad for t in leaves]


RESIDUAL = pytest.mark.parametrize("residual", [False, True], ids=["", "residual"])


@pytest.mark.parametrize("shape", [(2, 5, 3), (70, 64), (3, 7, 130), (1, 1, 5)])
@pytest.mark.parametrize("rms", [False, True], ids=["layer_norm", "rms_norm"])
@RESIDUAL
def test_matches_torch(shape, rms, residual):
    fused, ref = _ops(rms, residual)
    inputs = _inputs(shape, seed=sum(shape))
    got, want = _run(fused, inputs, torch.float32), _run(ref, inputs, torch.float64)
    names = ("y", "x", "weight") + (() if rms else ("bias",))
    for name, a, b in zip(names, got, want):
        assert a.dtype == torch.float32 and a.shape == b.shape and torch.isfinite(a).all(), name
        assert rel_err(a, b) < 1e-5, name
    if rms:
        assert got[3] is None  # no bias: RMSNorm ignores it


def test_bf16_inputs_give_bf16_outputs():
    inputs = [t.bfloat16() for t in _inputs((3, 9, 40), seed=4)]
    fused, ref = _ops(False)
    y, *grads = _run(fused, inputs, torch.bfloat16)
    want = _run(ref, [t.double() for t in inputs], torch.float64)
    assert y.dtype == torch.bfloat16 and all(g.dtype == torch.bfloat16 for g in grads)
    for name, a, b in zip(("y", "x", "w", "b"), [y] + grads, want):
        assert rel_err(a, b) < 1e-2, name


def test_saves_only_its_inputs():
    leaves = [t.requires_grad_() for t in _inputs((4, 6, 8), seed=1)]
    saved = saved_numels(lambda: fused_layer_norm(*leaves, EPS))
    assert sorted(saved) == sorted(t.numel() for t in leaves)


@pytest.mark.parametrize("shared", [(), ("x",), ("w", "b")], ids=["all_batched", "shared_x", "shared_w_b"])
@pytest.mark.parametrize("rms", [False, True], ids=["layer_norm", "rms_norm"])
@RESIDUAL
def test_vmap_grad_matches_torch_per_run(shared, rms, residual):
    """vmap(grad) over k = 3 runs (the stacked MQAR trainer) against PyTorch run by run."""
    fused, ref = _ops(rms, residual)
    stacked = _inputs((2, 5, 12), seed=9, runs=3) + [torch.randn(3, 2, 5, 12, device=DEVICE)]
    _check_vmap_grad_per_run(fused, ref, stacked, ("x", "w", "b"), shared, (0, 1) if rms else (0, 1, 2))


def _check_vmap_grad_per_run(fused, ref, stacked, names, shared, argnums):
    """vmap(grad) of a loss of fused over the runs of `stacked` (the inputs `names`, then the loss's output weights
    last; those named in `shared` given once, in_dims None) against grad of ref run by run in fp64."""
    runs = stacked[-1].shape[0]
    in_dims = tuple(None if n in shared else 0 for n in names) + (0,)
    args = [s[0] if d is None else s for s, d in zip(stacked, in_dims)]

    def loss(op):
        return lambda *a: (op(*a[:-1]) * a[-1]).sum() + op(*a[:-1]).square().sum()

    got = vmap(grad(loss(fused), argnums=argnums), in_dims=in_dims)(*args)
    for i in range(runs):
        run_args = [(a if d is None else a[i]).double() for a, d in zip(args, in_dims)]
        want = grad(loss(ref), argnums=argnums)(*run_args)
        for name, a, b in zip(names, got, want):
            assert rel_err(a[i], b) < 1e-5, (name, i)


@pytest.mark.parametrize("rms", [False, True], ids=["layer_norm", "rms_norm"])
@RESIDUAL
def test_vmap_over_single_rows(rms, residual):
    """Each run's x one row [D] (no dim before it to fold the runs into): the runs become the rows."""
    fused, ref = _ops(rms, residual)
    x, w, b = _inputs((12,), seed=11, runs=3)
    argnums = (0, 1) if rms else (0, 1, 2)
    got = vmap(grad(lambda x, w, b: fused(x, w, b).sin().sum(), argnums=argnums))(x, w, b)
    for i in range(3):
        want = grad(lambda x, w, b: ref(x, w, b).sin().sum(), argnums=argnums)(x[i].double(), w[i].double(),
                                                                             b[i].double())
        for name, a, r in zip(("x", "w", "b"), got, want):
            assert a.shape == (3, 12) and rel_err(a[i], r) < 1e-5, (name, i)


def test_dispatch_takes_the_fused_path_on_cuda_only(monkeypatch):
    from based.ops import norm

    calls = []
    for name, fn in (("fused_layer_norm", fused_layer_norm), ("fused_rms_norm", fused_rms_norm),
                     ("fused_gated_rms_norm", fused_gated_rms_norm)):
        monkeypatch.setattr(norm, name, lambda *a, fn=fn: calls.append(1) or fn(*a))
    x, w, b = _inputs((2, 3, 8), seed=0)
    z = torch.randn_like(x)
    y = layer_norm(x, w, b)
    r = rms_norm(x, w)
    y_res, r_res = layer_norm(x, w, b, residual=True), rms_norm(x, w, residual=True)
    gated = gated_rms_norm(x, z, w)
    assert len(calls) == (5 if DEVICE == "cuda" else 0)
    gated_rms_norm(x, z, w, group_size=4)  # two groups per row: PyTorch's form everywhere
    assert len(calls) == (5 if DEVICE == "cuda" else 0)
    xd, wd, bd = x.double(), w.double(), b.double()
    assert rel_err(y, F.layer_norm(xd, (8,), wd, bd, EPS)) < 1e-6
    assert rel_err(r, F.rms_norm(xd, (8,), wd, EPS)) < 1e-6
    assert rel_err(y_res, xd + F.layer_norm(xd, (8,), wd, bd, EPS)) < 1e-6
    assert rel_err(r_res, xd + F.rms_norm(xd, (8,), wd, EPS)) < 1e-6
    assert rel_err(gated, _gated_ref(xd, z.double(), wd)) < 1e-6
    monkeypatch.setenv("BASED_NORM_FUSED", "0")
    layer_norm(x, w, b)
    gated_rms_norm(x, z, w)
    assert len(calls) == (5 if DEVICE == "cuda" else 0)


def test_pytorch_forms_are_the_earlier_ones():
    """Off CUDA (and with BASED_NORM_FUSED=0) the residual and gated forms are the PyTorch expressions the
    models used before, bit for bit."""
    x, w, b = _inputs((2, 3, 8), seed=0)
    z = torch.randn_like(x)
    assert torch.equal(layer_norm(x, w, b, residual=True), x + F.layer_norm(x, (8,), w, b, EPS))
    assert torch.equal(rms_norm(x, w, residual=True), x + F.rms_norm(x, (8,), w, EPS))
    for group in (8, 4):
        xf = (x * F.silu(z)).unflatten(-1, (-1, group))
        want = (F.rms_norm(xf, (group,), eps=EPS).flatten(-2) * w)
        assert torch.equal(gated_rms_norm(x, z, w, EPS, group), want)
    xb, zb = x.bfloat16(), z.bfloat16()
    assert gated_rms_norm(xb, z, w).dtype == torch.float32 and gated_rms_norm(x, zb, w).dtype == torch.bfloat16


# The gated RMSNorm: rmsnorm(x * silu(z)) * w.

def _run_gated(inputs, dtype, op=fused_gated_rms_norm, dtypes=None):
    dtypes = dtypes or (dtype,) * 3
    leaves = [t.to(d).clone().requires_grad_() for t, d in zip(inputs, dtypes)]
    y = op(*leaves) if op is _gated_ref else op(*leaves, EPS)
    wy = torch.randn(y.shape, generator=torch.Generator().manual_seed(2)).to(y)
    (y * wy).sum().backward()
    return [y] + [t.grad for t in leaves]


@pytest.mark.parametrize("shape", [(2, 5, 3), (70, 64), (3, 7, 130), (1, 1, 5)])
def test_gated_matches_torch(shape):
    inputs = _gated_inputs(shape, seed=sum(shape))
    got, want = _run_gated(inputs, torch.float32), _run_gated(inputs, torch.float64, _gated_ref)
    for name, a, b in zip(("y", "x", "z", "weight"), got, want):
        assert a.dtype == torch.float32 and a.shape == b.shape and torch.isfinite(a).all(), name
        assert rel_err(a, b) < 1e-5, name


def test_gated_reads_a_strided_gate():
    """z a slice of a wider projection (Mamba-2's in_proj output): read in place, same results as a copy."""
    x, z, w = _gated_inputs((3, 7, 20), seed=5)
    wide = torch.cat([torch.randn(3, 7, 4), z, torch.randn(3, 7, 9)], -1).requires_grad_()
    z_view = wide[..., 4:24]
    assert not z_view.is_contiguous()
    xs, ws = x.clone().requires_grad_(), w.clone().requires_grad_()
    y = fused_gated_rms_norm(xs, z_view, ws, EPS)
    wy = torch.randn(y.shape, generator=torch.Generator().manual_seed(2))
    (y * wy).sum().backward()
    want = _run_gated([x, z, w], torch.float64, _gated_ref)
    for name, a, b in zip(("y", "x", "z", "weight"), [y, xs.grad, wide.grad[..., 4:24], ws.grad], want):
        assert rel_err(a, b) < 1e-5, name
    assert not wide.grad[..., :4].any() and not wide.grad[..., 24:].any()


def test_gated_dtypes():
    """y and dz in z's dtype, dx in x's (GatedRMSNorm's rule: the result in z's dtype); fp32 math."""
    inputs = _gated_inputs((3, 9, 40), seed=4)
    want = _run_gated(inputs, torch.float64, _gated_ref)
    for dtypes in ((torch.bfloat16,) * 3, (torch.float32, torch.bfloat16, torch.float32)):
        y, dx, dz, dw = _run_gated(inputs, None, dtypes=dtypes)
        assert (y.dtype, dx.dtype, dz.dtype, dw.dtype) == (dtypes[1], dtypes[0], dtypes[1], dtypes[2])
        for name, a, b in zip(("y", "x", "z", "w"), (y, dx, dz, dw), want):
            assert rel_err(a, b) < 1e-2, (name, dtypes)


def test_gated_saves_only_its_inputs():
    leaves = [t.requires_grad_() for t in _gated_inputs((4, 6, 8), seed=1)]
    saved = saved_numels(lambda: fused_gated_rms_norm(*leaves, EPS))
    assert sorted(saved) == sorted(t.numel() for t in leaves)


@pytest.mark.parametrize("shared", [(), ("x",), ("z",), ("w",), ("x", "z")],
                         ids=["all_batched", "shared_x", "shared_z", "shared_w", "shared_x_z"])
def test_gated_vmap_grad_matches_torch_per_run(shared):
    """vmap(grad) over k = 3 runs, per-run weights (Mamba-2's norm in the stacked MQAR trainer)."""
    stacked = _gated_inputs((2, 5, 12), seed=9, runs=3) + [torch.randn(3, 2, 5, 12, device=DEVICE)]
    _check_vmap_grad_per_run(lambda x, z, w: fused_gated_rms_norm(x, z, w, EPS), _gated_ref, stacked,
                             ("x", "z", "w"), shared, (0, 1, 2))


def test_gated_vmap_over_single_rows():
    x, z, w = _gated_inputs((12,), seed=11, runs=3)
    got = vmap(grad(lambda x, z, w: fused_gated_rms_norm(x, z, w, EPS).sin().sum(), argnums=(0, 1, 2)))(x, z, w)
    for i in range(3):
        want = grad(lambda x, z, w: _gated_ref(x, z, w).sin().sum(), argnums=(0, 1, 2))(
            x[i].double(), z[i].double(), w[i].double())
        for name, a, r in zip(("x", "z", "w"), got, want):
            assert a.shape == (3, 12) and rel_err(a[i], r) < 1e-5, (name, i)


def test_gated_needs_equal_shapes():
    x, z, w = _gated_inputs((2, 6), seed=0)
    with pytest.raises(ValueError, match="same shape"):
        fused_gated_rms_norm(x, z[:1], w, EPS)


# The MQAR models with the fused norms forced through the interpreter.

def _stacked_grads(model, params, ids, targets):
    """vmap(grad) of the models' cross-entropy over the runs' stacked parameters, and the losses."""
    from torch.func import functional_call, grad_and_value

    def loss(p):
        logits = functional_call(model, p, (ids,))
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten())

    return vmap(grad_and_value(loss))(params)


@pytest.mark.parametrize("mixer, kwargs", [
    ("attention", {}),
    ("mamba2", {"ssm_state_size": 4, "mamba2_headdim": 8}),
])
def test_mqar_models_with_fused_norms_equal_pytorch(mixer, kwargs, monkeypatch):
    """Figure 2's attention model (LayerNorms, x + norm2(x)) and Mamba-2 (RMSNorms, its gated RMSNorm): the
    stacked runs' losses and gradients with every norm through the fused kernels equal PyTorch's."""
    from based.ops import norm
    from based.mqar.model import MQARModel, mqar_config

    torch.manual_seed(0)
    model = MQARModel(mqar_config(mixer, 16, 32, 16, **kwargs))
    runs = 2
    params = {n: torch.stack([p.detach() + 0.1 * torch.randn_like(p) * (i > 0) for i in range(runs)])
              for n, p in model.named_parameters()}
    with torch.no_grad():  # weights and biases of every norm away from 1 and 0, different per run
        for n in params:
            if "norm" in n or "ln_f" in n:
                params[n] += 0.3 * torch.randn_like(params[n])
    ids, targets = torch.randint(0, 32, (2, 2, 8)).unbind()
    want_grads, want_losses = _stacked_grads(model, params, ids, targets)

    calls = []
    kernels = {norm.fused_layer_norm, norm.fused_rms_norm, norm.fused_gated_rms_norm}
    monkeypatch.setattr(norm, "_fused", lambda x, kernel: calls.append(kernel) or kernel in kernels)
    got_grads, got_losses = _stacked_grads(model, params, ids, targets)
    want_kernels = ({norm.fused_layer_norm} if mixer == "attention" else
                    {norm.fused_layer_norm, norm.fused_rms_norm, norm.fused_gated_rms_norm})
    assert set(calls) == want_kernels
    torch.testing.assert_close(got_losses, want_losses, atol=1e-6, rtol=1e-5)
    for n, g in want_grads.items():
        assert rel_err(got_grads[n], g) < 1e-5, n


def compile_for_sm90() -> dict:
    """{kernel: "ok" or the compiler's error}: both kernels, LayerNorm and RMSNorm, plain and residual, and the
    gated RMSNorm, at D = 128 (the gated one also at the sweep's Mamba-2 width 256)."""
    from based.ops.norm import fused

    variants = [(rms, residual, False, 128) for rms in (False, True) for residual in (False, True)]
    variants += [(True, False, True, 128), (True, False, True, 256)]
    results = {}
    for rms, residual, gated, D in variants:
        for fn, flags in ((fused._fwd_kernel, dict(HAS_BIAS=not rms)), (fused._bwd_kernel, {})):
            consts = dict(BM=fused._rows_per_block(D), BD=D, RMS=rms, RESIDUAL=residual, GATED=gated, **flags)
            sig = signature(fn, consts, ints=("RN", "D", "stride_z"), floats=("eps",))
            name = "_".join([fn.__name__, "rms" if rms else "ln"] + ["residual"] * residual + ["gated"] * gated)
            results[f"{name}_{D}"] = ptx_status(fn, sig, consts, {"num_warps": fused.NUM_WARPS})
    return results


def test_kernels_compile_for_sm90():
    assert_compiles(__file__)


if __name__ == "__main__":
    print(json.dumps(compile_for_sm90()))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("D", [64, 128, 256])
@pytest.mark.parametrize("rms", [False, True], ids=["layer_norm", "rms_norm"])
@RESIDUAL
def test_gpu_vmap_matches_torch_at_sweep_size(D, rms, residual):
    """4 stacked runs of B 256, T 256: vmap(grad) against PyTorch run by run (both fp32)."""
    fused, ref = _ops(rms, residual)
    x, w, b = _inputs((256, 256, D), seed=0, runs=4)
    wy = torch.randn_like(x)
    argnums = (0, 1) if rms else (0, 1, 2)

    def loss(op):
        return lambda x, w, b, wy: (op(x, w, b) * wy).sum()

    got = vmap(grad(loss(fused), argnums=argnums))(x, w, b, wy)
    for i in range(4):
        want = grad(loss(ref), argnums=argnums)(x[i], w[i], b[i], wy[i])
        for name, a, r in zip(("x", "w", "b"), got, want):
            assert rel_err(a[i], r) < 1e-5, (name, i)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("D", [128, 256, 512])
def test_gpu_gated_vmap_matches_torch_at_sweep_size(D):
    """Mamba-2's norm at the sweep's d_inner (2 d_model): 4 stacked runs of B 256, T 256, z a slice of a wider
    projection as in Mamba2.forward; vmap(grad) against the PyTorch form run by run (both fp32)."""
    x, z, w = _gated_inputs((256, 256, D), seed=0, runs=4)
    zw = torch.cat([z, torch.randn_like(z)], -1)
    wy = torch.randn_like(x)

    def loss(op):
        return lambda x, zw, w, wy: (op(x, zw[..., :D], w, EPS) * wy).sum()

    got = vmap(grad(loss(fused_gated_rms_norm), argnums=(0, 1, 2)))(x, zw, w, wy)
    for i in range(4):
        want = grad(loss(lambda x, z, w, eps: _gated_ref(x, z, w)), argnums=(0, 1, 2))(x[i], zw[i], w[i], wy[i])
        for name, a, r in zip(("x", "z", "w"), got, want):
            assert rel_err(a[i], r) < 1e-5, (name, i)
