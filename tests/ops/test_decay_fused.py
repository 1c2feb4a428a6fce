"""The fused Triton decayed linear attention (based/ops/decay/triton.py) against the naive recurrence in fp64:
output and every gradient (q, k, v, log-decay in both forms), across chunk borders and value-column blocks, at
strong decay, and under vmap(grad) with shared inputs.

Without CUDA the kernels run under TRITON_INTERPRET=1 on tiny shapes (set before triton is imported). The
`gpu` tests compare with the chunked PyTorch form at MQAR sizes: pytest -m gpu tests/ops/test_decay_fused.py
"""
import json
import os
from types import SimpleNamespace

import torch

if not torch.cuda.is_available() and __name__ != "__main__":  # run as a script: the compile check's child
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

pytest.importorskip("triton")

from torch.func import grad, vmap  # noqa: E402

from based.ops import decay  # noqa: E402
from based.ops.decay import chunk_decay_linear_attn, naive_decay_linear_attn  # noqa: E402
from based.ops.decay import triton as fused  # noqa: E402
from based.ops.decay.triton import fused_decay_linear_attn  # noqa: E402
from tests.conftest import rel_err  # noqa: E402
from tests.ops._triton_check import assert_compiles, ptx_status  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
NAMES = ("o", "q", "k", "v", "g")


def _inputs(B, T, H, dk, dv, per_token, strength=1.0, seed=0, device=DEVICE):
    gen = torch.Generator().manual_seed(seed)
    q, k = torch.randn(B, T, H, dk, generator=gen), torch.randn(B, T, H, dk, generator=gen)
    v = torch.randn(B, T, H, dv, generator=gen)
    g = -strength * torch.rand(*((B, T, H) if per_token else (H,)), generator=gen)
    return [t.to(device) for t in (q, k, v, g)]


def _run(attn, inputs, dtype, scale):
    """o and the gradients of a fixed random loss of it w.r.t. q, k, v, g."""
    leaves = [t.to(dtype).clone().requires_grad_() for t in inputs]
    o = attn(*leaves, scale=scale)
    o = o[0] if isinstance(o, tuple) else o
    w = torch.randn(o.shape, generator=torch.Generator().manual_seed(1)).to(o)
    (o * w).sum().backward()
    return [o] + [t.grad for t in leaves]


def _check(inputs, scale=0.7, tol=1e-4):
    got = _run(fused_decay_linear_attn, inputs, torch.float32, scale)
    ref = _run(naive_decay_linear_attn, inputs, torch.float64, scale)
    for name, a, b in zip(NAMES, got, ref):
        assert a.dtype == torch.float32 and a.shape == b.shape and torch.isfinite(a).all(), name
        assert rel_err(a, b) < tol, (name, rel_err(a, b))


@pytest.mark.parametrize("per_token", [True, False], ids=["mamba2_decay", "lightning_decay"])
@pytest.mark.parametrize("T, dk, dv", [(5, 3, 4), (17, 8, 16), (67, 16, 4), (67, 3, 16)])
def test_matches_naive(T, dk, dv, per_token):
    _check(_inputs(2, T, 2, dk, dv, per_token, seed=T + dk))


@pytest.mark.parametrize("per_token", [True, False], ids=["mamba2_decay", "lightning_decay"])
def test_chunk_borders_and_blocks(monkeypatch, per_token):
    """Chunks of 16 (T = 67: five, the last part padding), key and value columns in blocks of 16 (dk = 20: two,
    dv = 40: three, the last part padding): the state crosses chunk borders, dQ, dK add up over value blocks in
    fp32, o, dV, dG over key blocks."""
    monkeypatch.setattr(fused, "CHUNK", 16)
    monkeypatch.setattr(fused, "TILE", 256)
    monkeypatch.setattr(fused, "MAX_BK", 16)
    meta = fused._meta(67, 20, 40)
    assert (meta["C"], meta["BK"], meta["BV"]) == (16, 16, 16)
    _check(_inputs(2, 67, 2, 20, 40, per_token, seed=3))


@pytest.mark.parametrize("per_token", [True, False], ids=["mamba2_decay", "lightning_decay"])
def test_strong_decay(monkeypatch, per_token):
    """log-decays down to -30 a token: within-chunk decays underflow to 0, nothing overflows."""
    monkeypatch.setattr(fused, "CHUNK", 16)
    inputs = _inputs(2, 40, 2, 8, 16, per_token, strength=30.0, seed=4)
    _check(inputs)


def _loss(attn):
    def loss(q, k, v, g, w):
        o = attn(q, k, v, g, scale=0.5)
        return ((o[0] if isinstance(o, tuple) else o) * w).sum()
    return loss


