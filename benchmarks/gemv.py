"""based.ops.gemv against cuBLAS at the 1.3b preset's decode projections, on the GPU.

    python benchmarks/gemv.py [--rows 1 4 8] [--sweep] [--out PATH]

Each case calls its op on copies of its weights that together pass 4x the L2, all captured in one CUDA
graph (a Triton launch from Python costs more than these kernels), so every weight byte comes from HBM and
each call pays the launch cost a decode step's graph pays. Per case and rows of x: microseconds per call
and weight GB/s of
- fused: the Triton kernel, its default configuration with and without programmatic dependent launch, and
  under --sweep each block_n x num_warps x programs per SM,
- eager: the ops' PyTorch form, i.e. the layers' arithmetic (cuBLAS plus the norm / add / activation kernels),
- cublas: the projection alone (F.linear), no norm or epilogue.
Prints one JSON object (and writes it to --out) with the date, GPU and git revision.
"""
from __future__ import annotations

import argparse
import datetime
import functools
import json
import subprocess
from pathlib import Path

import torch
import torch.nn.functional as F

from based.ops import conv_state_zeros
from based.ops.gemv import norm_glu, norm_linear
from based.ops import launch
from based.ops.gemv import triton as kernels

D, INNER, VOCAB, HEADS, FEAT = 1792, 3584, 50304, 16, 16  # the 1.3b preset (lm head rows padded to 64)


def cases(M: int, dtype=torch.bfloat16, device="cuda"):
    """name -> (weight bytes, {"fused": fn(block_n, num_warps), "eager": fn(), "cublas": fn()}) builders: each
    builder gets one copy of the weights and returns the call."""
    def t(*shape):
        return torch.randn(*shape, dtype=dtype, device=device) * 0.02

    x_d, x_inner, nw = t(M, D) * 50, t(M, INNER) * 50, t(D) + 1

    def linear(shapes, norm, bias, residual):
        ws, bs = [t(n, shapes[0][1]) for n, _ in shapes], [t(n) if bias else None for n, _ in shapes]
        x = x_d if shapes[0][1] == D else x_inner
        res = t(M, sum(n for n, _ in shapes)) if residual else None
        n = nw if norm else None
        return {
            "fused": lambda *config, **kw: kernels.triton_norm_linear(x, ws, bs, n, 1e-5, res, *config, **kw),
            "eager": lambda: norm_linear(x, ws if len(ws) > 1 else ws[0], bs if len(ws) > 1 else bs[0], n, 1e-5,
                                         res, backend="torch"),
            "cublas": lambda: [F.linear(x, w) for w in ws],
        }

    def glu(conv, bias):
        w, b = t(2 * INNER, D), t(2 * INNER) if bias else None
        state = conv_state_zeros(M, INNER, 3, dtype, device) if conv else None
        cw, cb = (t(INNER, 3), t(INNER) if bias else None) if conv else (None, None)
        return {
            "fused": lambda *config, **kw: kernels.triton_norm_glu(x_d, w, b, nw, 1e-5, state, cw, cb, *config, **kw),
            "eager": lambda: norm_glu(x_d, w, b, nw, 1e-5, state, cw, cb, backend="torch"),
            "cublas": lambda: F.linear(x_d, w),
            "stateful": conv,  # each call shifts the conv state: two calls do not see the same inputs
        }

    two = 2  # bf16 bytes
    return {
        "swiglu fc1 (norm2, up * silu(gate))": (2 * INNER * D * two, functools.partial(glu, False, False)),
        "baseconv in_proj (norm1, conv step, gate)": (2 * INNER * D * two, functools.partial(glu, True, True)),
        # Ablations of the BaseConv case: the conv without the biases, the biases without the conv.
        "in_proj conv step, no biases": (2 * INNER * D * two, functools.partial(glu, True, False)),
        "in_proj biases, SwiGLU epilogue": (2 * INNER * D * two, functools.partial(glu, False, True)),
        "fc2 (+ residual)": (D * INNER * two, functools.partial(linear, [(D, INNER)], False, False, True)),
        "baseconv out_proj (bias, + residual)": (D * INNER * two, functools.partial(linear, [(D, INNER)], False, True, True)),
        "attention Wqkv (norm1)": (3 * D * D * two, functools.partial(linear, [(3 * D, D)], True, False, False)),
        "linear attention q, k, v (norm1)": (
            (2 * HEADS * FEAT + D) * D * two,
            functools.partial(linear, [(HEADS * FEAT, D), (HEADS * FEAT, D), (D, D)], True, False, False)),
        "attention out_proj (+ residual)": (D * D * two, functools.partial(linear, [(D, D)], False, False, True)),
        "lm head (ln_f)": (VOCAB * D * two, functools.partial(linear, [(VOCAB, D)], True, False, False)),
    }


