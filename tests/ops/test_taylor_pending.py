"""Deferred state updates (based/ops/taylor/pending.py): the decode step with a pending buffer gives the
outputs of the step that writes the state every token, in PyTorch and in both Triton kernels.

Without CUDA the Triton kernels run under TRITON_INTERPRET=1 on tiny shapes (set before triton is imported).
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from based.ops.taylor import (  # noqa: E402
    fold_pending,
    taylor_feature_dim,
    taylor_linear_attn_step,
    zero_pending,
    zero_state,
)
from tests.conftest import rel_err  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
gpu = pytest.mark.gpu


def _mid_fold(B, H, d, dv, fold_every, feature_map, dtype=torch.float32):
    """A state with every head at a different point of its fold cycle: (kv, k_sum), pending, and the same
    sequence's state written every token (pending folded in), for the reference."""
    F = taylor_feature_dim(d, feature_map)
    kv = torch.randn(B, H, F, dv, device=DEVICE) * 0.1
    ks = torch.rand(B, H, F, device=DEVICE) + 1.0
    kp, vp, n = zero_pending(B, H, d, dv, fold_every, dtype, DEVICE)
    kp.copy_(torch.randn_like(kp, dtype=torch.float32))
    vp.copy_(torch.randn_like(vp, dtype=torch.float32))
    n.copy_(torch.randint(0, fold_every, (B, H), device=DEVICE))  # 0 .. P pending tokens: a full buffer too
    ref = (kv.clone(), ks.clone())
    fold_pending(*ref, (kp.clone(), vp.clone(), n.clone()), feature_map)
    return (kv, ks), (kp, vp, n), ref


@pytest.mark.parametrize("feature_map", ["compact", "full"])
@pytest.mark.parametrize("fold_every", [2, 3, 8])
def test_pending_step_equals_step_that_writes_every_token(feature_map, fold_every):
    """Token after token, heads at different points of their cycles: the same outputs; the state plus the
    pending tokens is the reference state, and each count goes 0 .. fold_every - 1 and round."""
    B, H, d, dv, T = 2, 3, 4, 6, 2 * fold_every + 3
    state, pending, ref = _mid_fold(B, H, d, dv, fold_every, feature_map)
    n0 = pending[2].clone()
    for t in range(T):
        q, k, v = (torch.randn(B, H, n, device=DEVICE) for n in (d, d, dv))
        y = taylor_linear_attn_step(q, k, v, *state, feature_map, backend="torch", pending=pending)
        y_ref = taylor_linear_attn_step(q, k, v, *ref, feature_map, backend="torch")
        assert rel_err(y, y_ref) < 1e-5, t
        assert torch.equal(pending[2], (n0 + t + 1) % fold_every)
    folded = tuple(s.clone() for s in state)
    fold_pending(*folded, tuple(p.clone() for p in pending), feature_map)
    assert rel_err(folded[0], ref[0]) < 1e-5 and rel_err(folded[1], ref[1]) < 1e-5


def test_state_is_written_only_by_the_token_that_fills_the_buffer():
    """The point of the buffer: kv and k_sum stay untouched for fold_every - 1 steps, then change."""
    B, H, d, dv = 1, 2, 4, 6
    state, pending = zero_state(B, H, d, dv, DEVICE), zero_pending(B, H, d, dv, 4, device=DEVICE)
    for t in range(8):
        before = [s.clone() for s in state]
        taylor_linear_attn_step(*(torch.randn(B, H, n, device=DEVICE) for n in (d, d, dv)), *state,
                                backend="torch", pending=pending)
        changed = any(not torch.equal(a, b) for a, b in zip(before, state))
        assert changed == (t % 4 == 3), t


FORMS = {"one program per head": dict(split=False), "split": dict(split=True),
         "resident": dict(resident=True)}


