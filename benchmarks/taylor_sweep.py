"""Kernel variants of the Triton Taylor linear attention, checked and timed in one process (GPU).

    python benchmarks/taylor_sweep.py [T]

Each variant (chunk, value block, warps, stages, state tile) is checked against the fp32 chunked
PyTorch form on a small bf16 problem, then timed forward and forward+backward at B=8, H=16, d=16,
dv=64, bf16 (the benchmark shape). One JSON line per variant.
"""
import json
import sys

import torch
import triton

from based.ops.taylor import chunk_taylor_linear_attn
from based.ops.taylor.triton import chunk as K
from based.ops.taylor.triton import triton_taylor_linear_attn

VARIANTS = [  # CHUNK, BV_MAX, NUM_WARPS, NUM_STAGES, STATE_TILE
    (64, 32, 4, 2, 8192),
    (64, 64, 4, 2, 16384),
    (64, 64, 8, 2, 16384),
    (128, 32, 4, 2, 8192),
    (128, 32, 8, 2, 8192),
    (64, 32, 8, 2, 8192),
    (32, 32, 4, 2, 8192),
    (64, 32, 4, 1, 8192),
    (64, 16, 4, 2, 4096),
]


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def check():
    q, k = (torch.randn(2, 1000, 4, 16, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
    v = torch.randn(2, 1000, 4, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    do = torch.randn(2, 1000, 4, 64, device="cuda")
    o = triton_taylor_linear_attn(q, k, v)[0]
    g = torch.autograd.grad(o.float(), (q, k, v), do)
    qf, kf, vf = (t.detach().float().requires_grad_() for t in (q, k, v))
    ref = chunk_taylor_linear_attn(qf, kf, vf)[0]
    gr = torch.autograd.grad(ref, (qf, kf, vf), do)
    return {"o": rel(o, ref), "dq": rel(g[0], gr[0]), "dk": rel(g[1], gr[1]), "dv": rel(g[2], gr[2])}


def main():
    T = int(sys.argv[1]) if len(sys.argv) > 1 else 8192
    B, H = 8, 16
    q, k = (torch.randn(B, T, H, 16, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
    v = torch.randn(B, T, H, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    do = torch.randn_like(v)
    for chunk, bv, warps, stages, tile in VARIANTS:
        K.CHUNK, K.BV_MAX, K.NUM_WARPS, K.NUM_STAGES, K.STATE_TILE = chunk, bv, warps, stages, tile
        row = {"chunk": chunk, "bv": bv, "warps": warps, "stages": stages, "tile": tile}
        try:
            row["err"] = check()
            f = lambda: triton_taylor_linear_attn(q, k, v)[0]  # noqa: E731
            row["fwd_ms"] = triton.testing.do_bench(f, warmup=25, rep=100, return_mode="median")
            row["fwd_bwd_ms"] = triton.testing.do_bench(
                lambda: torch.autograd.grad(f(), (q, k, v), do), warmup=25, rep=100, return_mode="median")
        except Exception as e:  # noqa: BLE001 - a variant that does not compile is a result too
            row["error"] = repr(e)[:300]
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
