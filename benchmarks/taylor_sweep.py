"""Kernel variants of the fused Triton form (triton/chunk.py), checked and timed in one process (GPU).

    python benchmarks/taylor_sweep.py [T [ENV_FILE]]

Each forward variant (chunk, value block, warps, stages, state tile), then each backward variant
with the best forward, is checked against the fp32 chunked
PyTorch form on a small bf16 problem, then timed forward and forward+backward at B=8, H=16, d=16,
dv=64, bf16 (the benchmark shape). One JSON line per variant; the best settings go to ENV_FILE as
BASED_TRITON_* exports.
"""
import json
import sys
from pathlib import Path

import torch
import triton

from based.ops.taylor import chunk_taylor_linear_attn
from based.ops.taylor.triton import chunk as K
from based.ops.taylor.triton import triton_taylor_linear_attn

FWD_VARIANTS = [  # CHUNK, BV_MAX, NUM_WARPS, NUM_STAGES, STATE_TILE
    (32, 32, 8, 2, 8192),
    (32, 32, 4, 2, 8192),
    (32, 16, 4, 2, 4096),
    (64, 32, 8, 2, 8192),
    (16, 32, 4, 2, 8192),
]
BWD_VARIANTS = [  # BWD_CHUNK, BWD_BV_MAX, BWD_WARPS, BWD_STATE_TILE (the dq pass; see taylor_bwd_sweep.py)
    (32, 32, 8, 8192),
    (32, 32, 4, 8192),
    (16, 32, 4, 8192),
    (32, 16, 4, 4096),
]


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def check(form="fused"):
    """Relative errors of output and gradients against the fp32 chunked form (bf16, B=2, T=1000, H=4)."""
    q, k = (torch.randn(2, 1000, 4, 16, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
    v = torch.randn(2, 1000, 4, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    do = torch.randn(2, 1000, 4, 64, device="cuda")
    o = triton_taylor_linear_attn(q, k, v, form=form)[0]
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
    f = lambda: triton_taylor_linear_attn(q, k, v, form="fused")[0]  # noqa: E731
    fb = lambda: torch.autograd.grad(f(), (q, k, v), do)  # noqa: E731
    best = {}
    for chunk, bv, warps, stages, tile in FWD_VARIANTS:
        K.CHUNK, K.BV_MAX, K.NUM_WARPS, K.NUM_STAGES, K.STATE_TILE = chunk, bv, warps, stages, tile
        row = {"fwd": [chunk, bv, warps, stages, tile]}
        try:
            row["err"] = check()
            row["fwd_ms"] = triton.testing.do_bench(f, warmup=25, rep=100, return_mode="median")
            if row["fwd_ms"] < best.get("fwd", (1e9,))[0]:
                best["fwd"] = (row["fwd_ms"], chunk, bv, warps, stages, tile)
        except Exception as e:  # noqa: BLE001 - a variant that does not compile is a result too
            row["error"] = repr(e)[:300]
        print(json.dumps(row), flush=True)
    _, K.CHUNK, K.BV_MAX, K.NUM_WARPS, K.NUM_STAGES, K.STATE_TILE = best["fwd"]
    for chunk, bv, warps, tile in BWD_VARIANTS:
        K.BWD_CHUNK, K.BWD_BV_MAX, K.BWD_WARPS, K.BWD_STATE_TILE = chunk, bv, warps, tile
        row = {"bwd": [chunk, bv, warps, tile]}
        try:
            row["err"] = check()
            row["fwd_bwd_ms"] = triton.testing.do_bench(fb, warmup=25, rep=100, return_mode="median")
            if row["fwd_bwd_ms"] < best.get("bwd", (1e9,))[0]:
                best["bwd"] = (row["fwd_bwd_ms"], chunk, bv, warps, tile)
        except Exception as e:  # noqa: BLE001
            row["error"] = repr(e)[:300]
        print(json.dumps(row), flush=True)
    _, c, bv, w, s, t = best["fwd"]
    env = f"BASED_TRITON_CHUNK={c} BASED_TRITON_BV={bv} BASED_TRITON_WARPS={w} BASED_TRITON_STAGES={s} BASED_TRITON_STATE_TILE={t}"
    if "bwd" in best:
        _, c, bv, w, t = best["bwd"]
        env += f" BASED_TRITON_BWD_CHUNK={c} BASED_TRITON_BWD_BV={bv} BASED_TRITON_BWD_WARPS={w} BASED_TRITON_BWD_STATE_TILE={t}"
    if len(sys.argv) > 2:
        Path(sys.argv[2]).write_text("export " + env + "\n")
    print("best:", env, flush=True)


if __name__ == "__main__":
    main()
