"""RWKV-5 attention for training: the fused Triton kernels (based/ops/rwkv/triton.py) against the chunked PyTorch
form (chunk.py), at the MQAR figure-2 sweep's shapes: head size 64, H = d_model / 64 for d_model 64/128/256,
T 64/128/256, batch 256, k = 4 runs stacked by vmap (w_log, u per run), as `based mqar --sweep figure2` trains.

    BASED_GIT_REV=$(git rev-parse HEAD) python benchmarks/rwkv_attn.py [--runs 4] [--d-models 64 128 256]
        [--seqs 64 128 256] [--sweep] [--out PATH]

Per shape, milliseconds per call (CUDA events, median of --reps after warm-up):
- fwd_ms: vmap(op) forward;  fwd_bwd_ms: vmap(grad(loss)) over r, k, v, w_log, u (the stacked trainer's pattern);
- kernel_fwd_ms, kernel_bwd_ms (fused only): the launches on the folded tensors, nothing of vmap.
Each shape also checks the fused output and gradients against the chunked form's (max relative error).
--sweep times the kernels at each block size and warp count (at the largest shape). CUDA only. Prints one JSON
object (and writes it to --out) with the date, GPU and git revision.
"""
from __future__ import annotations

import argparse
import datetime
import itertools
import json
import os

import torch
from torch.func import grad, vmap

from based.ops.rwkv import triton as fused
from based.ops.rwkv.chunk import chunk_rwkv5_attn
from based.ops.rwkv.triton import fused_rwkv5_attn
from _timing import cuda_ms, rel_err  # benchmarks/ is on sys.path when run as a script

HEAD = 64
SETTINGS = ("BLOCK_V_FWD", "NUM_WARPS_FWD", "BLOCK_BWD", "NUM_WARPS_BWD")  # fused's block sizes and warps


def _inputs(k: int, b: int, T: int, H: int):
    """Per-run r, k, v [k, b, T, H, 64], w_log, u [k, H, 64] (decays from RWKV-5's init range), weights of o."""
    g = torch.Generator(device="cuda").manual_seed(0)
    shape = (k, b, T, H, HEAD)
    r, kk, v, wo = (torch.randn(shape, device="cuda", generator=g) for _ in range(4))
    w_log = -torch.exp(torch.empty(k, H, HEAD, device="cuda").uniform_(-6.0, 1.0, generator=g))
    u = torch.randn(k, H, HEAD, device="cuda", generator=g)
    return (r, kk, v, w_log, u), wo


def _op(name):
    if name == "fused":
        return fused_rwkv5_attn
    return lambda r, k, v, w_log, u: chunk_rwkv5_attn(r, k, v, w_log, u)[0]


def _loss(op):
    return lambda r, k, v, w_log, u, wo: (op(r, k, v, w_log, u) * wo).sum()


def _shape(runs, b, T, d_model, reps) -> dict:
    H = d_model // HEAD
    inputs, wo = _inputs(runs, b, T, H)
    out = {"d_model": d_model, "T": T, "H": H}
    results = {}
    for name in ("fused", "chunk"):
        op = _op(name)
        fwd = vmap(op)
        fwd_bwd = vmap(grad(_loss(op), argnums=(0, 1, 2, 3, 4)))
        try:
            results[name] = [fwd(*inputs)] + list(fwd_bwd(*inputs, wo))
            out[name] = {"fwd_ms": cuda_ms(lambda: fwd(*inputs), reps),
                         "fwd_bwd_ms": cuda_ms(lambda: fwd_bwd(*inputs, wo), reps)}
        except torch.OutOfMemoryError:
            torch.cuda.empty_cache()
            out[name] = {"fwd_ms": "oom", "fwd_bwd_ms": "oom"}
    out["fused"].update(_kernel_times(inputs, reps))
    if len(results) == 2:
        out["max_rel_err_vs_chunk"] = max(rel_err(a, b) for a, b in zip(*results.values()))
        if isinstance(out["chunk"]["fwd_bwd_ms"], float):
            out["speedup_fwd_bwd"] = round(out["chunk"]["fwd_bwd_ms"] / out["fused"]["fwd_bwd_ms"], 2)
    return out


def _folded(inputs):
    r, k, v, w_log, u = inputs
    return [x.flatten(0, 1).contiguous() for x in (r, k, v)] + [w_log.contiguous(), u.contiguous()]


def _kernel_times(inputs, reps: int) -> dict:
    args = _folded(inputs)
    do = torch.randn_like(args[2])
    return {"kernel_fwd_ms": cuda_ms(lambda: fused._fwd(*args), reps),
            "kernel_bwd_ms": cuda_ms(lambda: fused._bwd(*args, do), reps)}


def _sweep(runs, b, T, d_model, reps) -> dict:
    """Kernel times at each block size and warp count, forward and backward settings apart (restored after)."""
    inputs, _ = _inputs(runs, b, T, d_model // HEAD)
    args = _folded(inputs)
    do = torch.randn_like(args[2])
    grids = {"fwd": (("BLOCK_V_FWD", "NUM_WARPS_FWD"), ((16, 32, 64), (1, 2, 4)), lambda: fused._fwd(*args)),
             "bwd": (("BLOCK_BWD", "NUM_WARPS_BWD"), ((16, 32, 64), (1, 2, 4)), lambda: fused._bwd(*args, do))}
    out = {"d_model": d_model, "T": T}
    for kernel, (names, values, fn) in grids.items():
        saved = {n: getattr(fused, n) for n in names}
        rows = []
        try:
            for combo in itertools.product(*values):
                for n, val in zip(names, combo):
                    setattr(fused, n, val)
                rows.append({**dict(zip(names, combo)), "ms": cuda_ms(fn, reps)})
        finally:
            for n, val in saved.items():
                setattr(fused, n, val)
        out[kernel] = sorted(rows, key=lambda x: x["ms"])
    return out


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--runs", type=int, default=4)
    p.add_argument("--d-models", type=int, nargs="+", default=[64, 128, 256])
    p.add_argument("--seqs", type=int, nargs="+", default=[64, 128, 256])
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--sweep", action="store_true", help="kernel times per block size / warp count")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/rwkv_attn.py needs CUDA")
    cases = []
    for d_model, T in itertools.product(args.d_models, args.seqs):
        cases.append(_shape(args.runs, args.batch, T, d_model, args.reps))
        print(json.dumps(cases[-1]), flush=True)
    result = {"date": datetime.date.today().isoformat(), "gpu": torch.cuda.get_device_name(),
              "git_rev": os.environ.get("BASED_GIT_REV", "unknown"), "batch": args.batch, "runs": args.runs,
              "settings": {n: getattr(fused, n) for n in SETTINGS},
              "cases": cases}
    if args.sweep:
        result["sweep"] = _sweep(args.runs, args.batch, max(args.seqs), max(args.d_models), args.reps)
        print(json.dumps({k: v[:3] if isinstance(v, list) else v for k, v in result["sweep"].items()}), flush=True)
    print(json.dumps(result))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
