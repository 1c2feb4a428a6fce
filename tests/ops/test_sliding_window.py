import pytest
import torch

from based.ops import naive_sliding_window_attn, sliding_window_attn
from based.ops import sliding_window as swa
from tests.conftest import rel_err


def _qkv(B, T, H, D, dtype=torch.float32):
    return [torch.randn(B, T, H, D, dtype=dtype) for _ in range(3)]


@pytest.mark.parametrize("T,W", [(1, 1), (1, 4), (63, 1), (63, 8), (63, 63), (63, 200), (500, 37)])
def test_matches_naive(T, W):
    q, k, v = _qkv(2, T, 3, 16)
    assert rel_err(sliding_window_attn(q, k, v, W), naive_sliding_window_attn(q, k, v, W)) < 1e-5


def test_blocked_path_matches_naive(monkeypatch):
    monkeypatch.setattr(swa, "_FULL_MASK_MAX_T", 16)  # force the block walk on a short sequence
    q, k, v = _qkv(1, 700, 2, 8)
    for W in (1, 5, 256, 300):
        assert rel_err(sliding_window_attn(q, k, v, W), naive_sliding_window_attn(q, k, v, W)) < 1e-5


def test_flex_path_inside_compiled_code(monkeypatch):
    """The FlexAttention branch as a compiled block takes it: flex_attention captured in the graph, the
    block mask built eagerly. Forced on the CPU (forward only: CPU flex has no backward)."""
    monkeypatch.setattr(swa, "_use_flex", lambda q, v, window_size: True)
    q, k, v = _qkv(2, 256, 2, 16)
    compiled = torch.compile(sliding_window_attn, backend="aot_eager")
    with torch.no_grad():
        assert rel_err(compiled(q, k, v, 37), naive_sliding_window_attn(q, k, v, 37)) < 1e-5


def test_each_token_sees_exactly_window_size_tokens():
    T, W = 40, 6
    q = torch.zeros(1, T, 1, 4)  # uniform attention: output = mean of visible values
    k = torch.zeros(1, T, 1, 4)
    v = torch.arange(T, dtype=torch.float32).view(1, T, 1, 1).expand(1, T, 1, 4).contiguous()
    o = sliding_window_attn(q, k, v, W)[0, :, 0, 0]
    for t in range(T):
        lo = max(0, t - W + 1)
        assert o[t].item() == pytest.approx(sum(range(lo, t + 1)) / (t + 1 - lo))


def test_window_one_is_identity_on_values():
    q, k, v = _qkv(1, 10, 2, 4)
    torch.testing.assert_close(sliding_window_attn(q, k, v, 1), v)


def test_gradients_match_naive():
    q, k, v = [t.requires_grad_() for t in _qkv(1, 50, 2, 8)]
    o, o_ref = sliding_window_attn(q, k, v, 7), naive_sliding_window_attn(q, k, v, 7)
    do = torch.randn_like(o)
    g = torch.autograd.grad((o * do).sum(), (q, k, v))
    g_ref = torch.autograd.grad((o_ref * do).sum(), (q, k, v))
    for a, b in zip(g, g_ref):
        assert rel_err(a, b) < 1e-5


def test_bf16_within_tolerance():
    q, k, v = _qkv(2, 100, 2, 32, torch.bfloat16)
    assert rel_err(sliding_window_attn(q, k, v, 16), naive_sliding_window_attn(q.float(), k.float(), v.float(), 16)) < 2e-2


@pytest.mark.parametrize("W", [0, -3, 2.5, True])
def test_bad_window(W):
    q, k, v = _qkv(1, 4, 1, 4)
    with pytest.raises(ValueError, match="window_size must be a positive int"):
        sliding_window_attn(q, k, v, W)


def test_bad_shapes():
    q, k, v = _qkv(1, 4, 1, 4)
    with pytest.raises(ValueError, match="must share"):
        sliding_window_attn(q, k[:, :3], v, 2)


def test_under_vmap_grad_equals_a_loop():
    """The stacked MQAR trainer runs models under torch.func.vmap(grad): the windowed attention there (written
    out, as CUDA SDPA's batching rule rejects the mask) equals the naive form run by run, values and grads."""
    from torch.func import grad, vmap

    torch.manual_seed(0)
    q, k, v = (torch.randn(3, 2, 40, 2, 8, dtype=torch.float64) for _ in range(3))

    def loss(fn, q, k, v):
        return fn(q, k, v, 7).square().sum()

    grads = vmap(grad(lambda q, k, v: loss(sliding_window_attn, q, k, v), argnums=(0, 1, 2)))(q, k, v)
    for i in range(3):
        qi, ki, vi = (t[i].clone().requires_grad_() for t in (q, k, v))
        ref = torch.autograd.grad(loss(naive_sliding_window_attn, qi, ki, vi), (qi, ki, vi))
        for g, r in zip(grads, ref):
            torch.testing.assert_close(g[i], r)
    torch.testing.assert_close(vmap(lambda q, k, v: sliding_window_attn(q, k, v, 7))(q, k, v),
                               torch.stack([naive_sliding_window_attn(q[i], k[i], v[i], 7) for i in range(3)]))
