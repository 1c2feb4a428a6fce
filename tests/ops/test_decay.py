"""Decayed linear attention (Lightning Attention, Mamba-2 SSD): chunked form and decode step against the
naive recurrence in fp32 (outputs, final states, every gradient), continuation, long-T numerics, bad input."""
import pytest
import torch

from based.ops.decay import (
    chunk_decay_linear_attn, decay_linear_attn, decay_linear_attn_step, naive_decay_linear_attn, segsum,
)
from tests.conftest import rel_err


def inputs(T, B=2, H=3, dk=5, dv=7, per_token=True, strength=1.0):
    q, k, v = torch.randn(B, T, H, dk), torch.randn(B, T, H, dk), torch.randn(B, T, H, dv)
    g = -strength * (torch.rand(B, T, H) if per_token else torch.rand(H))
    return q, k, v, g, torch.randn(B, H, dk, dv)


def run_steps(q, k, v, g, state):
    """The decode step token by token (on a copy of state): outputs [B, T, H, dv] and the final state."""
    state = state.clone()
    outs = [decay_linear_attn_step(q[:, t], k[:, t], v[:, t], g[:, t] if g.dim() == 3 else g, state)
            for t in range(q.shape[1])]
    return torch.stack(outs, 1), state


@pytest.mark.parametrize("per_token", [True, False], ids=["mamba2_decay", "lightning_decay"])
@pytest.mark.parametrize("chunk_size", [16, 64])
@pytest.mark.parametrize("T", [1, 63, 130])
def test_chunk_matches_naive_and_steps(T, chunk_size, per_token):
    q, k, v, g, s0 = inputs(T, per_token=per_token)
    o, s = decay_linear_attn(q, k, v, g, chunk_size=chunk_size, initial_state=s0, output_final_state=True)
    o_ref, s_ref = naive_decay_linear_attn(q, k, v, g, initial_state=s0, output_final_state=True)
    assert rel_err(o, o_ref) < 1e-5 and rel_err(s, s_ref) < 1e-5
    with torch.no_grad():
        o_step, s_step = run_steps(q, k, v, g, s0)
    assert rel_err(o_step, o_ref) < 1e-5 and rel_err(s_step, s_ref) < 1e-5


@pytest.mark.parametrize("per_token", [True, False], ids=["mamba2_decay", "lightning_decay"])
@pytest.mark.parametrize("T", [1, 63, 130])
def test_chunk_gradients_match_naive(T, per_token):
    q, k, v, g, s0 = (t.requires_grad_() for t in inputs(T, per_token=per_token))
    do, ds = torch.randn(2, T, 3, 7), torch.randn(2, 3, 5, 7)
    grads = []
    for fn in (lambda: chunk_decay_linear_attn(q, k, v, g, initial_state=s0, output_final_state=True, chunk_size=16),
               lambda: naive_decay_linear_attn(q, k, v, g, initial_state=s0, output_final_state=True)):
        o, s = fn()
        grads.append(torch.autograd.grad((o * do).sum() + (s * ds).sum(), (q, k, v, g, s0)))
    for name, a, b in zip(("q", "k", "v", "log_decay", "initial_state"), *grads):
        assert rel_err(a, b) < 1e-5, name


def test_initial_state_continues_the_sequence():
    q, k, v, g, _ = inputs(100)
    o, s = decay_linear_attn(q, k, v, g, chunk_size=16, output_final_state=True)
    o1, s1 = decay_linear_attn(q[:, :37], k[:, :37], v[:, :37], g[:, :37], chunk_size=16, output_final_state=True)
    o2, s2 = decay_linear_attn(q[:, 37:], k[:, 37:], v[:, 37:], g[:, 37:], chunk_size=16, initial_state=s1,
                               output_final_state=True)
    assert rel_err(torch.cat([o1, o2], 1), o) < 1e-5 and rel_err(s2, s) < 1e-5
    assert decay_linear_attn(q, k, v, g)[1] is None


def test_no_decay_is_causal_linear_attention():
    q, k, v, _, _ = inputs(40)
    o, _ = decay_linear_attn(q, k, v, torch.zeros(3), chunk_size=16)
    scores = torch.einsum("bthd,bshd->bhts", q, k).tril()
    assert rel_err(o, torch.einsum("bhts,bshd->bthd", scores, v)) < 1e-5


def test_long_sequence_with_strong_decay_is_finite_and_exact():
    """T = 4096 with log-decays down to -30 per token: exp of cumulative sums would overflow; segment sums do not."""
    q, k, v, g, _ = inputs(4096, B=1, H=2, dk=4, dv=4, strength=30.0)
    o, s = decay_linear_attn(q, k, v, g, output_final_state=True)
    assert torch.isfinite(o).all() and torch.isfinite(s).all()
    o_ref, s_ref = naive_decay_linear_attn(q, k, v, g, output_final_state=True)
    assert rel_err(o, o_ref) < 1e-5 and rel_err(s, s_ref) < 1e-5
    grads = torch.autograd.grad(decay_linear_attn(q.requires_grad_(), k, v, g.requires_grad_())[0].sum(), (q, g))
    assert all(torch.isfinite(t).all() for t in grads)


def test_segsum():
    g = torch.tensor([-1.0, -2.0, -3.0])
    expected = torch.tensor([[0.0, -float("inf"), -float("inf")], [-2.0, 0.0, -float("inf")], [-5.0, -3.0, 0.0]])
    assert torch.equal(segsum(g), expected)


def test_bf16_inputs_return_bf16_and_fp32_state():
    q, k, v, g, _ = inputs(20)
    o, s = decay_linear_attn(q.bfloat16(), k.bfloat16(), v.bfloat16(), g, output_final_state=True)
    assert o.dtype == torch.bfloat16 and s.dtype == torch.float32
    assert rel_err(o, naive_decay_linear_attn(q, k, v, g)[0]) < 2e-2


@pytest.mark.parametrize(
    "args, match",
    [
        (lambda q, k, v, g: (q[0], k, v, g), r"q must be \[B, T, H, D\]"),
        (lambda q, k, v, g: (q, k[..., :4], v, g), "q and k must have the same shape"),
        (lambda q, k, v, g: (q, k, v[:, :5], g), "v must be"),
        (lambda q, k, v, g: (q, k, v, g[:, :, :2]), r"log_decay must be \[B, T, H\]=\(2, 10, 3\)"),
        (lambda q, k, v, g: (q[:, :0], k[:, :0], v[:, :0], g[:, :0]), "at least 1"),
    ],
)
def test_bad_inputs_are_rejected(args, match):
    q, k, v, g, _ = inputs(10)
    with pytest.raises(ValueError, match=match):
        decay_linear_attn(*args(q, k, v, g))


def test_bad_state_and_chunk_are_rejected():
    q, k, v, g, s0 = inputs(10)
    with pytest.raises(ValueError, match=r"initial_state must be a tensor \[B, H, dk, dv\]=\(2, 3, 5, 7\)"):
        decay_linear_attn(q, k, v, g, initial_state=s0[..., :3])
    with pytest.raises(ValueError, match="chunk_size must be a positive int"):
        decay_linear_attn(q, k, v, g, chunk_size=0)
    with pytest.raises(ValueError, match=r"state must be \[B, H, dk, dv\]"):
        decay_linear_attn_step(q[:, 0], k[:, 0], v[:, 0], g[:, 0], s0[:1])
    with pytest.raises(ValueError, match=r"log_decay must be \[B, H\]"):
        decay_linear_attn_step(q[:, 0], k[:, 0], v[:, 0], g[:, :2, 0], s0)
