"""The fused Triton RWKV-5 attention (based/ops/rwkv/triton.py) against the recurrence of naive.py in fp64: output,
every gradient (r, k, v, w_log, u), at strong and weak decays, and under vmap(grad) over stacked runs.

Without CUDA the kernels run under TRITON_INTERPRET=1 on tiny shapes (set before triton is imported); a child
process compiles them for sm_90. The `gpu` tests compare with the chunked form at the MQAR sweep's sizes:
pytest -m gpu tests/ops/test_rwkv_fused.py
"""
import json
import os

import torch

if not torch.cuda.is_available() and __name__ != "__main__":  # run as a script: the compile check's child
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

pytest.importorskip("triton")

from torch.func import grad, vmap  # noqa: E402

from based.ops.rwkv import rwkv5_attn  # noqa: E402
from based.ops.rwkv.chunk import chunk_rwkv5_attn  # noqa: E402
from based.ops.rwkv.naive import naive_rwkv5_attn  # noqa: E402
from based.ops.rwkv.triton import fused_rwkv5_attn  # noqa: E402
from tests.conftest import rel_err, saved_numels  # noqa: E402
from tests.ops._triton_check import assert_compiles, ptx_status  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
NAMES = ("r", "k", "v", "w_log", "u")
ARGNUMS = (0, 1, 2, 3, 4)


def _inputs(B, T, H, dk, dv, seed, w_log=None, runs=0, device=DEVICE):
    """r, k [B, T, H, dk], v [B, T, H, dv], w_log, u [H, dk] (with a leading [runs] dim when runs > 0).
    w_log: a constant (every channel's log decay), or None for RWKV-5-like decays from ~0.9975 down to ~e^{-7}."""
    g = torch.Generator().manual_seed(seed)
    lead = (runs,) if runs else ()
    r, k = torch.randn(*lead, B, T, H, dk, generator=g), torch.randn(*lead, B, T, H, dk, generator=g)
    v = torch.randn(*lead, B, T, H, dv, generator=g)
    if w_log is None:
        lam = -torch.exp(torch.empty(*lead, H, dk).uniform_(-6.0, 2.0, generator=g))
    else:
        lam = torch.full((*lead, H, dk), float(w_log))
    u = torch.randn(*lead, H, dk, generator=g)
    return [t.to(device) for t in (r, k, v, lam, u)]


def _naive(r, k, v, w_log, u):
    return naive_rwkv5_attn(r, k, v, w_log, u)[0]


def _chunk(r, k, v, w_log, u):
    return chunk_rwkv5_attn(r, k, v, w_log, u)[0]


def _run(op, inputs, dtype):
    """o and the gradients of a fixed random loss of it, in the inputs' order."""
    leaves = [t.to(dtype).clone().requires_grad_() for t in inputs]
    o = op(*leaves)
    wo = torch.randn(o.shape, generator=torch.Generator().manual_seed(2)).to(o)
    (o * wo).sum().backward()
    return [o] + [t.grad for t in leaves]


@pytest.mark.parametrize("T, dk, dv, w_log", [
    (5, 4, 4, None), (19, 16, 4, None), (40, 4, 16, None),  # RWKV-5-like decays from ~0.9975 to ~e^{-7}
    (19, 16, 4, -20.0), (40, 4, 16, -20.0),  # strong: w ~ 2e-9
    (5, 16, 16, -1e-4), (40, 4, 16, -1e-4),  # weak: w ~ 0.9999, the state sums the whole sequence
])
def test_matches_naive(T, dk, dv, w_log):
    inputs = _inputs(2, T, 2, dk, dv, seed=T + dk + dv, w_log=w_log)
    got = _run(fused_rwkv5_attn, inputs, torch.float32)
    ref = _run(_naive, inputs, torch.float64)
    for name, a, b in zip(("o",) + NAMES, got, ref):
        assert a.dtype == torch.float32 and torch.isfinite(a).all(), name
        assert rel_err(a, b) < 1e-4, name
    if w_log == -20.0:
        # The true dw_log is ~e^{-20} of the rest (only lags of 2+ steps see w): exact to fp32 here because the
        # kernel carries the state's tangent along w_log; GLA's t r dr - (t + 1) k dk would cancel O(1) terms.
        assert 0 < ref[4].abs().max() < 1e-6


def test_bf16_inputs_give_bf16_outputs():
    inputs = [t.bfloat16() for t in _inputs(2, 11, 2, 16, 16, seed=4)]
    o, *grads = _run(fused_rwkv5_attn, inputs, torch.bfloat16)
    ref = _run(_naive, [t.double() for t in inputs], torch.float64)
    assert o.dtype == torch.bfloat16 and all(g.dtype == torch.bfloat16 for g in grads)
    for name, a, b in zip(("o",) + NAMES, [o] + grads, ref):
        assert rel_err(a, b) < 1e-2, name


def test_saves_only_its_inputs():
    """The backward rebuilds the states: autograd keeps r, k, v, w_log, u and nothing else."""
    leaves = [t.requires_grad_() for t in _inputs(2, 19, 2, 16, 4, seed=1)]
    saved = saved_numels(lambda: fused_rwkv5_attn(*leaves))
    assert sorted(saved) == sorted(t.numel() for t in leaves)


def _loss(op):
    def loss(r, k, v, w_log, u, wo):
        o = op(r, k, v, w_log, u)
        return (o * wo).sum() + o.square().sum()
    return loss


@pytest.mark.parametrize("shared", [(), ("r", "k", "v"), ("k", "w_log")], ids=["all_batched", "shared_rkv",
                                                                             "shared_k_w"])
