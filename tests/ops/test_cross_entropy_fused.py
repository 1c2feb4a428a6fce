"""The fused Triton linear cross-entropy (based/ops/cross_entropy/fused.py) against F.cross_entropy of the logits in
fp64: loss and the gradients of hidden and weight, with ignored rows, vocabularies and widths that leave partial
tiles, and under vmap(grad) over stacked runs with shared targets (the MQAR trainer) and per-run ones.

Without CUDA the kernels run under TRITON_INTERPRET=1 on tiny shapes (tests/conftest.py); a child process compiles
them for sm_90. `pytest -m gpu tests/ops/test_cross_entropy_fused.py` compares at the MQAR sweep's sizes.
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

from based.ops.cross_entropy import linear_cross_entropy  # noqa: E402
from based.ops.cross_entropy.fused import fused_linear_cross_entropy  # noqa: E402
from tests.conftest import rel_err  # noqa: E402
from tests.ops._triton_check import compile_in_child, ptx_status, signature  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _inputs(N, V, D, seed, runs=0, ignored=0.25, device=DEVICE):
    g = torch.Generator().manual_seed(seed)
    lead = (runs,) if runs else ()
    h = torch.randn(*lead, N, D, generator=g)
    w = torch.randn(*lead, V, D, generator=g) / D**0.5 * 3  # logits of a few units: a peaked softmax
    t = torch.randint(0, V, (N,), generator=g)
    t[torch.rand(N, generator=g) < ignored] = -100
    return [x.to(device) for x in (h, w, t)]


def _ref(h, w, t):
    return F.cross_entropy(h.double() @ w.double().T, t, ignore_index=-100)


def _run(op, h, w, t, dtype):
    leaves = [h.to(dtype).clone().requires_grad_(), w.to(dtype).clone().requires_grad_()]
    loss = op(*leaves, t)
    loss.backward()
    return [loss] + [x.grad for x in leaves]


@pytest.mark.parametrize("N, V, D", [(5, 7, 3), (70, 130, 48), (33, 64, 64), (9, 200, 130), (1, 1, 16)])
def test_matches_torch(N, V, D):
    h, w, t = _inputs(N, V, D, seed=N + V + D, ignored=0.25 if N > 1 else 0.0)
    got, want = _run(fused_linear_cross_entropy, h, w, t, torch.float32), _run(_ref, h, w, t, torch.float64)
    for name, a, b in zip(("loss", "hidden", "weight"), got, want):
        assert a.dtype == torch.float32 and a.shape == b.shape and torch.isfinite(a).all(), name
        assert rel_err(a, b) < 1e-5, name
    assert (got[1][t == -100] == 0).all()  # an ignored row gets no gradient


def test_large_logits_do_not_overflow():
    h, w, t = _inputs(6, 50, 8, seed=3, ignored=0.0)
    got = _run(fused_linear_cross_entropy, h * 40, w, t, torch.float32)  # logits of several hundred
    want = _run(_ref, h * 40, w, t, torch.float64)
    for name, a, b in zip(("loss", "hidden", "weight"), got, want):
        assert torch.isfinite(a).all() and rel_err(a, b) < 1e-5, name


def test_every_row_ignored_gives_nan_as_torch():
    h, w, t = _inputs(4, 9, 8, seed=1)
    t[:] = -100
    assert torch.isnan(fused_linear_cross_entropy(h, w, t)) and torch.isnan(F.cross_entropy(h @ w.T, t))


def test_a_target_out_of_range_makes_the_loss_nan():
    """F.cross_entropy raises; the kernel cannot stop without a host sync, so the loss says it."""
    h, w, t = _inputs(6, 9, 8, seed=5, ignored=0.0)
    for bad in (9, -3):
        t2 = t.clone()
        t2[2] = bad
        assert torch.isnan(fused_linear_cross_entropy(h, w, t2))
    assert torch.isfinite(fused_linear_cross_entropy(h, w, t))


def test_saves_inputs_and_one_number_per_row():
    """Autograd keeps hidden, weight, targets and each row's log-sum-exp: no [N, V] tensor."""
    h, w, t = _inputs(12, 40, 8, seed=2)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda x: saved.append(x.numel()) or x, lambda x: x):
        fused_linear_cross_entropy(h.requires_grad_(), w.requires_grad_(), t)
    assert max(saved) == w.numel() and 12 * 40 not in saved