@pytest.mark.parametrize("per_token", [True, False], ids=["mamba2_decay", "lightning_decay"])
@pytest.mark.parametrize("shared", [(), ("q", "k", "g")], ids=["all_batched", "shared_inputs"])
def test_vmap_grad_matches_per_run(shared, per_token):
    """vmap(grad) over k = 3 runs (the stacked MQAR trainer) against the naive form run by run; `shared` inputs
    are one tensor for all runs (in_dims None), read through stride-0 views."""
    k, argnums = 3, (0, 1, 2, 3)
    per_run = [_inputs(2, 21, 2, 5, 6, per_token, seed=10 + r) for r in range(k)]
    stacked = [torch.stack(ts) for ts in zip(*per_run)] + [torch.randn(k, 2, 21, 2, 6, device=DEVICE)]
    in_dims = tuple(None if n in shared else 0 for n in NAMES[1:]) + (0,)
    args = [s[0] if d is None else s for s, d in zip(stacked, in_dims)]
    got = vmap(grad(_loss(fused_decay_linear_attn), argnums=argnums), in_dims=in_dims)(*args)
    for r in range(k):
        run_args = [(a if d is None else a[r]).double() for a, d in zip(args, in_dims)]
        ref = grad(_loss(naive_decay_linear_attn), argnums=argnums)(*run_args)
        for name, a, b in zip(NAMES[1:], got, ref):
            assert a.shape[1:] == b.shape and rel_err(a[r], b) < 1e-4, (name, r)


def test_strided_inputs():
    """q, k, v as views of one wider projection (Lightning's qkvu chunks) and g a strided slice, read through
    their strides: output and the gradients of the projection and of g against the naive form."""
    B, T, H, D = 2, 21, 2, 4

    def run(attn, dtype):
        qkvu = torch.randn(B, T, 4 * H * D, generator=torch.Generator().manual_seed(7)).to(DEVICE, dtype)
        g2 = -torch.rand(B, T, 2 * H, generator=torch.Generator().manual_seed(8)).to(DEVICE, dtype)
        qkvu.requires_grad_(), g2.requires_grad_()
        q, k, v, _ = (t.view(B, T, H, D) for t in qkvu.chunk(4, dim=-1))
        g = g2[..., ::2]
        if attn is fused_decay_linear_attn:
            assert not q.is_contiguous() and not v.is_contiguous() and g.stride() == (T * 2 * H, 2 * H, 2)
        o = attn(q, k, v, g, scale=0.7)
        o = o[0] if isinstance(o, tuple) else o
        (o * o.detach().cos()).sum().backward()
        return o, qkvu.grad, g2.grad

    for name, a, b in zip(("o", "qkvu", "g"), run(fused_decay_linear_attn, torch.float32),
                          run(naive_decay_linear_attn, torch.float64)):
        assert rel_err(a, b) < 1e-4, name


def test_bf16_inputs():
    """bf16 inputs: o and gradients in bf16, within bf16 rounding of the chunked form on the same inputs (both
    compute in fp32; the interpreter rounds to bf16 toward zero, a GPU to nearest)."""
    inputs = _inputs(2, 19, 2, 8, 16, True, seed=6)
    got = _run(fused_decay_linear_attn, inputs, torch.bfloat16, 0.7)
    ref = _run(chunk_decay_linear_attn, inputs, torch.bfloat16, 0.7)
    for name, a, b in zip(NAMES, got, ref):
        assert a.dtype == b.dtype == torch.bfloat16 and rel_err(a, b) < 1e-2, (name, rel_err(a, b))


def test_output_dtype_and_no_grad():
    q, k, v, g = _inputs(1, 9, 2, 4, 4, True, seed=5)
    ref = naive_decay_linear_attn(q.double(), k.double(), v.double(), g.double())[0]
    with torch.no_grad():
        o = fused_decay_linear_attn(q, k, v.double(), g)
    assert o.dtype == torch.float64 and rel_err(o, ref) < 1e-5


def test_dot_precision_follows_torch():
    """fp32 dots as PyTorch's matmuls: about fp32 by default, TF32 where the trainer allows it."""
    previous = torch.get_float32_matmul_precision()
    try:
        assert fused._precision() == ("tf32x3" if previous == "highest" else "tf32")
        torch.set_float32_matmul_precision("high")
        assert fused._precision() == "tf32"
        torch.set_float32_matmul_precision("highest")
        assert fused._precision() == "tf32x3"
    finally:
        torch.set_float32_matmul_precision(previous)


