"""Fused Triton decayed linear attention (based/ops/decay/triton.py) against the chunked PyTorch form, forward
and forward + backward, at the MQAR figure-2 sweep's shapes: batch 256, k = 4 runs stacked by vmap, T 256.

    BASED_GIT_REV=$(git rev-parse HEAD) python benchmarks/decay_attn.py [--T 64 128 256] [--runs 4]
        [--dtype fp32|bf16] [--matmul-precision high|highest] [--sweep] [--out PATH]

Shapes: Mamba-2 (d_model 64..256 -> d_inner 128..512, H = d_inner / 64, dk = N in 8/16/24, dv = 64, log-decay
per token) and Lightning (d_model 64/128/256, H 1/4/16, dk = dv = d_model / H, log-decay constant per head).
Per shape, milliseconds (CUDA events, median of --reps after warm-up) of vmap(attn) forward, and of the forward
plus autograd's backward for a fixed dO. Prints one JSON object (and writes it to --out) with the date, GPU and
git revision (BASED_GIT_REV). --sweep times the fused form at each chunk size, warps and pipeline stages
(triton.py's CHUNK, NUM_WARPS, NUM_STAGES) at a few shapes instead.
"""
from __future__ import annotations

import argparse
import datetime
import itertools
import json
import os

import torch
from torch.func import vmap

from based.ops.decay import chunk_decay_linear_attn, fused_decay_linear_attn
from based.ops.decay import triton as fused
from _timing import cuda_ms  # benchmarks/ is on sys.path when run as a script


def shapes() -> list[dict]:
    out = []
    for d_model in (64, 128, 256):
        for N in (8, 16, 24):
            out.append(dict(model="mamba2", d_model=d_model, H=2 * d_model // 64, dk=N, dv=64, per_token=True))
    for d_model in (64, 128, 256):
        for H in (1, 4, 16):
            out.append(dict(model="lightning", d_model=d_model, H=H, dk=d_model // H, dv=d_model // H,
                            per_token=False))
    return out


def _inputs(k, b, T, H, dk, dv, per_token, dtype):
    gen = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(k, b, T, H, dk, device="cuda", generator=gen).to(dtype)
    kk = torch.randn(k, b, T, H, dk, device="cuda", generator=gen).to(dtype)
    v = torch.randn(k, b, T, H, dv, device="cuda", generator=gen).to(dtype)
    g = -0.5 * torch.rand(*((k, b, T, H) if per_token else (k, H)), device="cuda", generator=gen)
    return [t.requires_grad_() for t in (q, kk, v, g)]


def _time(attn, inputs, reps):
    batched = vmap(lambda q, k, v, g: attn(q, k, v, g))
    do = torch.randn_like(inputs[2])

    def fwd():
        with torch.no_grad():
            batched(*inputs)

    def fwd_bwd():
        batched(*inputs).backward(do)
        for t in inputs:
            t.grad = None

    return dict(fwd=cuda_ms(fwd, reps), fwd_bwd=cuda_ms(fwd_bwd, reps))


def _result(args, rows) -> dict:
    result = dict(
        date=datetime.date.today().isoformat(), gpu=torch.cuda.get_device_name(),
        git_rev=os.environ.get("BASED_GIT_REV", "unknown"), batch=args.batch, runs=args.runs, dtype=args.dtype,
        matmul_precision=args.matmul_precision, torch=torch.__version__, rows=rows,
    )
    print(json.dumps(result))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    return result


SWEEP_SHAPES = [  # the sweep's most common Mamba-2 shape and Lightning's narrowest and widest heads
    dict(model="mamba2", H=4, dk=16, dv=64, per_token=True),
    dict(model="lightning", H=16, dk=16, dv=16, per_token=False),
    dict(model="lightning", H=1, dk=256, dv=256, per_token=False),
]


def sweep(args) -> None:
    """Fused forward + backward at each setting of triton.py's knobs (each compiles anew)."""
    dtype = torch.float32 if args.dtype == "fp32" else torch.bfloat16
    rows = []
    for s in SWEEP_SHAPES:
        inputs = _inputs(args.runs, args.batch, args.T[0], s["H"], s["dk"], s["dv"], s["per_token"], dtype)
        for chunk, warps, stages in itertools.product((16, 32, 64), (4, 8), (1, 2)):
            fused.CHUNK, fused.NUM_WARPS, fused.NUM_STAGES = chunk, warps, stages
            try:
                row = dict(s, T=args.T[0], CHUNK=chunk, NUM_WARPS=warps, NUM_STAGES=stages,
                           fused=_time(fused_decay_linear_attn, inputs, args.reps))
            except Exception as e:  # noqa: BLE001 - out of resources at a setting is a result
                row = dict(s, CHUNK=chunk, NUM_WARPS=warps, NUM_STAGES=stages, error=f"{type(e).__name__}")
            rows.append(row)
            print(json.dumps(row), flush=True)
    _result(args, rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--T", type=int, nargs="+", default=[256])
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--runs", type=int, default=4)
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--matmul-precision", choices=("highest", "high"), default="high",
                   help="torch.set_float32_matmul_precision for both forms: high (TF32) as the MQAR trainers set")
    p.add_argument("--sweep", action="store_true",
                   help="time the fused form at each CHUNK x NUM_WARPS x NUM_STAGES of triton.py instead")
    p.add_argument("--out")
    args = p.parse_args()
    torch.set_float32_matmul_precision(args.matmul_precision)
    if args.sweep:
        return sweep(args)
    dtype = torch.float32 if args.dtype == "fp32" else torch.bfloat16
    chunk = lambda q, k, v, g: chunk_decay_linear_attn(q, k, v, g)[0]  # noqa: E731
    rows = []
    for T in args.T:
        for s in shapes():
            inputs = _inputs(args.runs, args.batch, T, s["H"], s["dk"], s["dv"], s["per_token"], dtype)
            row = dict(s, T=T, fused=_time(fused_decay_linear_attn, inputs, args.reps))
            try:
                row["chunk"] = _time(chunk, inputs, args.reps)
                row["speedup_fwd_bwd"] = round(row["chunk"]["fwd_bwd"] / row["fused"]["fwd_bwd"], 2)
            except torch.OutOfMemoryError:
                row["chunk"] = "oom"
            torch.cuda.empty_cache()
            rows.append(row)
            print(json.dumps(row), flush=True)
    _result(args, rows)


if __name__ == "__main__":
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/decay_attn.py needs a CUDA device")
    main()
