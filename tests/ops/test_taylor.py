"""Every pure-PyTorch form of Taylor linear attention against the fp32 naive reference."""
import pytest
import torch

from based.ops import (
    naive_taylor_linear_attn,
    taylor_feature_dim,
    taylor_feature_map,
    taylor_linear_attn,
    taylor_linear_attn_step,
    zero_state,
)
from tests.conftest import rel_err

FORMS = ("parallel", "chunk", "recurrent")
MAPS = ("compact", "full")


def _qkv(B, T, H, d, dv, dtype=torch.float32, requires_grad=False):
    q, k = torch.randn(B, T, H, d, dtype=dtype), torch.randn(B, T, H, d, dtype=dtype)
    v = torch.randn(B, T, H, dv, dtype=dtype)
    return [t.requires_grad_(requires_grad) for t in (q, k, v)]


@pytest.mark.parametrize("kind", MAPS)
@pytest.mark.parametrize("d", [1, 4, 16])
def test_feature_map_gives_the_taylor_kernel(kind, d):
    x, y = torch.randn(5, d, dtype=torch.float64), torch.randn(5, d, dtype=torch.float64)
    for scale in (None, 0.3):
        s = (x * y).sum(-1) * (d**-0.5 if scale is None else scale)
        got = (taylor_feature_map(x, kind, scale) * taylor_feature_map(y, kind, scale)).sum(-1)
        torch.testing.assert_close(got, 1 + s + s * s / 2)
    assert taylor_feature_map(x, kind).shape[-1] == taylor_feature_dim(d, kind)


def test_feature_dims_of_the_paper():
    assert taylor_feature_dim(16, "full") == 273
    assert taylor_feature_dim(16, "compact") == 153


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("kind", MAPS)
@pytest.mark.parametrize("B,T,H,d,dv", [(1, 1, 1, 4, 8), (2, 63, 3, 8, 16), (1, 500, 2, 16, 32)])
def test_forms_match_naive_output_state_and_grads(form, kind, B, T, H, d, dv):
    if form == "recurrent" and T > 100:
        T = 131  # the token loop is slow; still crosses two 64-token chunks
    q, k, v = _qkv(B, T, H, d, dv, requires_grad=True)
    F = taylor_feature_dim(d, kind)
    s0 = (torch.rand(B, H, F, dv).requires_grad_(), torch.rand(B, H, F).add(1).requires_grad_())
    o, (kv, ks) = taylor_linear_attn(
        q, k, v, mode=form, feature_map=kind, initial_state=s0, output_final_state=True, backend="torch"
    )
    o_ref, (kv_ref, ks_ref) = naive_taylor_linear_attn(q, k, v, kind, initial_state=s0, output_final_state=True)
    assert kv.dtype == ks.dtype == torch.float32
    assert rel_err(o, o_ref) < 1e-5
    assert rel_err(kv, kv_ref) < 1e-5 and rel_err(ks, ks_ref) < 1e-5
    do, dkv, dks = torch.randn_like(o), torch.randn_like(kv), torch.randn_like(ks)
    wrt = (q, k, v, *s0)
    grads = torch.autograd.grad((o * do).sum() + (kv * dkv).sum() + (ks * dks).sum(), wrt)
    grads_ref = torch.autograd.grad((o_ref * do).sum() + (kv_ref * dkv).sum() + (ks_ref * dks).sum(), wrt)
    for name, g, g_ref in zip(("dq", "dk", "dv", "dkv0", "dks0"), grads, grads_ref):
        assert rel_err(g, g_ref) < 1e-4, name


@pytest.mark.parametrize("form", FORMS)
def test_compact_and_full_maps_give_the_same_output(form):
    q, k, v = _qkv(2, 70, 2, 8, 16)
    o_c, _ = taylor_linear_attn(q, k, v, mode=form, feature_map="compact")
    o_f, _ = taylor_linear_attn(q, k, v, mode=form, feature_map="full")
    assert rel_err(o_c, o_f) < 1e-5


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("split", [1, 37, 64])
def test_two_halves_with_state_equal_one_run(form, split):
    q, k, v = _qkv(2, 100, 2, 8, 16)
    o, (kv, ks) = taylor_linear_attn(q, k, v, mode=form, output_final_state=True)
    o1, st = taylor_linear_attn(q[:, :split], k[:, :split], v[:, :split], mode=form, output_final_state=True)
    o2, (kv2, ks2) = taylor_linear_attn(
        q[:, split:], k[:, split:], v[:, split:], mode=form, initial_state=st, output_final_state=True
    )
    assert rel_err(torch.cat([o1, o2], 1), o) < 1e-5
    assert rel_err(kv2, kv) < 1e-5 and rel_err(ks2, ks) < 1e-5


@pytest.mark.parametrize("kind", MAPS)
def test_step_decodes_like_the_parallel_form(kind):
    B, T, H, d, dv = 2, 40, 3, 8, 16
    q, k, v = _qkv(B, T, H, d, dv)
    o, (kv_ref, _) = taylor_linear_attn(q, k, v, mode="parallel", feature_map=kind, output_final_state=True)
    kv, ks = zero_state(B, H, d, dv, q.device, kind)
    steps = [taylor_linear_attn_step(q[:, t], k[:, t], v[:, t], kv, ks, kind) for t in range(T)]
    assert rel_err(torch.stack(steps, 1), o) < 1e-5
    assert rel_err(kv, kv_ref) < 1e-5