def test_vmap_grad_matches_naive_per_run(shared):
    """vmap(grad) over k = 3 runs (the stacked MQAR trainer) against the reference run by run; `shared` inputs are
    one tensor for all runs (in_dims None)."""
    runs = 3
    stacked = _inputs(2, 5, 2, 4, 4, seed=9, runs=runs) + [torch.randn(runs, 2, 5, 2, 4, device=DEVICE)]
    in_dims = tuple(None if n in shared else 0 for n in NAMES) + (0,)
    args = [s[0] if d is None else s for s, d in zip(stacked, in_dims)]
    got = vmap(grad(_loss(fused_rwkv5_attn), argnums=ARGNUMS), in_dims=in_dims)(*args)
    for i in range(runs):
        run_args = [(a if d is None else a[i]).double() for a, d in zip(args, in_dims)]
        ref = grad(_loss(_naive), argnums=ARGNUMS)(*run_args)
        for name, a, b in zip(NAMES, got, ref):
            assert rel_err(a[i], b) < 1e-4, (name, i)


def test_grad_of_vmapped_forward_sums_a_shared_decay():
    """grad outside vmap: a w_log, u shared by the runs gets the sum of the runs' gradients."""
    r, k, v, w_log, u = _inputs(2, 7, 2, 4, 4, seed=5, runs=3)
    wo = torch.randn(3, 2, 7, 2, 4, device=DEVICE)
    results = []
    for op, dtype in ((fused_rwkv5_attn, torch.float32), (_naive, torch.float64)):
        shared = [w_log[0].to(dtype).requires_grad_(), u[0].to(dtype).requires_grad_()]
        o = vmap(op, in_dims=(0, 0, 0, None, None))(r.to(dtype), k.to(dtype), v.to(dtype), *shared)
        (o * wo.to(dtype)).sum().backward()
        results.append([t.grad for t in shared])
    for a, b in zip(*results):
        assert a.shape == (2, 4) and rel_err(a, b) < 1e-4


def test_rwkv5_attn_takes_the_fused_path_on_cuda_only(monkeypatch):
    """rwkv5_attn: fused on CUDA without states, unless BASED_RWKV_FUSED=0; chunked otherwise."""
    from based.ops import rwkv

    calls = []
    monkeypatch.setattr(rwkv, "fused_rwkv5_attn", lambda *a: calls.append(1) or fused_rwkv5_attn(*a))
    inputs = _inputs(1, 5, 1, 4, 4, seed=0)
    rwkv5_attn(*inputs)
    rwkv5_attn(*inputs, output_final_state=True)
    assert len(calls) == (1 if DEVICE == "cuda" else 0)
    monkeypatch.setenv("BASED_RWKV_FUSED", "0")
    rwkv5_attn(*inputs)
    assert len(calls) == (1 if DEVICE == "cuda" else 0)


def compile_for_sm90() -> dict:
    """{kernel: "ok" or the compiler's error}: both kernels at the sweep's head size 64."""
    from based.ops.rwkv import triton as fused

    kernels = (
        (fused._fwd_kernel, dict(BK=64, BV=fused.BLOCK_V_FWD), fused.NUM_WARPS_FWD),
        (fused._bwd_kernel, dict(BK=64, BV=64, BKB=fused.BLOCK_BWD, BVB=fused.BLOCK_BWD, NKB=64 // fused.BLOCK_BWD),
         fused.NUM_WARPS_BWD),
    )
    results = {}
    for fn, blocks, warps in kernels:
        consts = dict(DK=64, DV=64, **blocks)
        sig = {a: "constexpr" if a in consts else "i32" if a in ("T", "H", "RB") else "*fp32" for a in fn.arg_names}
        results[fn.__name__] = ptx_status(fn, sig, consts, {"num_warps": warps})
    return results


def test_kernels_compile_for_sm90():
    """The interpreter misses what only the compiler sees: compile the kernels for an H100 in a child process,
    where TRITON_INTERPRET is unset (tests/ops/test_triton_compile.py)."""
    assert_compiles(__file__)


if __name__ == "__main__":
    print(json.dumps(compile_for_sm90()))



@pytest.mark.parametrize("w_log", [None, -20.0, -1e-4], ids=["mixed", "strong", "weak"])
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_matches_chunked_at_sweep_size(w_log):
    """B 256, T 256, H 2, head size 64: output and every gradient against the chunked form (both fp32)."""
    inputs = _inputs(256, 256, 2, 64, 64, seed=0, w_log=w_log)
    with torch.enable_grad():
        got = _run(fused_rwkv5_attn, inputs, torch.float32)
        ref = _run(_chunk, inputs, torch.float32)
    for name, a, b in zip(("o",) + NAMES, got, ref):
        assert torch.isfinite(a).all() and rel_err(a, b) < 1e-4, name


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_vmap_grad_at_sweep_size():
    """4 stacked runs of B 256, T 256, H 2, head size 64 against the chunked form run by run."""
    runs = 4
    stacked = _inputs(256, 256, 2, 64, 64, seed=1, runs=runs)
    wo = torch.randn(runs, 256, 256, 2, 64, device="cuda")
    got = vmap(grad(_loss(fused_rwkv5_attn), argnums=ARGNUMS))(*stacked, wo)
    for i in range(runs):
        ref = grad(_loss(_chunk), argnums=ARGNUMS)(*(s[i] for s in stacked), wo[i])
        for name, a, b in zip(NAMES, got, ref):
            assert rel_err(a[i], b) < 1e-4, (name, i)
