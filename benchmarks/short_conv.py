"""Short causal depthwise conv for training: the fused Triton kernels (based/ops/conv/fused.py) against the PyTorch
form (transpose, zero padding, cuDNN's depthwise conv), at the MQAR figure-2 sweep's shapes: batch 256, k = 4 runs
stacked by vmap (weights per run), as `based mqar --sweep figure2` trains.

    BASED_GIT_REV=$(git rev-parse HEAD) python benchmarks/short_conv.py [--runs 4] [--seqs 64 256] [--out PATH]

Cases (channels C, taps K, SiLU after): Zoology's BaseConv at d_model 128 (128, 3), Mamba's conv at d_model 128
and 256 (d_inner 256 / 512, 4, SiLU), H3's shift conv at d_model 128 (C 128, K = N = 32). Per case, milliseconds
per call (CUDA events over replays of a CUDA graph of the call, median of --reps: the kernels without the
host's vmap and dispatch time): fwd_ms of vmap(op) and fwd_bwd_ms of vmap(grad(loss)) over x, weight
and bias (the stacked trainer's pattern), and the fused path's max relative error against the PyTorch form.
CUDA only; prints one JSON object (and writes it to --out) with date, GPU, revision.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os

import torch
from torch.func import grad, vmap

from based.ops.conv import short_conv
from _timing import cuda_ms, emit, rel_err  # benchmarks/ is on sys.path when run as a script

CASES = {"baseconv-128": (128, 3, False), "mamba-128": (256, 4, True), "mamba-256": (512, 4, True),
         "h3-shift-128": (128, 32, False)}


def _op(fused: bool, silu: bool):
    def op(x, w, b):
        os.environ["BASED_CONV_FUSED"] = "1" if fused else "0"  # read at each call
        return short_conv(x, w, b, activation="silu" if silu else None)[0]
    return op


def _case(runs, batch, T, C, K, silu, reps) -> dict:
    g = torch.Generator(device="cuda").manual_seed(0)
    x, wy = (torch.randn(runs, batch, T, C, device="cuda", generator=g) for _ in range(2))
    w = torch.randn(runs, C, K, device="cuda", generator=g) / K**0.5
    b = torch.randn(runs, C, device="cuda", generator=g)
    out, results = {"C": C, "K": K, "silu": silu, "T": T}, {}
    for name, fused in (("fused", True), ("torch", False)):
        op = _op(fused, silu)
        fwd = vmap(op)
        fwd_bwd = vmap(grad(lambda x, w, b, wy: (op(x, w, b) * wy).sum(), argnums=(0, 1, 2)))
        results[name] = [fwd(x, w, b), *fwd_bwd(x, w, b, wy)]
        out[name] = {"fwd_ms": cuda_ms(lambda: fwd(x, w, b), reps, graph=True),
                     "fwd_bwd_ms": cuda_ms(lambda: fwd_bwd(x, w, b, wy), reps, graph=True)}
    out["max_rel_err_vs_torch"] = max(rel_err(a, r) for a, r in zip(*results.values()))
    out["speedup_fwd_bwd"] = round(out["torch"]["fwd_bwd_ms"] / out["fused"]["fwd_bwd_ms"], 2)
    return out


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--runs", type=int, default=4)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--seqs", type=int, nargs="+", default=[64, 256])
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    torch.set_float32_matmul_precision("high")
    result = {"date": datetime.date.today().isoformat(), "gpu": torch.cuda.get_device_name(),
              "torch": torch.__version__, "git_rev": os.environ.get("BASED_GIT_REV", "unknown"),
              "runs": args.runs, "batch": args.batch, "timing": "CUDA graph replays", "cases": []}
    for T in args.seqs:
        for name, (C, K, silu) in CASES.items():
            row = {"case": name, **_case(args.runs, args.batch, T, C, K, silu, args.reps)}
            result["cases"].append(row)
            print(json.dumps(row), flush=True)
    os.environ.pop("BASED_CONV_FUSED", None)
    emit(result, args.out)


if __name__ == "__main__":
    main()
