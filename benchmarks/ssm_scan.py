"""The fused selective scan (based/ops/ssm/fused.py) against the chunked PyTorch scan, forward and backward, on
the GPU, at MQAR's Mamba shapes: batch 256, T 256, d_inner D in 128/256/512, state N in 8/16/24, and k = 4 runs
stacked by vmap, which the fused scan folds into 4 D channels and 4 groups of B, C.

    BASED_GIT_REV=$(git rev-parse HEAD) python benchmarks/ssm_scan.py [--runs 4] [--dims 128 256 512]
        [--states 8 16 24] [--sweep] [--out PATH]

Per shape, milliseconds per call (CUDA events, median of --reps after warm-up):
- fused kernel: _fwd and _bwd on the folded tensors, i.e. the two Triton launches (plus the backward's small
  PyTorch sums of its partials), nothing of vmap;
- fused vmap: vmap(fused_selective_scan) forward, and its backward through autograd (folds, copies included);
- chunk vmap: the same for chunk_selective_scan (keeps [b, T, D, N] tensors: "oom" where it does not fit).
--sweep adds the backward kernel at each STATES_BWD x NUM_WARPS_BWD x MAXNREG_BWD x CHANNELS_BWD (at
--sweep-dims; each setting compiles anew, so sweep one shape at a time: --dims 512 --states 24 --sweep).
Prints one JSON object (and writes it to --out) with the date, GPU and git revision.
"""
from __future__ import annotations

import argparse
import datetime
import itertools
import json
import os
import statistics

import torch
from torch.func import vmap

from based.ops.ssm import fused
from based.ops.ssm.chunk import chunk_selective_scan
from based.ops.ssm.fused import fused_selective_scan

KNOBS = ("STATES_BWD", "NUM_WARPS_BWD", "MAXNREG_BWD", "CHANNELS_BWD", "TILE_BWD")  # fused's backward settings


def _ms(fn, reps: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return round(statistics.median(times), 3)


def _inputs(k: int, b: int, T: int, D: int, N: int, device="cuda"):
    """Per-run u, delta [k, b, T, D], A [k, D, N], B, C [k, b, T, N], D [k, D], MQAR Mamba-like values."""
    g = torch.Generator(device=device).manual_seed(0)
    u = torch.randn(k, b, T, D, device=device, generator=g)
    delta = torch.nn.functional.softplus(torch.randn(k, b, T, D, device=device, generator=g) - 4.0)
    A = -torch.arange(1, N + 1, device=device, dtype=torch.float32).expand(k, D, N).contiguous()
    B = torch.randn(k, b, T, N, device=device, generator=g)
    C = torch.randn(k, b, T, N, device=device, generator=g)
    Dskip = torch.ones(k, D, device=device)
    return u, delta, A, B, C, Dskip


def _folded(u, delta, A, B, C, Dskip):
    """The k runs as one problem of k D channels and k groups, as fused.SelectiveScan.vmap builds it."""
    k, b, T, D = u.shape
    fold = lambda x: x.permute(1, 2, 0, 3).reshape(b, T, k * D).contiguous()  # noqa: E731
    return (fold(u), fold(delta), A.reshape(k * D, -1).contiguous(),
            B.permute(1, 2, 0, 3).contiguous(), C.permute(1, 2, 0, 3).contiguous(), Dskip.reshape(-1).contiguous())


def _kernel_times(args5, reps: int) -> dict:
    u, delta, A, B, C, Dskip = args5
    y, hT, ckpt = fused._fwd(u, delta, A, B, C, Dskip, None)
    dy, dhT = torch.randn_like(y), torch.zeros_like(hT)
    return {
        "fwd_ms": _ms(lambda: fused._fwd(u, delta, A, B, C, Dskip, None), reps),
        "bwd_ms": _ms(lambda: fused._bwd(u, delta, A, B, C, Dskip, ckpt, dy, dhT), reps),
    }


def _vmap_times(scan, inputs, reps: int) -> dict:
    leaves = [t.clone().requires_grad_() for t in inputs]
    f = vmap(lambda u, dt, A, B, C, D: scan(u, dt, A, B, C, D)[0])
    try:
        y = f(*leaves)
        dy = torch.randn_like(y)
        fwd = _ms(lambda: f(*leaves), reps)

        def fwd_bwd():
            torch.autograd.grad(f(*leaves), leaves, dy)

        total = _ms(fwd_bwd, reps)
    except torch.OutOfMemoryError:
        torch.cuda.empty_cache()
        return {"fwd_ms": "oom", "bwd_ms": "oom"}
    return {"fwd_ms": fwd, "bwd_ms": round(total - fwd, 3)}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--runs", type=int, default=4)
    p.add_argument("--dims", type=int, nargs="+", default=[128, 256, 512])
    p.add_argument("--states", type=int, nargs="+", default=[8, 16, 24])
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--sweep", action="store_true")
    p.add_argument("--sweep-dims", type=int, nargs="+", default=[512], help="d_inner values to --sweep at")
    p.add_argument("--no-chunk", action="store_true", help="skip the chunked scan")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    result = {"date": datetime.date.today().isoformat(), "gpu": torch.cuda.get_device_name(),
              "torch": torch.__version__, "git_rev": os.environ.get("BASED_GIT_REV", "unknown"),
              "batch": args.batch, "seq": args.seq, "runs": args.runs,
              "defaults": {n: getattr(fused, n) for n in KNOBS[:4]}, "cases": []}
    for D in args.dims:
        for N in args.states:
            inputs = _inputs(args.runs, args.batch, args.seq, D, N)
            folded = _folded(*inputs)
            case = {"d_inner": D, "d_state": N, "channels": args.runs * D, "groups": args.runs,
                    "bwd_meta": fused._bwd_meta(args.seq, args.runs * D, args.runs, N)}
            kernel = case["fused_kernel"] = _kernel_times(folded, args.reps)
            kernel["bwd_over_fwd"] = round(kernel["bwd_ms"] / kernel["fwd_ms"], 2)
            case["fused_vmap"] = _vmap_times(fused_selective_scan, inputs, args.reps)
            if not args.no_chunk:
                case["chunk_vmap"] = _vmap_times(chunk_selective_scan, inputs, args.reps)
            if args.sweep and D in args.sweep_dims:
                sweep = []
                saved = [getattr(fused, n) for n in KNOBS]
                # STATES_BWD only changes N that is not a power of two (above 8)
                states = (8, None) if N > 8 and N & (N - 1) else (None,)
                for config in itertools.product(states, (1, 2), (None, 184, 168, 128), (32, 64, 128)):
                    for n, v in zip(KNOBS, config + (fused.CHUNK * 32 * config[1],)):
                        setattr(fused, n, v)
                    t = _kernel_times(folded, args.reps)
                    sweep.append({**dict(zip(KNOBS, config)), "bwd_ms": t["bwd_ms"]})
                for n, v in zip(KNOBS, saved):
                    setattr(fused, n, v)
                case["bwd_sweep"] = sweep
            result["cases"].append(case)
            print(json.dumps(case), flush=True)
            del inputs, folded
            torch.cuda.empty_cache()
    print(json.dumps(result))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