@pytest.mark.parametrize("form", list(FORMS))
@pytest.mark.parametrize("feature_map", ["compact", "full"])
@pytest.mark.parametrize("fold_every", [2, 5])
def test_triton_pending_step_equals_torch(form, feature_map, fold_every):
    """The kernels (one program per head; state rows split over programs, block_f 4 not dividing F; the whole
    state in one program, F rows as two tiles of which the second is partly masked) against the PyTorch
    pending step: outputs, state, buffer and counts, over two fold cycles."""
    from based.ops.taylor.triton import triton_taylor_linear_attn_step

    B, H, d, dv = 2, 3, 4, 6
    state, pending, _ = _mid_fold(B, H, d, dv, fold_every, feature_map)
    state_ref, pending_ref = tuple(s.clone() for s in state), tuple(p.clone() for p in pending)
    for t in range(2 * fold_every + 1):
        q, k, v = (torch.randn(B, H, n, device=DEVICE) for n in (d, d, dv))
        y = triton_taylor_linear_attn_step(q, k, v, *state, feature_map, block_f=4, pending=pending, **FORMS[form])
        y_ref = taylor_linear_attn_step(q, k, v, *state_ref, feature_map, backend="torch", pending=pending_ref)
        assert rel_err(y, y_ref) < 1e-5, t
        assert torch.equal(pending[2], pending_ref[2]), t
    assert all(rel_err(a, b) < 1e-5 for a, b in zip(state, state_ref))
    used = torch.arange(fold_every - 1, device=DEVICE) < pending[2].unsqueeze(-1)  # slots past n hold stale data
    assert all(torch.equal(a[used], b[used]) for a, b in zip(pending[:2], pending_ref[:2]))


def test_bad_pending_buffers_are_rejected():
    B, H, d, dv = 2, 3, 4, 6
    q, k, v = (torch.randn(B, H, n) for n in (d, d, dv))
    state = zero_state(B, H, d, dv, "cpu")
    kp, vp, n = zero_pending(B, H, d, dv, 4)
    with pytest.raises(ValueError, match="do not match"):
        taylor_linear_attn_step(q, k, v, *state, pending=(kp[:1], vp[:1], n[:1]))
    with pytest.raises(ValueError, match="do not match"):
        taylor_linear_attn_step(q, k, v, *state, pending=(kp, vp[..., :2], n))
    with pytest.raises(ValueError, match="int32"):
        taylor_linear_attn_step(q, k, v, *state, pending=(kp, vp, n.long()))
    with pytest.raises(ValueError, match="tuple"):
        taylor_linear_attn_step(q, k, v, *state, pending=(kp, vp))
    for bad in (1, 0, 2.0, True):
        with pytest.raises(ValueError, match="fold_every"):
            zero_pending(B, H, d, dv, bad)


# ---------------------------------------------------------------------------------------------- GPU


@gpu
@pytest.mark.parametrize("batch", [1, 1024])
def test_gpu_pending_step_long_decode_bf16(batch):
    """The 1.3b preset's head (d 16, dv 112), bf16 inputs and buffer, 1,000 tokens: outputs against the fp32
    state written every token, and the state at the end."""
    H, d, dv, T = 16, 16, 112, 1000
    state, ref = zero_state(batch, H, d, dv, "cuda"), zero_state(batch, H, d, dv, "cuda")
    pending = zero_pending(batch, H, d, dv, 8, torch.bfloat16, "cuda")
    worst = 0.0
    for t in range(T):
        q, k, v = (torch.randn(batch, H, n, device="cuda", dtype=torch.bfloat16) for n in (d, d, dv))
        y = taylor_linear_attn_step(q, k, v, *state, pending=pending)  # auto: Triton on CUDA
        y_ref = taylor_linear_attn_step(q, k, v, *ref, backend="torch")
        worst = max(worst, rel_err(y, y_ref))
    assert worst < 1e-2
    fold_pending(*state, pending)
    assert rel_err(state[0], ref[0]) < 1e-5 and rel_err(state[1], ref[1]) < 1e-5
