"""decode_attn (one token against a ring KV cache): the Triton kernel against the SDPA form and both against
an explicit softmax over the positions each ring row holds. Without CUDA the kernel runs under
TRITON_INTERPRET=1 on tiny shapes; `pytest -m gpu` runs real sizes."""
import functools
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from based.ops.decode_attn import cached_positions, decode_attn, decode_attn_step, torch_decode_attn  # noqa: E402
from tests.conftest import rel_err  # noqa: E402

triton = pytest.importorskip("triton")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def explicit(q, k_cache, v_cache, last, window=None):
    """Softmax over the rows whose position is written (and, for a window, within it), in fp64."""
    B, L = k_cache.shape[:2]
    out = []
    for b in range(B):
        pos = cached_positions(last[b:b + 1], L)[0]
        keep = pos >= 0
        if window is not None:
            keep &= pos > last[b] - window
        s = torch.einsum("hd,lhd->hl", q[b].double(), k_cache[b].double()) * q.shape[-1] ** -0.5
        s = s.masked_fill(~keep, float("-inf"))
        out.append(torch.einsum("hl,lhd->hd", s.softmax(-1), v_cache[b].double()))
    return torch.stack(out)


@pytest.mark.parametrize("L, last", [
    (7, [0, 3, 6, 20]),      # partly filled, exactly full, wrapped around
    (40, [0, 1, 17, 39]),    # several row blocks (BL = 16 at these widths), full-attention style
])
def test_kernel_matches_torch_and_the_explicit_softmax(L, last):
    torch.manual_seed(0)
    B, H, D, DV = len(last), 3, 12, 10  # head dims that are not powers of two
    q = torch.randn(B, H, D, device=DEVICE)
    k, v = torch.randn(B, L, H, D, device=DEVICE), torch.randn(B, L, H, DV, device=DEVICE)
    last = torch.tensor(last, device=DEVICE)
    ref = explicit(q, k, v, last).float()
    torch.testing.assert_close(torch_decode_attn(q, k, v, last), ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(decode_attn(q, k, v, last, backend="triton"), ref, atol=1e-5, rtol=1e-5)


def test_kernel_reads_caches_in_their_layout_and_in_16_bit():
    torch.manual_seed(1)
    B, L, H, D = 2, 9, 2, 16
    kv = torch.randn(B, L, 2, H, D, device=DEVICE, dtype=torch.bfloat16)  # k and v interleaved: strided rows
    k, v = kv[:, :, 0], kv[:, :, 1]
    q = torch.randn(B, H, D, device=DEVICE, dtype=torch.bfloat16)
    last = torch.tensor([4, 30], device=DEVICE)
    out = decode_attn(q, k, v, last, backend="triton")
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), explicit(q, k, v, last).float(), atol=2e-2, rtol=2e-2)


def test_sliding_window_decode_equals_explicit_window():
    """A ring of exactly `window` rows shows each token the last `window` positions."""
    torch.manual_seed(2)
    W, B, H, D = 5, 3, 2, 8
    T = 13
    k_all, v_all = torch.randn(B, T, H, D), torch.randn(B, T, H, D)
    q = torch.randn(B, H, D)
    ring_k, ring_v = torch.zeros(B, W, H, D), torch.zeros(B, W, H, D)
    for t in range(T):
        ring_k[:, t % W], ring_v[:, t % W] = k_all[:, t], v_all[:, t]
        last = torch.full((B,), t)
        # Explicit: the full history, masked to the window.
        full = explicit(q, k_all[:, : t + 1], v_all[:, : t + 1], last, window=W)
        torch.testing.assert_close(
            decode_attn(q.to(DEVICE), ring_k.to(DEVICE), ring_v.to(DEVICE), last.to(DEVICE), backend="triton").cpu(),
            full.float(), atol=1e-5, rtol=1e-5,
        )


@pytest.mark.parametrize("args, match", [
    (((2, 3, 4), (2, 5, 3, 4), (2, 5, 3, 4), (2,)), None),
    (((2, 3), (2, 5, 3, 4), (2, 5, 3, 4), (2,)), r"q must be \[B, H, D\]"),
    (((2, 3, 4), (2, 5, 2, 4), (2, 5, 2, 4), (2,)), r"k_cache must be \[B, L, H, D\] = \[2, L, 3, 4\]"),
    (((2, 3, 4), (2, 5, 3, 4), (2, 6, 3, 4), (2,)), "v_cache must be"),
    (((2, 3, 4), (2, 5, 3, 4), (2, 5, 3, 4), (3,)), r"one position per sequence, shape \[2\]"),
])
def test_bad_shapes_are_named(args, match):
    q, k, v, last = (torch.zeros(s) for s in args)
    if match is None:
        assert decode_attn(q, k, v, last.long()).shape == (2, 3, 4)
    else:
        with pytest.raises(ValueError, match=match):
            decode_attn(q, k, v, last.long())


