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
--pipeline also times the backward with its loads pipelined (fused.PIPELINE_BWD = 2, off by default) and
compares its gradients with the unpipelined kernel's (equal is the condition for turning it on).
Prints one JSON object (and writes it to --out) with the date, GPU and git revision.

--sass needs no GPU: it compiles both kernels for sm_90a at each shape (triton.compile, then the ptxas and
cuobjdump that ship with Triton) and prints, per kernel, registers, spills, shared memory and the instruction
mix of its innermost loop (shuffles, exps, barriers, fences, spill reloads): what the notes in fused.py quote.
The forward is compiled once per block of states it launches (24 = 16 + 8), and its chunk loop's instructions
are summed over the blocks per element (one step, channel and state): fwd_instructions_per_element.
"""
from __future__ import annotations

import argparse
import datetime
import itertools
import json
import collections
import os
import re
import subprocess
import tempfile

import torch
from torch.func import vmap

from _timing import cuda_ms  # benchmarks/ is on sys.path when run as a script
from based.ops.ssm import fused
from based.ops.ssm.chunk import chunk_selective_scan
from based.ops.ssm.fused import fused_selective_scan

KNOBS = ("STATES_BWD", "NUM_WARPS_BWD", "MAXNREG_BWD", "CHANNELS_BWD", "TILE_BWD")  # fused's backward settings


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
        "fwd_ms": cuda_ms(lambda: fused._fwd(u, delta, A, B, C, Dskip, None), reps),
        "bwd_ms": cuda_ms(lambda: fused._bwd(u, delta, A, B, C, Dskip, ckpt, dy, dhT), reps),
    }


def _pipeline_check(args5, reps: int) -> dict:
    """The backward with load pipelining (fused.PIPELINE_BWD = 2, off by default until checked here): its time,
    and its gradients against the unpipelined kernel's (they must be equal: same arithmetic, same order)."""
    u, delta, A, B, C, Dskip = args5
    y, hT, ckpt = fused._fwd(u, delta, A, B, C, Dskip, None)
    dy, dhT = torch.randn_like(y), torch.zeros_like(hT)
    saved = fused.PIPELINE_BWD
    try:
        fused.PIPELINE_BWD = 1
        plain = fused._bwd(u, delta, A, B, C, Dskip, ckpt, dy, dhT)
        fused.PIPELINE_BWD = 2
        piped = fused._bwd(u, delta, A, B, C, Dskip, ckpt, dy, dhT)
        ms = cuda_ms(lambda: fused._bwd(u, delta, A, B, C, Dskip, ckpt, dy, dhT), reps)
    finally:
        fused.PIPELINE_BWD = saved
    diff = max((a - b).abs().max().item() for a, b in zip(plain, piped) if a is not None and b is not None)
    return {"pipelined_bwd_ms": ms, "max_abs_diff_vs_unpipelined": diff}


def _vmap_times(scan, inputs, reps: int) -> dict:
    leaves = [t.clone().requires_grad_() for t in inputs]
    f = vmap(lambda u, dt, A, B, C, D: scan(u, dt, A, B, C, D)[0])
    try:
        y = f(*leaves)
        dy = torch.randn_like(y)
        fwd = cuda_ms(lambda: f(*leaves), reps)

        def fwd_bwd():
            torch.autograd.grad(f(*leaves), leaves, dy)

        total = cuda_ms(fwd_bwd, reps)
    except torch.OutOfMemoryError:
        torch.cuda.empty_cache()
        return {"fwd_ms": "oom", "bwd_ms": "oom"}
    return {"fwd_ms": fwd, "bwd_ms": round(total - fwd, 3)}


