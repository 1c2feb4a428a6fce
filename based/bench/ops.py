"""Op benchmark: Taylor linear attention kernels against fla 0.6 and PyTorch SDPA flash attention.

    python -m based.bench.ops [--out benchmarks/results/ops-h200-DATE.json] [--quick]

Forward and forward+backward at B=8, H=16, feature dim 16, head dim 64, bf16, T = 1024 .. 16384, all
in one run, timed with triton.testing.do_bench medians; then the decode step against batch size, with
achieved bandwidth over a measured device-to-device copy. Prints a table and writes a JSON.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import torch

from ..commands import HelpFormatter

B, H, D, DV = 8, 16, 16, 64
LENGTHS = (1024, 2048, 4096, 8192, 16384)
DECODE_BATCHES = (1, 16, 64, 256, 1024, 4096)


def _git_rev() -> str:
    if os.environ.get("BASED_GIT_REV"):  # the device copy of the tree has no .git
        return os.environ["BASED_GIT_REV"]
    try:
        return subprocess.check_output(["git", "rev-parse", "HEAD"], text=True, stderr=subprocess.DEVNULL).strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _bench(fn, mode: str = "median") -> float:
    """ms per call; mode "mean" for calls whose cost cycles (a decode step that folds every few tokens)."""
    import triton

    return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode=mode))


def _methods():
    """name -> f(q, k, v) -> o, all on [B, T, H, D] bf16 (SDPA gets head dim 64 for q and k)."""
    from based.ops.taylor.triton import triton_taylor_linear_attn

    methods = {
        "based_triton": lambda q, k, v: triton_taylor_linear_attn(q, k, v)[0],  # form auto: chunkwise here
        "based_triton_fused": lambda q, k, v: triton_taylor_linear_attn(q, k, v, form="fused")[0],
    }
    try:
        from fla.ops.based import fused_chunk_based, parallel_based

        methods["fla_parallel_based"] = lambda q, k, v: parallel_based(q, k, v)
        methods["fla_fused_chunk_based"] = lambda q, k, v: fused_chunk_based(q, k, v)
    except Exception as e:  # noqa: BLE001 - fla is optional: record why it is missing
        print(f"fla not available: {e!r}", file=sys.stderr)

    def sdpa(q, k, v):
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)

    methods["sdpa_flash_d64"] = sdpa
    return methods


def _inputs(name, T, device, requires_grad):
    g = torch.Generator(device=device).manual_seed(T)
    if name.startswith("sdpa"):
        shapes = [(B, H, T, DV)] * 3
    else:
        shapes = [(B, T, H, D), (B, T, H, D), (B, T, H, DV)]
    return [torch.randn(s, device=device, dtype=torch.bfloat16, generator=g).requires_grad_(requires_grad)
            for s in shapes]


def bench_prefill(lengths=LENGTHS, device="cuda"):
    rows = []
    for name, f in _methods().items():
        for T in lengths:
            row = {"method": name, "T": T}
            try:
                q, k, v = _inputs(name, T, device, False)
                row["fwd_ms"] = _bench(lambda: f(q, k, v))
                q, k, v = _inputs(name, T, device, True)
                do = torch.randn_like(f(q, k, v))
                row["fwd_bwd_ms"] = _bench(lambda: torch.autograd.grad(f(q, k, v), (q, k, v), do))
            except Exception as e:  # noqa: BLE001 - keep the rest of the table
                row["error"] = repr(e)[:300]
            del q, k, v
            torch.cuda.empty_cache()
            print(json.dumps(row), flush=True)
            rows.append(row)
    return rows


def copy_bandwidth(device="cuda", nbytes=2 << 30) -> float:
    """Device-to-device copy, bytes read + written per second (GB/s)."""
    x = torch.empty(nbytes // 4, device=device, dtype=torch.float32).uniform_()
    y = torch.empty_like(x)
    ms = _bench(lambda: y.copy_(x))
    return 2 * nbytes / ms / 1e6


def bench_decode(batches=DECODE_BATCHES, device="cuda", feature_map="compact"):
    from based.ops.taylor import taylor_feature_dim, taylor_linear_attn_step, zero_state

    F = taylor_feature_dim(D, feature_map)
    rows = []
    for batch in batches:
        kv, ks = zero_state(batch, H, D, DV, device, feature_map)
        kv.normal_()
        ks.uniform_(1, 2)
        q, k = (torch.randn(batch, H, D, device=device, dtype=torch.bfloat16) for _ in range(2))
        v = torch.randn(batch, H, DV, device=device, dtype=torch.bfloat16)
        ms = _bench(lambda: taylor_linear_attn_step(q, k, v, kv, ks, feature_map, backend="triton"))
        ms_torch = _bench(lambda: taylor_linear_attn_step(q, k, v, kv, ks, feature_map, backend="torch"))
        # State read and written once; q, k, v read and o written once.
        nbytes = batch * H * (2 * 4 * (F * DV + F) + 2 * (2 * D + 2 * DV))
        row = {"batch": batch, "heads": H, "feature_map": feature_map, "step_ms": ms, "torch_step_ms": ms_torch,
               "bytes": nbytes, "GBps": nbytes / ms / 1e6}
        print(json.dumps(row), flush=True)
        rows.append(row)
        del kv, ks
        torch.cuda.empty_cache()
    return rows


def _table(prefill, decode, copy_gbps) -> str:
    methods = list(dict.fromkeys(r["method"] for r in prefill))
    lengths = sorted({r["T"] for r in prefill})
    by = {(r["method"], r["T"]): r for r in prefill}
    lines = []
    for key, title in (("fwd_ms", "forward (ms)"), ("fwd_bwd_ms", "forward + backward (ms)")):
        lines.append(f"\n{title}, B={B} H={H} d={D} dv={DV} bf16")
        lines.append("| T | " + " | ".join(methods) + " |")
        lines.append("|---" * (len(methods) + 1) + "|")
        for T in lengths:
            cells = []
            for m in methods:
                r = by.get((m, T), {})
                cells.append(f"{r[key]:.3f}" if key in r else "err")
            lines.append(f"| {T} | " + " | ".join(cells) + " |")
    lines.append(f"\ndecode step, H={H} d={D} dv={DV} compact, copy bandwidth {copy_gbps:.0f} GB/s")
    lines.append("| batch | step (ms) | torch step (ms) | GB/s | % of copy |")
    lines.append("|---|---|---|---|---|")
    for r in decode:
        lines.append(f"| {r['batch']} | {r['step_ms']:.4f} | {r['torch_step_ms']:.4f} | {r['GBps']:.0f} | "
                     f"{100 * r['GBps'] / copy_gbps:.0f}% |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="based bench ops", description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--out", type=Path, default=None, help="JSON path (default benchmarks/results/ops-<gpu>-<date>.json)")
    p.add_argument("--quick", action="store_true", help="T in (1024, 8192) and three decode batches")
    p.add_argument("--lengths", type=int, nargs="*", default=None,
                   help="sequence lengths T of the prefill table (default: 1024 to 16384, doubling)")
    p.add_argument("--no-decode", action="store_true", help="skip the decode-step table")
    args = p.parse_args(argv)
    from ..commands import out_file_problem

    problem = args.out is not None and out_file_problem(args.out)  # (it failed after the timed runs)
    if problem:
        p.error(problem)
    if args.lengths is not None and (not args.lengths or min(args.lengths) < 1):
        p.error(f"--lengths must be sequence lengths >= 1, got {args.lengths}")
    if not torch.cuda.is_available():
        print("based bench ops needs a CUDA device", file=sys.stderr)
        return 2
    import triton

    lengths = args.lengths or ((1024, 8192) if args.quick else LENGTHS)
    batches = (1, 256, 4096) if args.quick else DECODE_BATCHES
    copy_gbps = copy_bandwidth()
    prefill = bench_prefill(lengths)
    decode = [] if args.no_decode else bench_decode(batches)
    gpu = torch.cuda.get_device_name()
    date = datetime.date.today().isoformat()
    result = {
        "date": date, "gpu": gpu, "git_revision": _git_rev(), "torch": torch.__version__,
        "triton": triton.__version__, "python": platform.python_version(),
        "config": {"B": B, "H": H, "feature_dim": D, "head_dim": DV, "dtype": "bfloat16",
                   "timer": "triton.testing.do_bench median (warmup 25 ms, rep 100 ms)"},
        "copy_GBps": copy_gbps, "prefill": prefill, "decode": decode,
    }
    try:
        import fla

        result["fla"] = getattr(fla, "__version__", "unknown")
    except ImportError:
        result["fla"] = None
    out = args.out or Path("benchmarks/results") / f"ops-{gpu.split()[-1].lower()}-{date}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(_table(prefill, decode, copy_gbps))
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
