"""The Triton SwiGLU gate (based/ops/swiglu_triton.py) against up * silu(gate): the halves of one projection read
in place, rows that are not evenly strided, partial tiles, bf16; and which calls take it (CUDA without a gradient
to take). Under TRITON_INTERPRET on the CPU; a child compiles it for sm_90."""
import json
import os

import torch
import torch.nn.functional as F

if not torch.cuda.is_available() and __name__ != "__main__":
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

pytest.importorskip("triton")

from based.ops import swiglu as swiglu_mod  # noqa: E402
from based.ops.swiglu_triton import _swiglu_kernel, triton_swiglu  # noqa: E402
from tests.conftest import rel_err  # noqa: E402
from tests.ops._triton_check import assert_compiles, ptx_status, signature  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("shape", [(2, 5, 7), (3, 300), (1, 17, 33, 2)])
def test_matches_the_formula_on_projection_halves(shape):
    h = torch.randn(*shape[:-1], 2 * shape[-1], generator=torch.Generator().manual_seed(0)).to(DEVICE) * 3
    up, gate = h.chunk(2, dim=-1)  # strided views
    want = up.double() * F.silu(gate.double())
    got = triton_swiglu(up, gate)
    assert got.shape == up.shape and got.is_contiguous() and rel_err(got, want) < 1e-6
    u16, g16 = up.bfloat16(), gate.bfloat16()
    got16 = triton_swiglu(u16, g16)
    want16 = u16.double() * F.silu(g16.double())
    # one bf16 step of the fp32 result (the interpreter truncates where the GPU rounds to nearest)
    assert got16.dtype == torch.bfloat16 and rel_err(got16, want16) < 8e-3


def test_rows_not_evenly_strided_are_copied():
    x = torch.randn(4, 6, 10, device=DEVICE)
    up, gate = x[:, ::2, :5], x[:, 1::2, 5:]  # a [4, 3, 5] view with rows 2 * 10 apart, then 6 * 10 apart
    up = up.transpose(0, 1)  # [3, 4, 5]: rows no longer evenly strided
    gate = gate.transpose(0, 1)
    assert rel_err(triton_swiglu(up, gate), up.double() * F.silu(gate.double())) < 1e-6


def test_which_calls_take_it(monkeypatch):
    up, gate = torch.randn(2, 3, 8, device=DEVICE).chunk(2, dim=-1)
    with torch.no_grad():
        assert swiglu_mod._fused(up, gate) == (DEVICE == "cuda")
    assert not swiglu_mod._fused(up.clone().requires_grad_(), gate)
    assert not swiglu_mod._fused(up, gate.double())
    monkeypatch.setenv("BASED_SWIGLU_FUSED", "0")
    with torch.no_grad():
        assert not swiglu_mod._fused(up, gate)
        assert torch.equal(swiglu_mod.swiglu(up, gate), up * F.silu(gate))


def compile_for_sm90() -> dict:
    consts = dict(BR=16, BN=256)
    sig = signature(_swiglu_kernel, consts, ints=("s_u", "s_g", "R", "N"),
                    pointers={"u": "*bf16", "g": "*bf16", "y": "*bf16"})
    return {"_swiglu_kernel": ptx_status(_swiglu_kernel, sig, consts, {"num_warps": 4})}


def test_kernel_compiles_for_sm90():
    assert_compiles(__file__)


if __name__ == "__main__":
    print(json.dumps(compile_for_sm90()))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_matches_torch_at_1p3b_prefill():
    """8 prompts of 512 at the 1.3b preset's MLP width (2 x 3584), bf16: the Triton pass against PyTorch's."""
    up, gate = torch.randn(8, 512, 7168, device="cuda").bfloat16().chunk(2, dim=-1)
    with torch.no_grad():
        got = swiglu_mod.swiglu(up, gate)
    assert rel_err(got, up.float() * F.silu(gate.float())) < 4e-3
    assert rel_err(got, up * F.silu(gate)) < 8e-3