def test_causal():
    q, k, v = _qkv(1, 50, 2, 8, 8)
    o, _ = taylor_linear_attn(q, k, v, mode="chunk")
    k2, v2 = k.clone(), v.clone()
    k2[:, 30:] += 5
    v2[:, 30:] -= 3
    o2, _ = taylor_linear_attn(q, k2, v2, mode="chunk")
    assert torch.equal(o[:, :30], o2[:, :30])
    assert not torch.allclose(o[:, 30:], o2[:, 30:])


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 2e-2), (torch.float16, 3e-3)])
def test_half_precision_within_stated_tolerance(form, dtype, tol):
    """bf16/fp16 inputs: states stay fp32; the error is that of rounding inputs and output."""
    T = 131 if form == "recurrent" else 300
    q, k, v = _qkv(2, T, 2, 16, 32, dtype=dtype)
    o, (kv, _) = taylor_linear_attn(q, k, v, mode=form, output_final_state=True)
    o_ref, _ = naive_taylor_linear_attn(q.float(), k.float(), v.float())
    assert o.dtype == dtype and kv.dtype == torch.float32
    assert rel_err(o, o_ref) < tol


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_long_sequence_half_precision_does_not_overflow(dtype):
    """T = 32k: k_sum's constant feature counts to 32768 and the denominator passes fp16's 65504."""
    T = 32768
    q, k, v = _qkv(1, T, 1, 4, 8, dtype=dtype)
    q, k = q * 3, k * 3  # large scores make s^2/2 big: stress the denominator
    o, (kv, ks) = taylor_linear_attn(q, k, v, mode="chunk", output_final_state=True)
    o64, (kv64, ks64) = taylor_linear_attn(q.double(), k.double(), v.double(), mode="chunk", output_final_state=True)
    assert torch.isfinite(o).all()
    assert ks[0, 0, 0].item() == T  # fp32 counts exactly
    assert rel_err(o, o64) < (2e-2 if dtype == torch.bfloat16 else 3e-3)
    assert rel_err(ks, ks64) < 1e-5


def test_denominator_is_at_least_half_per_token():
    q, k, v = _qkv(1, 64, 1, 4, 4)
    s = torch.linspace(-10, 10, 101)
    assert (1 + s + s * s / 2 >= 0.5).all()
    ones = torch.ones_like(v)
    o, _ = taylor_linear_attn(q, k, ones, mode="parallel")
    torch.testing.assert_close(o, ones)  # weights are normalised


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(mode="fast"), "unknown mode 'fast'"),
        (dict(feature_map="cubic"), "unknown feature_map 'cubic'"),
        (dict(backend="cuda"), "unknown backend 'cuda'"),
        (dict(initial_state=(torch.zeros(1, 2, 3, 8), torch.zeros(1, 2, 3))), "initial_state shapes"),
    ],
)
def test_bad_arguments_are_named(kwargs, match):
    q, k, v = _qkv(1, 8, 2, 4, 8)
    with pytest.raises(ValueError, match=match):
        taylor_linear_attn(q, k, v, **kwargs)


def test_bad_shapes_are_named():
    q, k, v = _qkv(1, 8, 2, 4, 8)
    with pytest.raises(ValueError, match="q and k must have the same shape"):
        taylor_linear_attn(q, k[..., :3], v)
    with pytest.raises(ValueError, match="v must be"):
        taylor_linear_attn(q, k, v[:, :4])
    with pytest.raises(ValueError, match="4 dims"):
        taylor_linear_attn(q[0], k[0], v[0])
    with pytest.raises(ValueError, match="at least 1"):
        taylor_linear_attn(q[:, :0], k[:, :0], v[:, :0])
    with pytest.raises(ValueError, match="must be positive"):
        taylor_feature_dim(0)


def test_scale_argument_changes_the_kernel():
    q, k, v = _qkv(1, 20, 1, 4, 4)
    o1, _ = taylor_linear_attn(q, k, v, scale=0.1)
    o2, _ = naive_taylor_linear_attn(q, k, v, scale=0.1)
    o3, _ = taylor_linear_attn(q, k, v)
    assert rel_err(o1, o2) < 1e-5 and not torch.allclose(o1, o3)


def test_a_failed_triton_import_is_tried_once(monkeypatch):
    """On a CUDA machine without Triton every layer asks on every step: the import is tried once."""
    import sys
    import types

    import based.ops.taylor
    from based.ops.taylor import common

    cuda_like = types.SimpleNamespace(is_cuda=True)
    common._triton_imports.cache_clear()
    monkeypatch.delattr(based.ops.taylor, "triton", raising=False)  # as if never imported
    monkeypatch.setitem(sys.modules, "based.ops.taylor.triton", None)  # import raises ImportError
    assert not common.triton_available(cuda_like)
    monkeypatch.delitem(sys.modules, "based.ops.taylor.triton")
    assert not common.triton_available(cuda_like)  # not tried again
    common._triton_imports.cache_clear()
    assert not common.triton_available(torch.zeros(1))  # a CPU tensor never takes the kernels
