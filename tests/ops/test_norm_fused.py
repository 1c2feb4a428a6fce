"""The fused Triton LayerNorm and RMSNorm (based/ops/norm/fused.py) against F.layer_norm / F.rms_norm in fp64: output
and every gradient (x, weight, bias), widths that leave partial blocks, and under vmap(grad) over stacked runs with
per-run and shared inputs.

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

from based.ops.norm import layer_norm, rms_norm  # noqa: E402
from based.ops.norm.fused import fused_layer_norm, fused_rms_norm  # noqa: E402
from tests.conftest import rel_err  # noqa: E402
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


def _ops(rms: bool):
    """(fused, reference) as functions of (x, w, b)."""
    if rms:
        return (lambda x, w, b: fused_rms_norm(x, w, EPS),
                lambda x, w, b: F.rms_norm(x, w.shape, w, EPS))
    return (lambda x, w, b: fused_layer_norm(x, w, b, EPS),
            lambda x, w, b: F.layer_norm(x, w.shape, w, b, EPS))


def _run(op, inputs, dtype):
    leaves = [t.to(dtype).clone().requires_grad_() for t in inputs]
    y = op(*leaves)
    wy = torch.randn(y.shape, generator=torch.Generator().manual_seed(2)).to(y)
    (y * wy).sum().backward()
    return [y] + [t.grad for t in leaves]


@pytest.mark.parametrize("shape", [(2, 5, 3), (70, 64), (3, 7, 130), (1, 1, 5)])
@pytest.mark.parametrize("rms", [False, True], ids=["layer_norm", "rms_norm"])
def test_matches_torch(shape, rms):
    fused, ref = _ops(rms)
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
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        fused_layer_norm(*leaves, EPS)
    assert sorted(saved) == sorted(t.numel() for t in leaves)


@pytest.mark.parametrize("shared", [(), ("x",), ("w", "b")], ids=["all_batched", "shared_x", "shared_w_b"])
@pytest.mark.parametrize("rms", [False, True], ids=["layer_norm", "rms_norm"])
def test_vmap_grad_matches_torch_per_run(shared, rms):
    """vmap(grad) over k = 3 runs (the stacked MQAR trainer) against PyTorch run by run."""
    fused, ref = _ops(rms)
    runs = 3
    stacked = _inputs((2, 5, 12), seed=9, runs=runs) + [torch.randn(runs, 2, 5, 12, device=DEVICE)]
    in_dims = tuple(None if n in shared else 0 for n in ("x", "w", "b")) + (0,)
    args = [s[0] if d is None else s for s, d in zip(stacked, in_dims)]

    def loss(op):
        return lambda x, w, b, wy: (op(x, w, b) * wy).sum() + op(x, w, b).square().sum()

    argnums = (0, 1) if rms else (0, 1, 2)
    got = vmap(grad(loss(fused), argnums=argnums), in_dims=in_dims)(*args)
    for i in range(runs):
        run_args = [(a if d is None else a[i]).double() for a, d in zip(args, in_dims)]
        want = grad(loss(ref), argnums=argnums)(*run_args)
        for name, a, b in zip(("x", "w", "b"), got, want):
            assert rel_err(a[i], b) < 1e-5, (name, i)


@pytest.mark.parametrize("rms", [False, True], ids=["layer_norm", "rms_norm"])
def test_vmap_over_single_rows(rms):
    """Each run's x one row [D] (no dim before it to fold the runs into): the runs become the rows."""
    fused, ref = _ops(rms)
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
    monkeypatch.setattr(norm, "fused_layer_norm", lambda *a: calls.append(1) or fused_layer_norm(*a))
    monkeypatch.setattr(norm, "fused_rms_norm", lambda *a: calls.append(1) or fused_rms_norm(*a))
    x, w, b = _inputs((2, 3, 8), seed=0)
    y = layer_norm(x, w, b)
    r = rms_norm(x, w)
    assert len(calls) == (2 if DEVICE == "cuda" else 0)
    assert rel_err(y, F.layer_norm(x.double(), (8,), w.double(), b.double(), EPS)) < 1e-6
    assert rel_err(r, F.rms_norm(x.double(), (8,), w.double(), EPS)) < 1e-6
    monkeypatch.setenv("BASED_NORM_FUSED", "0")
    layer_norm(x, w, b)
    assert len(calls) == (2 if DEVICE == "cuda" else 0)


def compile_for_sm90() -> dict:
    """{kernel: "ok" or the compiler's error}: both kernels, LayerNorm and RMSNorm, at D = 128."""
    from based.ops.norm import fused

    results = {}
    for rms in (False, True):
        for fn, flags in ((fused._fwd_kernel, dict(HAS_BIAS=not rms)), (fused._bwd_kernel, {})):
            consts = dict(BM=fused._rows_per_block(128), BD=128, RMS=rms, **flags)
            sig = signature(fn, consts, ints=("RN", "D"), floats=("eps",))
            results[f"{fn.__name__}_{'rms' if rms else 'ln'}"] = ptx_status(fn, sig, consts,
                                                                         {"num_warps": fused.NUM_WARPS})
    return results


def test_kernels_compile_for_sm90():
    assert_compiles(__file__)


if __name__ == "__main__":
    print(json.dumps(compile_for_sm90()))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("D", [64, 128, 256])
@pytest.mark.parametrize("rms", [False, True], ids=["layer_norm", "rms_norm"])
def test_gpu_vmap_matches_torch_at_sweep_size(D, rms):
    """4 stacked runs of B 256, T 256: vmap(grad) against PyTorch run by run (both fp32)."""
    fused, ref = _ops(rms)
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