def test_dispatch(monkeypatch):
    """decay_linear_attn takes the fused form on CUDA without state in or out, unless BASED_DECAY_FUSED=0."""
    q = torch.empty(1, 4, 2, 8)
    assert not decay._use_fused(q, q, None, False)  # CPU
    cuda_q = SimpleNamespace(is_cuda=True, shape=(1, 4, 2, 8))  # stands for a CUDA tensor
    assert decay._use_fused(cuda_q, cuda_q, None, False)
    assert not decay._use_fused(cuda_q, cuda_q, None, True)
    assert not decay._use_fused(cuda_q, cuda_q, torch.empty(1, 2, 8, 8), False)
    wide = SimpleNamespace(is_cuda=True, shape=(1, 4, 2, decay.MAX_FUSED_DIM + 1))
    assert not decay._use_fused(cuda_q, wide, None, False)
    monkeypatch.setenv("BASED_DECAY_FUSED", "0")
    assert not decay._use_fused(cuda_q, cuda_q, None, False)


def _gpu_inputs(per_token, dk, dv, H=4, B=256, T=256, seed=0):
    q, k, v, g = _inputs(B, T, H, dk, dv, per_token, seed=seed, device="cuda")
    return q, k, v, g * 0.5  # decays in (-0.5, 0]: a state that lasts a few tokens to a few hundred


_GPU_CASES = [(True, 16, 64), (False, 32, 32)]
_GPU_IDS = ["mamba2_N16_P64", "lightning_d32"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("per_token, dk, dv", _GPU_CASES, ids=_GPU_IDS)
def test_gpu_matches_chunked(per_token, dk, dv, dtype):
    """B 256, T 256, H 4: output and every gradient against the chunked form on the same (rounded) inputs."""
    inputs = [t.to(dtype) for t in _gpu_inputs(per_token, dk, dv)]
    with torch.enable_grad():
        got = _run(fused_decay_linear_attn, inputs, dtype, 1.0)
        ref = _run(chunk_decay_linear_attn, inputs, dtype, 1.0)
    tol = 1e-4 if dtype == torch.float32 else 1e-2  # bf16: both round o and the gradients to bf16
    for name, a, b in zip(NAMES, got, ref):
        assert a.dtype == b.dtype and torch.isfinite(a).all() and rel_err(a, b) < tol, (name, rel_err(a, b))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("per_token, dk, dv", _GPU_CASES, ids=_GPU_IDS)
def test_gpu_vmap_grad_matches_chunked(per_token, dk, dv):
    """4 stacked runs at B 256, T 256, H 4 against the chunked form run by run."""
    k, argnums = 4, (0, 1, 2, 3)
    stacked = [torch.stack(ts) for ts in zip(*(_gpu_inputs(per_token, dk, dv, seed=r) for r in range(k)))]
    w = torch.randn(k, 256, 256, 4, dv, device="cuda")
    got = vmap(grad(_loss(fused_decay_linear_attn), argnums=argnums))(*stacked, w)
    for r in range(k):
        ref = grad(_loss(chunk_decay_linear_attn), argnums=argnums)(*(s[r] for s in stacked), w[r])
        for name, a, b in zip(NAMES[1:], got, ref):
            assert rel_err(a[r], b) < 1e-4, (name, r, rel_err(a[r], b))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dk, dv", [(4, 4), (24, 64), (64, 64), (256, 256)])
def test_gpu_head_dims_of_the_sweep(dk, dv):
    """The sweep's extreme head dims (Lightning 4 and 256, Mamba-2 N 24) at B 8, T 200 against the chunked form."""
    for per_token in (True, False):
        inputs = _gpu_inputs(per_token, dk, dv, H=2, B=8, T=200)
        got = _run(fused_decay_linear_attn, inputs, torch.float32, 0.5)
        ref = _run(chunk_decay_linear_attn, inputs, torch.float32, 0.5)
        for name, a, b in zip(NAMES, got, ref):
            assert rel_err(a, b) < 1e-4, (name, per_token, rel_err(a, b))


def compile_for_sm90() -> dict:
    """{kernel: "ok" or the compiler's error}: both kernels for an H100 at Mamba-2's N = 24 (padded to 32),
    dv = 64, T = 256."""
    import triton

    meta = fused._meta(256, 24, 64)
    options = {key: meta.pop(key) for key in ("num_warps", "num_stages") if key in meta}
    pointers = {"q", "k", "v", "g", "o", "do", "dq", "dk", "dv", "dgq", "dgk"}
    results = {}
    for fn, extra in ((fused._fwd_kernel, {}), (fused._bwd_kernel, {"NV": triton.cdiv(64, meta["BV"])})):
        consts = dict(meta, PREC=fused._precision(), **extra)
        sig = {a: "constexpr" if a in consts else "*fp32" if a in pointers else "fp32" if a == "scale" else "i32"
               for a in fn.arg_names}
        results[fn.__name__] = ptx_status(fn, sig, consts, options)
    return results


def test_kernels_compile_for_sm90():
    """The interpreter runs kernels as NumPy and misses what only the compiler sees: compile both for an H100
    in a child process, where TRITON_INTERPRET is unset (tests/ops/test_ssm_fused.py does the same)."""
    assert_compiles(__file__)


if __name__ == "__main__":
    print(json.dumps(compile_for_sm90()))
