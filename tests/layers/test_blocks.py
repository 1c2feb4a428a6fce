"""RMSNorm, SwiGLU, rotary and the mixers' wiring, each against a formula written out by hand."""
import math

import pytest
import torch
import torch.nn.functional as F

from based.layers import BaseConv, LinearAttention, RMSNorm, RotaryEmbedding, SwiGLU


def test_rmsnorm_formula():
    norm = RMSNorm(8, eps=1e-5)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(8))
    x = torch.randn(3, 5, 8)
    expected = x / torch.sqrt((x * x).mean(-1, keepdim=True) + 1e-5) * norm.weight
    torch.testing.assert_close(norm(x), expected)


def test_rmsnorm_computes_in_fp32_and_returns_input_dtype():
    norm = RMSNorm(64)
    x = torch.randn(4, 64) * 1e3
    y = norm(x.bfloat16())
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), norm(x.bfloat16().float()), rtol=1e-2, atol=1e-2)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_rmsnorm_on_cuda_in_half_precision_rounds_the_fp32_result_once(dtype):
    """The CUDA path hands a bf16 / fp16 x and weight to PyTorch's fused kernel as they are: it must equal the fp32
    computation rounded once (at most one ulp apart where the two reductions' orders differ), at 1.3b's width."""
    norm = RMSNorm(1792).cuda().to(dtype)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.1 * torch.randn(1792))
    x = (torch.randn(4096, 1792, device="cuda") * 3).to(dtype)
    want = F.rms_norm(x.float(), (1792,), norm.weight.float(), norm.eps).to(dtype)
    got = norm(x)
    assert got.dtype == dtype
    ulp = torch.finfo(dtype).eps * want.float().abs().clamp_min(torch.finfo(dtype).tiny)
    assert ((got.float() - want.float()).abs() <= ulp * 1.01).all()
    assert (got != want).float().mean() < 0.01


def test_swiglu_formula():
    mlp = SwiGLU(6, hidden_size=10)
    assert mlp.fc1.weight.shape == (20, 6) and mlp.fc2.weight.shape == (6, 10) and mlp.fc1.bias is None
    x = torch.randn(2, 3, 6)
    w_up, w_gate = mlp.fc1.weight[:10], mlp.fc1.weight[10:]
    h = (x @ w_up.T) * (x @ w_gate.T) * torch.sigmoid(x @ w_gate.T)
    torch.testing.assert_close(mlp(x), h @ mlp.fc2.weight.T)
    assert SwiGLU(6).hidden_size == 12


def test_rotary_depends_only_on_relative_position():
    rot = RotaryEmbedding(16)
    q, k = torch.randn(1, 1, 2, 16), torch.randn(1, 1, 2, 16)

    def score(m, n):
        qm, _ = rot(q, q, m)
        _, kn = rot(k, k, n)
        return (qm * kn).sum(-1)

    torch.testing.assert_close(score(3, 7), score(103, 107))
    torch.testing.assert_close(score(0, 0), (q * k).sum(-1))  # position 0 is the identity
    assert not torch.allclose(score(3, 7), score(3, 8))


def test_rotary_rotate_half_pairs_and_norm():
    rot = RotaryEmbedding(4, base=10000.0)
    x = torch.tensor([[[[1.0, 0.0, 0.0, 0.0]]]])
    y, _ = rot(x, x, 1)
    # Pair (x_0, x_2) turns by 1 radian at position 1 (frequency base^0 = 1).
    torch.testing.assert_close(y[0, 0, 0], torch.tensor([math.cos(1.0), 0.0, math.sin(1.0), 0.0]))
    x = torch.randn(2, 9, 3, 4)
    torch.testing.assert_close(rot(x, x, 5)[0].norm(dim=-1), x.norm(dim=-1))


def test_rotary_tensor_positions_match_int_offsets():
    rot = RotaryEmbedding(8)
    x = torch.randn(2, 3, 2, 8)
    per_seq, _ = rot(x, x, torch.tensor([4, 9]))
    torch.testing.assert_close(per_seq[:1], rot(x[:1], x[:1], 4)[0])
    torch.testing.assert_close(per_seq[1:], rot(x[1:], x[1:], 9)[0])
    with pytest.raises(ValueError, match="positive even"):
        RotaryEmbedding(7)


def test_linear_attention_wiring_matches_taylor_kernel():
    la = LinearAttention(12, feature_dim=3, num_heads=2, head_dim=4)
    x = torch.randn(1, 6, 12)
    q = (x @ la.proj_q.weight.T).view(1, 6, 2, 3)
    k = (x @ la.proj_k.weight.T).view(1, 6, 2, 3)
    v = (x @ la.proj_v.weight.T).view(1, 6, 2, 4)
    s = torch.einsum("bthd,bshd->bhts", q, k) / math.sqrt(3)
    a = (1 + s + s * s / 2).tril()  # causal Taylor kernel
    y = torch.einsum("bhts,bshd->bthd", a, v) / (a.sum(-1).transpose(1, 2).unsqueeze(-1) + la.eps)
    torch.testing.assert_close(la(x), y.reshape(1, 6, 8) @ la.out_proj.weight.T, rtol=1e-4, atol=1e-5)


def test_base_conv_wiring_matches_gated_short_conv():
    conv = BaseConv(4, kernel_size=3, expand=1)
    assert conv.in_proj.weight.shape == (8, 4) and conv.conv.weight.shape == (4, 1, 3)
    x = torch.randn(2, 7, 4)
    u = x @ conv.in_proj.weight.T + conv.in_proj.bias
    u1, u2 = u[..., :4], u[..., 4:]
    w = conv.conv.weight[:, 0]  # [C, K], tap K-1 multiplies the current token
    c = conv.conv.bias + sum(w[:, i] * F.pad(u1, (0, 0, 2 - i, 0))[:, :7] for i in range(3))
    y = (F.silu(c) * u2) @ conv.out_proj.weight.T + conv.out_proj.bias
    torch.testing.assert_close(conv(x), y, rtol=1e-5, atol=1e-6)
