"""Triton kernels of Taylor linear attention against the fp32 references.

Without CUDA the kernels run under TRITON_INTERPRET=1 on tiny shapes (set before triton is imported;
only this module's kernels are affected since nothing else in the CPU suite launches Triton). The
`gpu` tests run the same checks at real sizes: pytest -m gpu tests/ops/test_taylor_triton.py
"""
import functools
import importlib
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

triton = pytest.importorskip("triton")

from based.ops.taylor import (  # noqa: E402
    chunk_taylor_linear_attn,
    naive_taylor_linear_attn,
    taylor_feature_dim,
    taylor_linear_attn,
    taylor_linear_attn_step,
    zero_state,
)
from based.ops.taylor.triton import triton_taylor_linear_attn, triton_taylor_linear_attn_step  # noqa: E402
from tests.conftest import rel_err  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# Both Triton forms (triton/chunk.py and triton/chunkwise.py) are held to the same references.
FORMS = pytest.mark.parametrize("form", ["fused", "chunkwise"])
NAMES = ("o", "kv", "k_sum", "dq", "dk", "dv", "d_kv0", "d_ksum0")


def _prior_state(N, H, d, dv, fm, device):
    """A realistic state: the final state of a short random sequence."""
    _, s = naive_taylor_linear_attn(
        torch.randn(N, 7, H, d, device=device), torch.randn(N, 7, H, d, device=device),
        torch.randn(N, 7, H, dv, device=device), fm, output_final_state=True,
    )
    return s


def _run(fn, q, k, v, state, fm, grads, **kw):
    """Output, final state and every gradient of a fixed random loss (grads: dO, dkv, dks)."""
    xs = [t.clone().requires_grad_() for t in (q, k, v)]
    ss = None if state is None else tuple(t.clone().requires_grad_() for t in state)
    o, (kv, ks) = fn(*xs, fm, initial_state=ss, output_final_state=True, **kw)
    do, dkv, dks = grads
    ((o.float() * do).sum() + (kv * dkv).sum() + (ks * dks).sum()).backward()
    out = [o, kv, ks] + [t.grad for t in xs]
    if ss is not None:
        out += [t.grad for t in ss]
    return out


def _grads(o_shape, N, H, F, dv, device):
    return (torch.randn(o_shape, device=device), torch.randn(N, H, F, dv, device=device),
            torch.randn(N, H, F, device=device))


def _compare(got, ref, tol, what=""):
    for name, a, b in zip(NAMES, got, ref):
        assert a is not None, f"{what} {name}: no gradient"
        assert torch.isfinite(a).all(), f"{what} {name}: non-finite values"
        err = rel_err(a, b)
        assert err < tol, f"{what} {name}: relative error {err:.2e} >= {tol}"


@FORMS
@pytest.mark.parametrize("feature_map", ["compact", "full"])
@pytest.mark.parametrize(
    "B,T,H,d,dv,with_state",
    [
        (1, 1, 1, 16, 16, True),  # a single token
        (2, 63, 2, 16, 64, True),  # odd length, two value blocks
        (1, 130, 1, 8, 16, False),  # three chunks, last one partial; d padded to 16
        (1, 70, 2, 32, 32, True),  # d = 32: the quadratic rows split over programs
        (1, 70, 1, 16, 24, True),  # dv not a power of two (the 1.3b preset has 112): masked value lanes
    ],
)
def test_chunk_matches_naive(B, T, H, d, dv, with_state, feature_map, form):
    q, k = torch.randn(B, T, H, d), torch.randn(B, T, H, d)
    v = torch.randn(B, T, H, dv)
    state = _prior_state(B, H, d, dv, feature_map, "cpu") if with_state else None
    F = taylor_feature_dim(d, feature_map)
    grads = _grads(v.shape, B, H, F, dv, "cpu")
    ref = _run(naive_taylor_linear_attn, q, k, v, state, feature_map, grads)
    got = _run(functools.partial(triton_taylor_linear_attn, form=form), *(t.to(DEVICE) for t in (q, k, v)),
               None if state is None else tuple(t.to(DEVICE) for t in state), feature_map,
               tuple(g.to(DEVICE) for g in grads))
    _compare([t.cpu() for t in got], ref, 1e-4)


