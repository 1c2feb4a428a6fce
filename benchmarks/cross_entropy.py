"""Linear cross-entropy for training: the fused Triton kernels (based/ops/cross_entropy/fused.py) against the
PyTorch form (the logits, then F.cross_entropy; BASED_CE_FUSED=0), at the MQAR figure-2 sweep's shapes: k = 4
runs stacked by vmap (hidden and head weight per run, targets shared), as `based.mqar.train.query_loss` calls
`based.ops.cross_entropy.linear_cross_entropy` in the stacked trainer: batch 256 x Q queries rows a run,
vocabulary 8192, widths D 64, 128, 256, TF32 matmuls (the trainer's setting).

    BASED_GIT_REV=$(git rev-parse HEAD) python benchmarks/cross_entropy.py [--out PATH]
    python benchmarks/cross_entropy.py --tiles [SPEC ...] [--dims 64] [--queries 4 64]   (the tile sweep)
    python benchmarks/cross_entropy.py --regs [--tiles SPEC ...]   (no GPU: registers, spills, shared memory)

Per case (D, Q; N = batch x Q rows a run), milliseconds per call (CUDA events over replays of a CUDA graph of
the call, median of --reps: the kernels without the host's vmap and dispatch time): fwd_ms of vmap(loss),
fwd_bwd_ms of vmap(grad(loss)) over hidden and weight, bwd_ms their difference; TFLOP/s counting 2 N V D
per pass over the logits and run: the fused forward 1 pass, its backward 4 (dh and dW each recompute the
logits before their own matmul), PyTorch's forward 1 and backward 2; and the fused path's largest relative
error (||a - b|| / ||b||) against the PyTorch form over the loss and both gradients (TF32 both ways).

--tiles SPEC ... (BMxBVxWARPS[xSTAGES], or FWD,BWD: BASED_CE_TILES of fused.py; no SPEC: TILE_SWEEP) times
the fused path at each spec beside the tables' tiles ("default"): pick the forward's tiles by fwd_ms, the
backward's by bwd_ms, per width, and write them into FWD_TILES / BWD_TILES. Each spec compiles the kernels
again (a few seconds a width). The default run (no --tiles) takes well under 2 minutes on an H100.

--regs compiles the kernels here for sm_90a (Triton's compiler, the ptxas it ships) at each width of --dims
and the tables' tiles or --tiles' specs: registers, spill bytes, shared memory and whether any load is
pipelined (cp.async in the PTX; the W tile of dh and the h tile of dW, each used by two matmuls, are not),
the static side of the choice. Otherwise CUDA only. Prints one JSON object (and writes it to --out) with
date, GPU, torch, revision (BASED_GIT_REV).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import subprocess
import sys
import tempfile

import torch
from _timing import cuda_ms, emit, rel_err  # benchmarks/ is on sys.path when run as a script

TILE_SWEEP = ["64x64x4x2", "64x64x8x2", "128x64x8x2", "128x64x8x3", "64x128x8x2", "128x128x8x2",
              "128x128x8x3"]


def _fused():
    from based.ops.cross_entropy import fused
    return fused


def _ops(fused: bool):
    """vmap(loss) and vmap(grad(loss)): the fused kernels called directly (linear_cross_entropy does not take
    them at every width: D > 128 keeps PyTorch's form), or linear_cross_entropy with BASED_CE_FUSED=0."""
    from torch.func import grad, vmap

    from based.ops.cross_entropy import linear_cross_entropy

    def fused_loss(h, w, t):  # linear_cross_entropy's rows, into the kernels whatever the width
        return _fused().fused_linear_cross_entropy(h.reshape(-1, h.shape[-1]), w, t.reshape(-1))

    loss = fused_loss if fused else linear_cross_entropy
    fwd = vmap(loss, in_dims=(0, 0, None))
    fwd_bwd = vmap(grad(loss, argnums=(0, 1)), in_dims=(0, 0, None))
    return fwd, fwd_bwd


def _time(fused: bool, tiles: str | None, h, w, t, reps: int):
    os.environ["BASED_CE_FUSED"] = "0"  # linear_cross_entropy's PyTorch form (read at each call; _ops(True) calls
    # the kernels directly)
    if tiles:
        os.environ["BASED_CE_TILES"] = tiles
    else:
        os.environ.pop("BASED_CE_TILES", None)
    fwd, fwd_bwd = _ops(fused)
    try:
        values = [fwd(h, w, t), *fwd_bwd(h, w, t)]
        times = {"fwd_ms": cuda_ms(lambda: fwd(h, w, t), reps, graph=True),
                 "fwd_bwd_ms": cuda_ms(lambda: fwd_bwd(h, w, t), reps, graph=True)}
    finally:
        os.environ.pop("BASED_CE_FUSED", None)
        os.environ.pop("BASED_CE_TILES", None)
    times["bwd_ms"] = round(times["fwd_bwd_ms"] - times["fwd_ms"], 3)
    return values, times


def _tflops(times: dict, pass_flop: float, bwd_passes: int) -> dict:
    """TFLOP/s of fwd (1 pass), bwd (bwd_passes) and fwd_bwd."""
    out = {}
    for key, passes in (("fwd", 1), ("bwd", bwd_passes), ("fwd_bwd", 1 + bwd_passes)):
        ms = times[f"{key}_ms"]
        out[f"{key}_tflops"] = round(passes * pass_flop / (ms * 1e-3) / 1e12, 1) if ms > 0 else None
    return out


def _case(runs, batch, queries, vocab, D, tile_specs, reps, device="cuda") -> dict:
    g = torch.Generator(device=device).manual_seed(0)
    h = torch.randn(runs, batch, queries, D, device=device, generator=g)
    w = torch.randn(runs, vocab, D, device=device, generator=g) / D**0.5 * 3  # logits of a few units
    t = torch.randint(0, vocab, (batch, queries), device=device, generator=g)
    N = batch * queries
    pass_flop = 2.0 * N * vocab * D * runs
    fused = _fused()
    plan = {}
    for name, backward in (("fwd", False), ("bwd", True)):
        c, split, per = fused._plan(h, runs, N, vocab, D, backward)
        plan[name] = {"tiles": f"{c.BM}x{c.BV}x{c.warps}x{c.stages}", "one_k": c.one_k, "split": split}
    out = {"D": D, "queries": queries, "N": N, "V": vocab, "runs": runs, "default_plan": plan}
    want, times = _time(False, None, h, w, t, reps)
    out["torch"] = {**times, **_tflops(times, pass_flop, 2)}
    out["fused"] = {}
    for spec in [None, *tile_specs]:
        try:
            got, times = _time(True, spec, h, w, t, reps)
        except Exception as e:  # noqa: BLE001 - a tile spec that does not launch (shared memory) is reported
            out["fused"][spec or "default"] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
            continue
        err = max(rel_err(a, b) for a, b in zip(got, want))
        row = {**times, **_tflops(times, pass_flop, 4), "max_rel_err_vs_torch": float(f"{err:.3g}"),
               "speedup_fwd_bwd": round(out["torch"]["fwd_bwd_ms"] / times["fwd_bwd_ms"], 2)}
        out["fused"][spec or "default"] = row
        del got
    del want
    if device == "cuda":
        torch.cuda.empty_cache()
    return out


KERNELS = (("fwd", "_fwd_kernel", False, {"PARTIAL": False}), ("fwd_partial", "_fwd_kernel", False, {"PARTIAL": True}),
           ("dh", "_dh_kernel", True, {}), ("dw", "_dw_kernel", True, {}))


def _ptxas() -> str | None:
    """CUDA 13's ptxas, shipped with Triton 3.9 beside an older plain ptxas that rejects its PTX version."""
    import triton

    bin_dir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    return next((os.path.join(bin_dir, n) for n in ("ptxas-blackwell", "ptxas")
                 if os.path.exists(os.path.join(bin_dir, n))), None)


def _kernel_stats(fn, c, extra: dict, ptxas: str | None) -> dict:
    """fn compiled for sm_90a at Config c: tiles, shared memory, cp.async and wgmma in the PTX, registers and
    spills by ptxas -v."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fused = _fused()
    ints = ("RN", "V", "D", "s_tr", "TPS")
    consts = dict(IGNORE=-100, BM=c.BM, BV=c.BV, BK=fused.BLOCK_K, BD=c.BD, ONE_K=c.one_k, PREC="tf32", **extra)
    sig = {a: "constexpr" if a in consts else "i32" if a in ints else "*i64" if a == "t" else "*fp32"
           for a in fn.arg_names}
    # as Triton's JIT specializes on a GPU: 16-byte aligned pointers, sizes divisible by 16 (D, the rows and the
    # vocabulary at the sweep's shapes); without the hints the loads are not vectorized
    attrs = {(i,): [["tt.divisibility", 16]] for i, a in enumerate(fn.arg_names)
             if sig[a].startswith("*") or a in ("RN", "V", "D", "s_tr")}
    try:
        ck = triton.compile(ASTSource(fn, sig, constexprs=consts, attrs=attrs), target=GPUTarget("cuda", 90, 64),
                            options={"num_warps": c.warps, "num_stages": c.stages})
    except Exception as e:  # noqa: BLE001 - reported per kernel
        return {"error": f"{type(e).__name__}: {str(e)[:200]}"}
    ptx = ck.asm["ptx"]
    out = {"tiles": f"{c.BM}x{c.BV}x{c.warps}x{c.stages}", "shared_bytes": ck.metadata.shared,
           "cp_async": "cp.async" in ptx, "wgmma": "wgmma" in ptx}
    if ptxas:
        with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
            f.write(ptx)
        info = subprocess.run([ptxas, "-v", "--gpu-name=sm_90a", f.name, "-o", os.devnull], capture_output=True,
                              text=True).stderr
        os.unlink(f.name)
        r = re.search(r"Used (\d+) registers", info)
        spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", info)
        out["registers"] = int(r.group(1)) if r else None
        out["spill_stores"], out["spill_loads"] = (int(x) for x in spills.groups()) if spills else (None, None)
    return out


def regs(dims: list[int], tile_specs: list[str]) -> dict:
    """{D: {spec: {kernel: _kernel_stats}}} compiled here for sm_90a, no GPU."""
    fused = _fused()
    ptxas = _ptxas()
    result = {}
    for D in dims:
        result[D] = {}
        for spec in tile_specs or [None]:
            if spec:
                os.environ["BASED_CE_TILES"] = spec
            try:
                row = {name: _kernel_stats(getattr(fused, fn), fused.config(D, backward), extra, ptxas)
                       for name, fn, backward, extra in KERNELS}
            finally:
                os.environ.pop("BASED_CE_TILES", None)
            result[D][spec or "default"] = row
            print(json.dumps({"D": D, "tiles": spec or "default", **row}), flush=True)
    return result


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--runs", type=int, default=4, help="stacked runs (vmap)")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--queries", type=int, nargs="+", default=[4, 16, 64], help="queries an example: N = batch x Q")
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--dims", type=int, nargs="+", default=[64, 128, 256], help="hidden widths D")
    p.add_argument("--tiles", nargs="*", default=None,
                   help=f"tile specs to time beside the tables' (none given: {' '.join(TILE_SWEEP)})")
    p.add_argument("--regs", action="store_true", help="registers / spills / shared memory at sm_90a, no GPU")
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if args.tiles is not None and not args.tiles:
        args.tiles = list(TILE_SWEEP)
    fused = _fused()
    for spec in args.tiles or []:
        for part in spec.split(","):
            try:
                fused.parse_tiles(part)
            except ValueError as e:
                p.error(str(e))
    return args


def main(argv=None):
    args = parse_args(argv)
    head = {"date": datetime.date.today().isoformat(), "torch": torch.__version__,
            "git_rev": os.environ.get("BASED_GIT_REV", "unknown")}
    if args.regs:
        result = {**head, "target": "sm_90a (compiled here, no GPU)", "regs": regs(args.dims, args.tiles or [])}
    else:
        if not torch.cuda.is_available():
            sys.exit("benchmarks/cross_entropy.py times CUDA kernels and needs a CUDA GPU (none here); "
                     "--regs compiles them for sm_90a without one")
        torch.set_float32_matmul_precision("high")
        result = {**head, "gpu": torch.cuda.get_device_name(),
                  "sms": torch.cuda.get_device_properties(0).multi_processor_count, "runs": args.runs,
                  "batch": args.batch, "vocab": args.vocab, "timing": "CUDA graph replays",
                  "flop_count": "2 N V D x runs a pass; fused: fwd 1, bwd 4; torch: fwd 1, bwd 2",
                  "tiles_swept": args.tiles or [], "cases": []}
        for D in args.dims:
            for q in args.queries:
                row = _case(args.runs, args.batch, q, args.vocab, D, args.tiles or [], args.reps)
                result["cases"].append(row)
                print(json.dumps(row), flush=True)
    emit(result, args.out)


if __name__ == "__main__":
    main()