def _sass(fn, consts: dict, ints: tuple, options: dict) -> dict:
    """Registers, spills, shared bytes and the innermost loop's instruction counts of fn for sm_90a."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    sig = {a: "constexpr" if a in consts else "i32" if a in ints else "*fp32" for a in fn.arg_names}
    # Triton's JIT marks pointers 16-byte aligned; without the hint the loads are not the GPU build's.
    attrs = {(i,): [["tt.divisibility", 16]] for i, a in enumerate(fn.arg_names) if sig[a] == "*fp32"}
    ck = triton.compile(ASTSource(fn, sig, constexprs=consts, attrs=attrs), target=GPUTarget("cuda", 90, 64),
                        options=options)
    bin_dir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    with tempfile.TemporaryDirectory() as tmp:
        ptx, cubin = os.path.join(tmp, "k.ptx"), os.path.join(tmp, "k.cubin")
        with open(ptx, "w") as f:
            f.write(ck.asm["ptx"])
        # ptxas-blackwell (CUDA 13): the plain ptxas beside it rejects Triton 3.9's PTX version
        ptxas = [os.path.join(bin_dir, "ptxas-blackwell"), "-v", "--gpu-name=sm_90a", ptx, "-o", cubin]
        info = subprocess.run(ptxas, capture_output=True, text=True).stderr
        sass = subprocess.run([os.path.join(bin_dir, "cuobjdump"), "-sass", cubin], capture_output=True,
                              text=True).stdout
    addr, pred = r"/\*([0-9a-f]{4,})\*/\s+", r"(?:@!?U?P\w+\s+)?"
    ops = {int(a, 16): op for a, op in re.findall(addr + pred + r"([A-Z][A-Z0-9_.]*)", sass)}
    branches = [(int(t, 16), int(a, 16)) for a, t in re.findall(addr + pred + r"BRA\S*\s+0x([0-9a-f]+)", sass)]
    loops = [(a - t, t, a) for t, a in branches if t < a]
    _, lo, hi = min(loops) if loops else (0, 0, 0)
    inner = collections.Counter(op.split(".")[0] for a, op in ops.items() if lo <= a <= hi)
    num = lambda pat: int(m.group(1)) if (m := re.search(pat, info)) else None  # noqa: E731
    return {"registers": num(r"Used (\d+) registers"), "spill_stores": num(r"(\d+) bytes spill stores"),
            "shared": ck.metadata.shared, "inner_loop": {"instructions": sum(inner.values()),
            **{k: inner[k] for k in ("SHFL", "MUFU", "BAR", "MEMBAR", "LDL", "STL", "FFMA", "FMUL", "FADD", "LDS")}}}


def sass_report(T: int, dims, states, runs: int) -> dict:
    """_sass of both kernels at each (runs x d_inner, N), as _fwd and _bwd would launch them: the forward once per
    state block (fused._state_blocks), with its instructions per element (one step of one channel and state)."""
    out = []
    for D in dims:
        for N in states:
            dim, G = runs * D, runs
            fwd, per_element = [], 0.0
            for meta in fused._fwd_launches(T, dim, G, N):
                programs, warps = meta.pop("programs"), meta.pop("num_warps")
                consts = dict(HAS_D=True, HAS_H0=False, SAVE_CKPT=True, **meta)
                counts = _sass(fused._fwd_kernel, consts, ("T", "DIM", "G", "N", "DG", "NC"), {"num_warps": warps})
                # the inner loop is one chunk: CH steps of the block's channels, per thread
                per_element += counts["inner_loop"]["instructions"] * 32 * warps * programs / (meta["CH"] * dim * N)
                fwd.append({"N0": meta["N0"], "BN": meta["BN"], "BD": meta["BD"], "num_warps": warps, **counts})
            out.append({"d_inner": D, "d_state": N, "channels": dim, "fwd": fwd,
                        "fwd_instructions_per_element": round(per_element, 1),
                        "bwd": _sass(fused._bwd_kernel, fused._bwd_meta(T, dim, G, N), ("T", "NC"),
                                     {"num_warps": fused.NUM_WARPS_BWD, "maxnreg": fused.MAXNREG_BWD})})
            print(json.dumps(out[-1]), flush=True)
    return {"date": datetime.date.today().isoformat(), "target": "sm_90a (offline compile)",
            "git_rev": os.environ.get("BASED_GIT_REV", "unknown"), "cases": out}


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
    p.add_argument("--pipeline", action="store_true",
                   help="also time the backward with load pipelining (PIPELINE_BWD = 2) and check its gradients")
    p.add_argument("--sass", action="store_true", help="no GPU: compile for sm_90a and count instructions")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    if args.sass:
        result = sass_report(args.seq, args.dims, args.states, args.runs)
        print(json.dumps(result))
        if args.out:
            with open(args.out, "w") as f:
                json.dump(result, f, indent=1)
        return
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
            if args.pipeline:
                kernel.update(_pipeline_check(folded, args.reps))
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
