"""The Triton rotation (based/ops/rotary_triton.py) against apply_rotary's PyTorch form: odd half-dims, head dims
over one block, strided q / k views of a fused projection, per-sequence and shared angles, bf16; and which calls
take it (CUDA without a gradient to take). Under TRITON_INTERPRET on the CPU; a child compiles it for sm_90."""
import json
import os

import torch

if not torch.cuda.is_available() and __name__ != "__main__":
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

pytest.importorskip("triton")

from based.layers.rotary import RotaryEmbedding  # noqa: E402
from based.ops import rotary  # noqa: E402
from based.ops.rotary_triton import _rotary_kernel, triton_apply_rotary  # noqa: E402
from tests.conftest import rel_err  # noqa: E402
from tests.ops._triton_check import assert_compiles, ptx_status, signature  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _torch_form(x, cos, sin, monkeypatch):
    monkeypatch.setenv("BASED_ROTARY_FUSED", "0")
    try:
        return rotary.apply_rotary(x, cos, sin)
    finally:
        monkeypatch.delenv("BASED_ROTARY_FUSED")


@pytest.mark.parametrize("B, T, H, D", [(2, 5, 3, 6), (1, 19, 2, 224), (3, 1, 1, 2), (2, 33, 4, 16)])
@pytest.mark.parametrize("per_sequence", [False, True])
def test_matches_the_torch_form(B, T, H, D, per_sequence, monkeypatch):
    g = torch.Generator().manual_seed(0)
    qkv = torch.randn(B, T, 3, H, D, generator=g).to(DEVICE)
    q = qkv[:, :, 0]  # a strided view, as the attention layers split their projection
    offsets = torch.tensor([0, 7, 3])[:B] if per_sequence else 5
    cos, sin = RotaryEmbedding(D).cos_sin(offsets if per_sequence else 5, B, T, DEVICE)
    want = _torch_form(q, cos, sin, monkeypatch)
    got = triton_apply_rotary(q, cos, sin)
    assert got.shape == q.shape and got.is_contiguous() and rel_err(got, want) < 1e-6
    got16 = triton_apply_rotary(q.bfloat16(), cos, sin)
    assert got16.dtype == torch.bfloat16 and rel_err(got16, _torch_form(q.bfloat16(), cos, sin, monkeypatch)) < 8e-3


def test_which_calls_take_it(monkeypatch):
    """CUDA without a gradient to take; never on the CPU, with a gradient, or with BASED_ROTARY_FUSED=0."""
    x = torch.randn(1, 4, 2, 8, device=DEVICE)
    cos, sin = RotaryEmbedding(8).cos_sin(0, 1, 4, DEVICE)
    with torch.no_grad():
        assert rotary._fused(x, cos, sin) == (DEVICE == "cuda")
    assert not rotary._fused(x.requires_grad_(), cos, sin)
    monkeypatch.setenv("BASED_ROTARY_FUSED", "0")
    with torch.no_grad():
        assert not rotary._fused(x, cos, sin)


def compile_for_sm90() -> dict:
    consts = dict(BR=16, BH=64)
    sig = signature(_rotary_kernel, consts, ints=("s_xb", "s_xt", "s_xh", "s_cb", "s_ct", "T", "H", "HALF", "R"),
                    pointers={"x": "*bf16", "y": "*bf16"})
    return {"_rotary_kernel": ptx_status(_rotary_kernel, sig, consts, {"num_warps": 4})}


def test_kernel_compiles_for_sm90():
    assert_compiles(__file__)


if __name__ == "__main__":
    print(json.dumps(compile_for_sm90()))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_matches_torch_at_1p3b_prefill(monkeypatch):
    """8 prompts of 512 at the 1.3b preset's sliding-window heads (16 x 112), bf16."""
    qkv = torch.randn(8, 512, 3, 16, 112, device="cuda").bfloat16()
    cos, sin = RotaryEmbedding(112).cos_sin(0, 8, 512, "cuda")
    with torch.no_grad():
        got = rotary.apply_rotary(qkv[:, :, 1], cos, sin)
    assert rel_err(got, _torch_form(qkv[:, :, 1], cos, sin, monkeypatch)) < 4e-3