@FORMS
@pytest.mark.parametrize("feature_map", ["compact", "full"])
def test_varlen_matches_per_sequence(feature_map, form):
    H, d, dv = 2, 16, 32
    lens = [1, 63, 0, 66]  # a single token, a partial chunk, an empty sequence, a chunk boundary crossed
    cu = torch.tensor([0, 1, 64, 64, 130], dtype=torch.int32, device=DEVICE)
    N, T = len(lens), sum(lens)
    q, k = torch.randn(1, T, H, d, device=DEVICE), torch.randn(1, T, H, d, device=DEVICE)
    v = torch.randn(1, T, H, dv, device=DEVICE)
    state = _prior_state(N, H, d, dv, feature_map, DEVICE)
    F = taylor_feature_dim(d, feature_map)
    grads = _grads(v.shape, N, H, F, dv, DEVICE)

    def per_sequence(q, k, v, fm, initial_state, output_final_state):
        return taylor_linear_attn(q, k, v, feature_map=fm, initial_state=initial_state, cu_seqlens=cu,
                                  output_final_state=output_final_state, backend="torch", mode="parallel")

    ref = _run(per_sequence, q, k, v, state, feature_map, grads)
    got = _run(functools.partial(triton_taylor_linear_attn, form=form), q, k, v, state, feature_map, grads,
               cu_seqlens=cu)
    _compare(got, ref, 1e-4, "varlen")


def test_form_choice():
    """auto takes the chunkwise kernels up to head dim 128 and while their per-chunk states fit the
    budget (a 1M-token prefill would need ~11 GB), the fused ones otherwise; a bad name says which exist."""
    from based.ops.taylor.triton import _pick_form, chunkwise

    chunks = chunkwise.num_chunks(8, 8192)
    assert chunks == 8 * 8192 // chunkwise.CW_CHUNK
    assert chunkwise.num_chunks(1, 130, num_seqs=3) == 3 + 3  # each sequence may end in a partial chunk
    assert _pick_form("auto", 16, 64, chunks, 16) == "chunkwise"
    assert _pick_form("auto", 16, 256, chunks, 16) == "fused"
    long = chunkwise.num_chunks(1, 1 << 20)
    assert chunkwise.state_bytes(long, 16, 16, 64) > chunkwise.CW_MAX_STATE_BYTES
    assert _pick_form("auto", 16, 64, long, 16) == "fused"
    assert _pick_form("chunkwise", 16, 64, long, 16) == "chunkwise"  # asked for by name: kept
    # ... unless a sequence is too long for the kernels' int32 offsets: a clear error, not a wrong result
    q = torch.empty(1, 1 << 22, 16, 16, device="meta")
    with pytest.raises(ValueError, match="too long for the chunkwise.*form='fused'"):
        chunkwise._layout(q, torch.empty(1, 1 << 22, 16, 64, device="meta"), None)
    with pytest.raises(ValueError, match="head dim <= 128"):
        _pick_form("chunkwise", 16, 256)
    with pytest.raises(ValueError, match="use one of"):
        _pick_form("flash", 16, 64)


def test_dispatch_and_state_interchange():
    """backend="triton" through the public op; a Triton final state continues a PyTorch run exactly."""
    B, T, H, d, dv = 1, 40, 2, 16, 16
    q, k, v = torch.randn(B, T, H, d), torch.randn(B, T, H, d), torch.randn(B, T, H, dv)
    ref, ref_state = naive_taylor_linear_attn(q, k, v, "full", output_final_state=True)
    o1, s1 = taylor_linear_attn(q[:, :25], k[:, :25], v[:, :25], feature_map="full", backend="triton",
                                output_final_state=True)
    o2, s2 = taylor_linear_attn(q[:, 25:], k[:, 25:], v[:, 25:], feature_map="full", backend="torch",
                                initial_state=s1, output_final_state=True)
    assert rel_err(torch.cat([o1, o2], 1), ref) < 1e-5
    assert rel_err(s2[0], ref_state[0]) < 1e-5 and rel_err(s2[1], ref_state[1]) < 1e-5


def test_compiled_caller_matches_eager():
    """Called from compiled code (`based train --compile`), the Triton op runs eagerly behind a graph
    break: the caller's output and gradients are those of the uncompiled caller."""

    def caller(q, k, v):
        o, _ = taylor_linear_attn(q * 2, k, v, backend="triton")
        return o.sin()

    q, k, v = torch.randn(1, 40, 2, 16), torch.randn(1, 40, 2, 16), torch.randn(1, 40, 2, 16)
    dO = torch.randn(1, 40, 2, 16)
    results = []
    for fn in (caller, torch.compile(caller, backend="aot_eager")):
        xs = [t.clone().requires_grad_() for t in (q, k, v)]
        o = fn(*xs)
        (o * dO).sum().backward()
        results.append([o] + [t.grad for t in xs])
    _compare(results[1], results[0], 1e-6, "compiled")