def graph_us(calls, replays: int = 20) -> float:
    """Microseconds per call of the callables, captured back to back in one CUDA graph."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for c in calls:
            c()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for c in calls:
            c()
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1e3 / (replays * len(calls))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, nargs="*", default=[1], help="rows of x (decode batch)")
    p.add_argument("--sweep", action="store_true",
                   help="at the fewest rows, time every block_n in 1 2 4 x 4 or 8 warps x 2, 3, 4, 6 or 8 programs per SM x "
                        "registers uncapped or capped at 64 (maxnreg); each records its registers per thread")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--git-rev", default=None)
    args = p.parse_args(argv)
    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    rev = args.git_rev or subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    result = {"date": datetime.date.today().isoformat(), "gpu": torch.cuda.get_device_name(), "git_revision": rev,
              "torch": torch.__version__, "dtype": "bfloat16", "block_values": kernels.BLOCK_VALUES,
              "configs": kernels.CONFIGS, "pdl_supported": launch.pdl_supported(), "rows": []}
    for M in args.rows:
        for name, (wbytes, build) in cases(M).items():
            copies = [build() for _ in range(max(2, -(-4 * l2 // wbytes)))]
            row = {"case": name, "rows_of_x": M, "weight_bytes": wbytes}
            configs = [(None, None, None, None)]
            if args.sweep and M == min(args.rows):
                configs += [(bn, w, p, r) for bn in (1, 2, 4) for w in (4, 8) for p in (2, 3, 4, 6, 8) for r in (None, 64)]
            for config in configs:
                bn, w, per_sm, maxnreg = config
                key = "fused" if w is None else f"fused bn{bn} w{w} p{per_sm}" + (f" r{maxnreg}" if maxnreg else "")
                stats = {}
                try:
                    copies[0]["fused"](*config, stats=stats)  # compiles; records the registers
                    us = graph_us([functools.partial(c["fused"], *config) for c in copies])
                    if w is None and launch.pdl_supported():  # the default, also without PDL
                        launch.ENABLED = False
                        no_pdl = graph_us([functools.partial(c["fused"], *config) for c in copies])
                        launch.ENABLED = True
                        row["fused without PDL"] = {"us": no_pdl, "GBps": wbytes / no_pdl / 1e3}
                except Exception as e:  # noqa: BLE001 - a config that does not compile is reported
                    row[key] = repr(e)[:200]
                    continue
                row[key] = {"us": us, "GBps": wbytes / us / 1e3, **stats}
            for kind in ("eager", "cublas"):
                us = graph_us([c[kind] for c in copies])
                row[kind] = {"us": us, "GBps": wbytes / us / 1e3}
            # Agreement with the layers' arithmetic, for the record (bf16: a rounding or two apart).
            c = copies[0]
            if not c.get("stateful"):
                a, b = c["fused"](), c["eager"]()
                row["rel_err_vs_eager"] = ((a.float() - b.float()).norm() / b.float().norm()).item()
            result["rows"].append(row)
            print(json.dumps(row), flush=True)
            del copies
            torch.cuda.empty_cache()
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "rows"}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
