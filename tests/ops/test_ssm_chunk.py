"""The chunked selective scan (based/ops/ssm/chunk.py) against the reference scan, fp32."""

import pytest
import torch

from based.ops.ssm import selective_scan
from based.ops.ssm.chunk import chunk_selective_scan


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def _inputs(Bsz, T, Dm, N, seed, big_steps=False):
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(Bsz, T, Dm, generator=g)
    # Some channels with steps so large that exp(A * sum of a chunk's steps) underflows to 0: the closed-form
    # decays must stay finite there (a form dividing by them would overflow).
    scale = 8.0 if big_steps else 1.0
    delta = torch.nn.functional.softplus(scale * torch.randn(Bsz, T, Dm, generator=g))
    A = -torch.exp(torch.randn(Dm, N, generator=g)) * torch.arange(1, N + 1)
    B, C = torch.randn(Bsz, T, N, generator=g), torch.randn(Bsz, T, N, generator=g)
    D = torch.randn(Dm, generator=g)
    h0 = torch.randn(Bsz, Dm, N, generator=g)
    return u, delta, A, B, C, D, h0


@pytest.mark.parametrize("T, chunk_size", [(63, None), (64, 8), (37, 5), (1, None), (500, 16), (20, 64)])
@pytest.mark.parametrize("with_state", [False, True])
@torch.enable_grad()  # without gradients the chunked scan hands over to the reference
def test_chunk_scan_matches_reference(T, chunk_size, with_state):
    u, delta, A, B, C, D, h0 = _inputs(2, T, 6, 4, seed=T, big_steps=T == 63)
    init = h0 if with_state else None
    y_ref, h_ref = selective_scan(u, delta, A, B, C, D, initial_state=init, output_final_state=True)
    y, h = chunk_selective_scan(u, delta, A, B, C, D, initial_state=init, output_final_state=True,
                                chunk_size=chunk_size)
    assert torch.isfinite(y).all() and _rel(y, y_ref) < 1e-5 and _rel(h, h_ref) < 1e-5


@pytest.mark.parametrize("T", [63, 128])
def test_chunk_scan_gradients_match_reference(T):
    inputs = _inputs(2, T, 5, 3, seed=1, big_steps=True)
    grads = []
    for scan in (selective_scan, chunk_selective_scan):
        leaves = [t.clone().requires_grad_() for t in inputs]
        y, h = scan(*leaves[:6], initial_state=leaves[6], output_final_state=True)
        w = torch.randn_like(y, generator=torch.Generator().manual_seed(2))
        ((y * w).sum() + h.square().sum()).backward()
        grads.append([t.grad for t in leaves])
    for name, g, ref in zip(("u", "delta", "A", "B", "C", "D", "h0"), *grads):
        assert torch.isfinite(g).all() and _rel(g, ref) < 1e-4, name


@torch.enable_grad()
def test_chunk_scan_without_D_or_state():
    u, delta, A, B, C, _, _ = _inputs(1, 10, 3, 2, seed=3)
    y, h = chunk_selective_scan(u, delta, A, B, C)
    assert h is None and _rel(y, selective_scan(u, delta, A, B, C)[0]) < 1e-5