@pytest.mark.parametrize("feature_map", ["compact", "full"])
def test_decode_step_matches_torch(feature_map):
    B, H, d, dv = 3, 2, 16, 24  # dv not a power of two: masked lanes
    F = taylor_feature_dim(d, feature_map)
    kv = torch.randn(B, H, F, dv, device=DEVICE) * 0.1
    ks = torch.rand(B, H, F, device=DEVICE) + 1.0
    kv_ref, ks_ref = kv.clone(), ks.clone()
    for _ in range(3):
        q, k, v = (torch.randn(B, H, n, device=DEVICE) for n in (d, d, dv))
        y = taylor_linear_attn_step(q, k, v, kv, ks, feature_map, backend="triton")
        y_ref = taylor_linear_attn_step(q, k, v, kv_ref, ks_ref, feature_map, backend="torch")
        assert rel_err(y, y_ref) < 1e-5
    assert rel_err(kv, kv_ref) < 1e-6 and rel_err(ks, ks_ref) < 1e-6


@pytest.mark.parametrize("block_f", [None, 4])
def test_decode_step_small_batch_forms_equal_one_program_per_head(block_f):
    """The small-batch forms (each head's state rows in chunks over programs, the last to finish sums the parts;
    each head's whole state in one program, read before the wait) give the one-program-per-head outputs and
    states, three steps in a row; chunks that do not divide F."""
    B, H, d, dv = 2, 3, 8, 24
    F = taylor_feature_dim(d, "compact")
    states = [(torch.randn(B, H, F, dv, device=DEVICE) * 0.1, torch.rand(B, H, F, device=DEVICE) + 1.0)]
    states += [tuple(t.clone() for t in states[0]) for _ in range(2)]
    forms = (dict(split=False), dict(split=True), dict(resident=True))
    for _ in range(3):
        q, k, v = (torch.randn(B, H, n, device=DEVICE) for n in (d, d, dv))
        ys = [triton_taylor_linear_attn_step(q, k, v, kv, ks, block_f=block_f, **form)
              for (kv, ks), form in zip(states, forms)]
        assert rel_err(ys[1], ys[0]) < 1e-6 and rel_err(ys[2], ys[0]) < 1e-6
    for other in states[1:]:
        assert all(rel_err(a, b) < 1e-6 for a, b in zip(other, states[0]))


def test_decode_step_cache_hints_change_nothing_but_speed():
    """cache_hints (evict-first state loads, streaming stores; a tuning knob, off by default) gives the
    same outputs and states."""
    B, H, d, dv = 2, 2, 8, 16
    F = taylor_feature_dim(d, "compact")
    states = [(torch.randn(B, H, F, dv, device=DEVICE) * 0.1, torch.rand(B, H, F, device=DEVICE) + 1.0)
              for _ in range(2)]
    states[1] = tuple(t.clone() for t in states[0])
    q, k, v = (torch.randn(B, H, n, device=DEVICE) for n in (d, d, dv))
    ys = [
        triton_taylor_linear_attn_step(q, k, v, kv, ks, cache_hints=hints, split=False)
        for (kv, ks), hints in zip(states, (False, True))
    ]
    assert torch.equal(ys[0], ys[1])
    assert all(torch.equal(a, b) for a, b in zip(states[0], states[1]))


# ---------------------------------------------------------------------------------------------- GPU

gpu = pytest.mark.gpu


def _fwd_bwd_vs_chunk_fp32(B, T, H, d, dv, dtype, feature_map, with_state, tol_o, tol_g, form="auto"):
    dev = "cuda"
    q = torch.randn(B, T, H, d, device=dev).to(dtype)
    k = torch.randn(B, T, H, d, device=dev).to(dtype)
    v = torch.randn(B, T, H, dv, device=dev).to(dtype)
    state = _prior_state(B, H, d, dv, feature_map, dev) if with_state else None
    F = taylor_feature_dim(d, feature_map)
    grads = _grads(v.shape, B, H, F, dv, dev)
    # fp32 reference on the same (rounded) inputs; the chunked torch form is linear in T.
    ref = _run(chunk_taylor_linear_attn, q.float(), k.float(), v.float(), state, feature_map, grads)
    got = _run(functools.partial(triton_taylor_linear_attn, form=form), q, k, v, state, feature_map, grads)
    torch.cuda.synchronize()
    _compare(got[:3], ref[:3], tol_o, f"{dtype} T={T}")
    _compare(got[3:], ref[3:], tol_g, f"{dtype} T={T} grad")