@pytest.mark.parametrize("per_run_targets", [False, True], ids=["shared_targets", "per_run_targets"])
def test_vmap_grad_matches_torch_per_run(per_run_targets):
    """vmap(grad) over k = 3 runs (the stacked MQAR trainer: hidden and weight per run, targets shared)."""
    runs = 3
    h, w, t = _inputs(10, 37, 12, seed=9, runs=runs)
    targets = torch.stack([t.roll(i) for i in range(runs)]) if per_run_targets else t
    in_dims = (0, 0, 0 if per_run_targets else None)
    got = vmap(grad(fused_linear_cross_entropy, argnums=(0, 1)), in_dims=in_dims)(h, w, targets)
    for i in range(runs):
        ti = targets[i] if per_run_targets else t
        want = grad(_ref, argnums=(0, 1))(h[i].double(), w[i].double(), ti)
        for name, a, b in zip(("hidden", "weight"), got, want):
            assert rel_err(a[i], b) < 1e-5, (name, i)


def test_dispatch(monkeypatch):
    from based.ops import cross_entropy

    calls = []
    monkeypatch.setattr(cross_entropy, "fused_linear_cross_entropy",
                        lambda *a: calls.append(1) or fused_linear_cross_entropy(*a))
    h, w, t = _inputs(12, 20, 8, seed=0)
    loss = linear_cross_entropy(h.view(3, 4, 8), w, t.view(3, 4))
    assert len(calls) == (1 if DEVICE == "cuda" else 0)
    assert rel_err(loss, _ref(h, w, t)) < 1e-6
    monkeypatch.setenv("BASED_CE_FUSED", "0")
    linear_cross_entropy(h, w, t)
    assert len(calls) == (1 if DEVICE == "cuda" else 0)
    with pytest.raises(ValueError, match="targets of its leading shape"):
        linear_cross_entropy(h, w, t[:5])


def compile_for_sm90() -> dict:
    """{kernel: "ok" or the compiler's error}: the three kernels at the sweep's widths 64 and 256."""
    from based.ops.cross_entropy import fused

    results = {}
    for D in (64, 256):
        BM, BV, BD, warps = fused._blocks(D)
        for fn in (fused._fwd_kernel, fused._dh_kernel, fused._dw_kernel):
            consts = dict(IGNORE=-100, BM=BM, BV=BV, BK=fused.BLOCK_K, PREC="tf32")
            if "BD" in fn.arg_names:
                consts["BD"] = BD
            sig = signature(fn, consts, ints=("RN", "V", "D", "s_tr"), pointers={"t": "*i64"})
            results[f"{fn.__name__}_D{D}"] = ptx_status(fn, sig, consts, {"num_warps": warps})
    return results


def test_kernels_compile_for_sm90():
    results = compile_in_child(__file__)
    assert results and all(v == "ok" for v in results.values()), results


if __name__ == "__main__":
    print(json.dumps(compile_for_sm90()))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("D", [64, 128, 256])
def test_gpu_vmap_matches_torch_at_sweep_size(D, monkeypatch):
    """4 stacked runs, 256 examples x 64 queries, vocabulary 8192, TF32 both ways: losses and gradients."""
    torch.set_float32_matmul_precision("high")
    h, w, t = _inputs(256 * 64, 8192, D, seed=0, runs=4)

    def torch_form(h, w, t):
        return F.cross_entropy(h @ w.T, t, ignore_index=-100)

    got = vmap(grad(fused_linear_cross_entropy, argnums=(0, 1), has_aux=False), in_dims=(0, 0, None))(h, w, t)
    for i in range(4):
        want = grad(torch_form, argnums=(0, 1))(h[i], w[i], t)
        for name, a, b in zip(("hidden", "weight"), got, want):
            assert rel_err(a[i], b) < 3e-3, (name, i)  # TF32 on both sides, different summation orders