def test_unknown_backend_is_named():
    q, k = torch.zeros(2, 3, 4), torch.zeros(2, 5, 3, 4)
    with pytest.raises(ValueError, match="backend must be 'auto', 'triton' or 'torch'"):
        decode_attn(q, k, k, torch.zeros(2, dtype=torch.long), backend="cuda")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("L, H, D", [(128, 16, 112), (129, 16, 64), (4096, 16, 64)])
def test_kernel_at_real_sizes(L, H, D):
    torch.manual_seed(0)
    B = 64
    q = torch.randn(B, H, D, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(B, L, H, D, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(B, L, H, D, device="cuda", dtype=torch.bfloat16)
    last = torch.randint(0, 3 * L, (B,), device="cuda")
    ref = torch_decode_attn(q.float(), k.float(), v.float(), last)
    torch.testing.assert_close(decode_attn(q, k, v, last).float(), ref, atol=1e-2, rtol=1e-2)


def _rotate(x, positions, inv_freq):
    """Rotate-half rotary of x [B, H, D] at positions [B], in fp64 (the reference)."""
    angles = positions.double().view(-1, 1, 1) * inv_freq.double()
    x1, x2 = x.double().chunk(2, dim=-1)
    return torch.cat([x1 * angles.cos() - x2 * angles.sin(), x2 * angles.cos() + x1 * angles.sin()], -1)


def _step_form(form):
    """decode_attn_step through a backend, or the Triton kernel in one form: one program per head walking the
    ring, one program per head holding the whole ring (read before the wait), or each ring split into 3 ranges
    of 2-row loads (ranges without written rows, several loads per range)."""
    if form in ("torch", "triton"):
        return functools.partial(decode_attn_step, backend=form)
    from based.ops.decode_attn.triton import triton_decode_attn_step

    extra = {"one program per head": dict(split=False), "whole ring": dict(ring=True),
             "split ranges": dict(split=True, ranges=3, block_l=2)}[form]
    return lambda *args: triton_decode_attn_step(*args, **extra)


@pytest.mark.parametrize("form", ["torch", "triton", "one program per head", "whole ring", "split ranges"])
@pytest.mark.parametrize("rotary", [True, False])
@pytest.mark.parametrize("L, positions", [(5, [0, 3, 4, 11]), (40, [0, 1, 17, 39])])
def test_step_rotates_writes_and_attends(form, rotary, L, positions):
    """decode_attn_step = rotary at each position, k and v written into row position % L, attention over
    the written rows; q, k, v are strided views of one fused projection as in Attention.step."""
    torch.manual_seed(3)
    B, H, D = len(positions), 3, 12  # head dim not a power of two (halves of 6)
    qkv = torch.randn(B, 3, H, D, device=DEVICE)
    q, k, v = qkv.unbind(1)
    k_cache, v_cache = torch.randn(B, L, H, D, device=DEVICE), torch.randn(B, L, H, D, device=DEVICE)
    pos = torch.tensor(positions, device=DEVICE)
    inv_freq = 10000.0 ** -(torch.arange(0, D, 2, device=DEVICE, dtype=torch.float32) / D) if rotary else None
    want_k, want_v = k_cache.clone(), v_cache.clone()
    qr, kr = (_rotate(t, pos, inv_freq).float() for t in (q, k)) if rotary else (q, k)
    want_k[torch.arange(B), pos % L], want_v[torch.arange(B), pos % L] = kr, v
    want = explicit(qr, want_k, want_v, pos).float()
    out = _step_form(form)(q, k, v, k_cache, v_cache, pos, inv_freq)
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(k_cache, want_k, atol=1e-5, rtol=1e-5)
    assert torch.equal(v_cache, want_v)


def test_split_step_leaves_its_tickets_ready_for_the_next_launch():
    """The split kernel's last program per head puts its ticket counter back to 0: a second launch on the
    same (reused) counters gives the same answer."""
    from based.ops.decode_attn.triton import triton_decode_attn_step
    from based.ops.launch import ticket_counters

    torch.manual_seed(4)
    B, L, H, D = 2, 9, 3, 8
    q, k, v = torch.randn(3, B, H, D, device=DEVICE)
    caches = torch.randn(2, B, L, H, D, device=DEVICE)
    pos = torch.tensor([4, 13], device=DEVICE)
    first = triton_decode_attn_step(q, k, v, *caches.clone(), pos, split=True, ranges=3, block_l=2)
    assert not ticket_counters(q.device, B * H).any()
    again = triton_decode_attn_step(q, k, v, *caches.clone(), pos, split=True, ranges=3, block_l=2)
    torch.testing.assert_close(again, first, atol=0, rtol=0)


def test_step_bad_arguments():
    q, cache, pos = torch.zeros(2, 3, 4), torch.zeros(2, 5, 3, 4), torch.zeros(2, dtype=torch.long)
    with pytest.raises(ValueError, match="k must be"):
        decode_attn_step(q, torch.zeros(2, 3, 6), q, cache, cache, pos)
    with pytest.raises(ValueError, match="even head dim"):
        odd = torch.zeros(2, 3, 5)
        decode_attn_step(odd, odd, odd, torch.zeros(2, 5, 3, 5), torch.zeros(2, 5, 3, 5), pos)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("L, H, D, B", [(128, 16, 112, 256), (4096, 16, 64, 256), (129, 16, 112, 1),
                                        (4096, 16, 64, 2)])
def test_step_kernel_at_real_sizes_in_bf16(L, H, D, B):
    """B = 256: one program per head; B = 1, 2: each ring split over programs."""
    torch.manual_seed(0)
    qkv = torch.randn(B, 3, H, D, device="cuda", dtype=torch.bfloat16)
    q, k, v = qkv.unbind(1)
    caches = [torch.randn(B, L, H, D, device="cuda", dtype=torch.bfloat16) for _ in range(2)]
    pos = torch.randint(0, 3 * L, (B,), device="cuda")
    inv_freq = 10000.0 ** -(torch.arange(0, D, 2, device="cuda", dtype=torch.float32) / D)
    ref_caches = [c.clone() for c in caches]
    ref = decode_attn_step(q, k, v, *ref_caches, pos, inv_freq, backend="torch")
    out = decode_attn_step(q, k, v, *caches, pos, inv_freq, backend="triton")
    torch.testing.assert_close(out.float(), ref.float(), atol=2e-2, rtol=2e-2)
    for c, r in zip(caches, ref_caches):
        torch.testing.assert_close(c.float(), r.float(), atol=1e-2, rtol=1e-2)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("batch", [1, 4])
def test_gpu_step_forms_over_a_wrapping_window_bf16(batch):
    """The 1.3b preset's sliding-window head (16 heads of 112, ring 128), bf16, 300 tokens (the ring wraps
    twice): the whole-ring form (the small-batch default) and the split form against the PyTorch step, outputs
    within bf16 rounding and caches equal."""
    from based.ops.decode_attn.triton import triton_decode_attn_step

    torch.manual_seed(5)
    L, H, D = 128, 16, 112
    inv_freq = 10000.0 ** -(torch.arange(0, D, 2, device="cuda", dtype=torch.float32) / D)
    caches = {form: [torch.zeros(batch, L, H, D, device="cuda", dtype=torch.bfloat16) for _ in range(2)]
              for form in ("torch", "ring", "split")}
    worst = {"ring": 0.0, "split": 0.0}
    for t in range(300):
        q, k, v = torch.randn(3, batch, H, D, device="cuda", dtype=torch.bfloat16).unbind(0)
        pos = torch.full((batch,), t, device="cuda")
        want = decode_attn_step(q, k, v, *caches["torch"], pos, inv_freq, backend="torch")
        for form, kwargs in (("ring", dict(ring=True)), ("split", dict(split=True))):
            got = triton_decode_attn_step(q, k, v, *caches[form], pos, inv_freq, **kwargs)
            worst[form] = max(worst[form], rel_err(got, want))
    assert worst["ring"] < 1e-2 and worst["split"] < 1e-2, worst
    for form in ("ring", "split"):
        assert all(rel_err(a, b) < 1e-2 for a, b in zip(caches[form], caches["torch"]))