@gpu
@pytest.mark.parametrize(
    "B,T,H,d,dv,dtype,feature_map",
    [
        (2, 16384, 16, 16, 64, torch.bfloat16, "compact"),
        (32, 1024, 16, 16, 64, torch.bfloat16, "compact"),  # B * H = 512
        (2, 4096, 4, 16, 64, torch.float16, "full"),
        (1, 1000, 2, 32, 128, torch.float32, "compact"),
        (2, 777, 3, 24, 96, torch.float32, "full"),
    ],
)
@FORMS
def test_gpu_matches_reference(B, T, H, d, dv, dtype, feature_map, form):
    tol = {torch.float32: (1e-4, 1e-3), torch.float16: (5e-3, 1e-2), torch.bfloat16: (1e-2, 2e-2)}[dtype]
    _fwd_bwd_vs_chunk_fp32(B, T, H, d, dv, dtype, feature_map, True, *tol, form=form)


@gpu
@FORMS
def test_gpu_fp16_long_no_overflow(form):
    """T = 32k in fp16: the denominator and state reach ~1e5 > fp16 max, kept in fp32."""
    B, T, H, d, dv = 1, 32768, 2, 16, 64
    q = torch.randn(B, T, H, d, device="cuda", dtype=torch.float16)
    k = torch.randn(B, T, H, d, device="cuda", dtype=torch.float16)
    v = (torch.randn(B, T, H, dv, device="cuda") + 2.0).to(torch.float16)
    o, (kv, ks) = triton_taylor_linear_attn(q, k, v, output_final_state=True, form=form)
    ref, (kv_ref, ks_ref) = chunk_taylor_linear_attn(q.float(), k.float(), v.float(), output_final_state=True)
    assert ks[..., 0].max().item() == T and torch.isfinite(o).all()
    assert rel_err(o, ref) < 5e-3 and rel_err(kv, kv_ref) < 5e-3 and rel_err(ks, ks_ref) < 1e-3


@gpu
@FORMS
def test_gpu_varlen(form):
    H, d, dv = 4, 16, 64
    lens = [1, 4097, 63, 2000, 8192]
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32, device="cuda")
    T = sum(lens)
    q, k = (torch.randn(1, T, H, d, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    v = torch.randn(1, T, H, dv, device="cuda", dtype=torch.bfloat16)
    state = _prior_state(len(lens), H, d, dv, "compact", "cuda")
    grads = _grads(v.shape, len(lens), H, taylor_feature_dim(d), dv, "cuda")

    def per_sequence(q, k, v, fm, initial_state, output_final_state):
        return taylor_linear_attn(q, k, v, feature_map=fm, initial_state=initial_state, cu_seqlens=cu,
                                  output_final_state=output_final_state, backend="torch", mode="chunk")

    ref = _run(per_sequence, q.float(), k.float(), v.float(), state, "compact", grads)
    got = _run(functools.partial(triton_taylor_linear_attn, form=form), q, k, v, state, "compact", grads,
               cu_seqlens=cu)
    _compare(got[:3], ref[:3], 1e-2, "varlen")
    _compare(got[3:], ref[3:], 2e-2, "varlen grad")


@gpu
@pytest.mark.parametrize("batch", [1, 1024])
@pytest.mark.parametrize("feature_map", ["compact", "full"])
def test_gpu_decode(batch, feature_map):
    H, d, dv = 16, 16, 64
    kv, ks = zero_state(batch, H, d, dv, "cuda", feature_map)
    kv_ref, ks_ref = kv.clone(), ks.clone()
    for _ in range(4):
        q, k, v = (torch.randn(batch, H, n, device="cuda", dtype=torch.bfloat16) for n in (d, d, dv))
        y = taylor_linear_attn_step(q, k, v, kv, ks, feature_map)  # auto: the Triton kernel on CUDA
        y_ref = taylor_linear_attn_step(q, k, v, kv_ref, ks_ref, feature_map, backend="torch")
        assert rel_err(y, y_ref) < 1e-2
    assert rel_err(kv, kv_ref) < 1e-5 and rel_err(ks, ks_ref) < 1e-5


def test_resident_step_launches_with_its_own_warps(monkeypatch):
    """The small-batch resident kernel takes RESIDENT_WARPS (a tuning knob), not the other forms' default: a
    sweep of it once did not take effect because the default was set first."""
    decode = importlib.import_module("based.ops.taylor.triton.decode")
    launched = {}

    class Recorder:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: launched.update(grid=grid, **kwargs)

    monkeypatch.setattr(decode, "_taylor_step_resident_kernel", Recorder())
    monkeypatch.setattr(decode, "RESIDENT_WARPS", 2)
    B, H, d, dv = 1, 2, 4, 8
    F = taylor_feature_dim(d, "compact")
    q, k, v = (torch.randn(B, H, n, device=DEVICE) for n in (d, d, dv))
    decode.triton_taylor_linear_attn_step(q, k, v, torch.zeros(B, H, F, dv, device=DEVICE),
                                          torch.zeros(B, H, F, device=DEVICE))
    assert launched["grid"] == (B * H,) and launched["num_warps"] == 2
