"""Backward launch variants of the Triton Taylor kernels, checked and timed (GPU).

    python benchmarks/taylor_bwd_sweep.py [T]

The dq pass and the dk/dv pass are varied one at a time (chunk, value block, warps), the other kept at
its default. Each variant is checked against the fp32 chunked PyTorch form on a small bf16 problem
(relative errors printed), then the whole backward (both passes, taylor_chunk_bwd) is timed at
B=8, H=16, d=16, dv=64, bf16. One JSON line per variant.
"""
import json
import sys

import torch
import triton

from based.ops.taylor.triton import chunk as K

sys.path.insert(0, "benchmarks")
from taylor_sweep import check  # noqa: E402

DQ_VARIANTS = [(32, 32, 8), (32, 32, 4), (16, 16, 4), (32, 16, 8), (16, 32, 8)]  # BWD_CHUNK, BWD_BV_MAX, BWD_WARPS
DKV_VARIANTS = [(32, 16, 8), (16, 16, 4), (32, 32, 8), (16, 32, 8), (32, 32, 4)]  # DKV_CHUNK, DKV_BV_MAX, DKV_WARPS


def main():
    T = int(sys.argv[1]) if len(sys.argv) > 1 else 8192
    B, H = 8, 16
    q, k = (torch.randn(B, T, H, 16, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    v = torch.randn(B, T, H, 64, device="cuda", dtype=torch.bfloat16)
    do = torch.randn_like(v)
    scale = 16 ** -0.5
    o, den, _, _ = K.taylor_chunk_fwd(q, k, v, None, None, None, scale, 1e-12, False)
    bwd = lambda: K.taylor_chunk_bwd(q, k, v, o, den, do, None, None, None, None, None, scale, 1e-12)  # noqa: E731
    default = (K.BWD_CHUNK, K.BWD_BV_MAX, K.BWD_WARPS, K.DKV_CHUNK, K.DKV_BV_MAX, K.DKV_WARPS)
    rows = [(c, False) for c in DQ_VARIANTS] + [(c, True) for c in DKV_VARIANTS]
    for cfg, is_dkv in rows:
        K.BWD_CHUNK, K.BWD_BV_MAX, K.BWD_WARPS, K.DKV_CHUNK, K.DKV_BV_MAX, K.DKV_WARPS = default
        if is_dkv:
            K.DKV_CHUNK, K.DKV_BV_MAX, K.DKV_WARPS = cfg
        else:
            K.BWD_CHUNK, K.BWD_BV_MAX, K.BWD_WARPS = cfg
        row = {"dkv" if is_dkv else "dq": list(cfg)}
        try:
            row["err"] = check()
            row["bwd_ms"] = triton.testing.do_bench(bwd, warmup=25, rep=100, return_mode="median")
        except Exception as e:  # noqa: BLE001 - a variant that does not compile is a result too
            row["error"] = repr(e)[:300]
        print(json.dumps(row), flush=True)
    K.BWD_CHUNK, K.BWD_BV_MAX, K.BWD_WARPS, K.DKV_CHUNK, K.DKV_BV_MAX, K.DKV_WARPS = default
    print(json.dumps({"fwd_ms": triton.testing.do_bench(
        lambda: K.taylor_chunk_fwd(q, k, v, None, None, None, scale, 1e-12, False), warmup=25, rep=100,
        return_mode="median")}), flush=True)


if __name__ == "__main__":
    main()
