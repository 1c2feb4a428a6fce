"""Launch settings of the chunkwise Triton form (based/ops/taylor/triton/chunkwise.py), checked and timed (GPU).

    python benchmarks/taylor_cw_sweep.py [--lengths 2048 4096 8192] [--out FILE.jsonl]

Each variant (chunk, feature tile, warps of the output / state / backward kernels, stages, gathered
or selected features) is first
checked against the fp32 chunked PyTorch form on a small bf16 problem (output and gradients), then
timed forward and forward+backward at B=8, H=16, d=16, dv=64, bf16 (the `based bench ops` shape) at
each length. Then the best variant's time is split by kernel at the longest length. One JSON line per
result; the best settings are printed as BASED_TRITON_CW_* exports.
"""
import argparse
import json

import torch
import triton

from based.ops.taylor import chunk_taylor_linear_attn
from based.ops.taylor.triton import chunkwise as CW
from based.ops.taylor.triton import triton_taylor_linear_attn

VARIANTS = [  # CW_CHUNK, CW_BF, CW_WARPS (output), CW_H_WARPS (state walks), CW_BWD_WARPS, CW_STAGES, CW_GATHER
    (64, 32, 4, 4, 4, 2, 0),
    (64, 32, 4, 4, 4, 2, 1),
    (64, 64, 4, 4, 4, 2, 0),
    (64, 32, 8, 4, 8, 2, 0),
    (64, 16, 4, 4, 4, 2, 0),
    (64, 32, 4, 2, 4, 3, 0),
    (128, 32, 8, 4, 8, 2, 0),
    (128, 64, 8, 8, 8, 2, 0),
    (32, 32, 4, 4, 4, 2, 0),
    (32, 64, 4, 4, 4, 2, 0),
]
NAMES = ("CW_CHUNK", "CW_BF", "CW_WARPS", "CW_H_WARPS", "CW_BWD_WARPS", "CW_STAGES", "CW_GATHER")


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def check():
    q, k = (torch.randn(2, 1000, 4, 16, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
    v = torch.randn(2, 1000, 4, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    do = torch.randn(2, 1000, 4, 64, device="cuda")
    o = triton_taylor_linear_attn(q, k, v, form="chunkwise")[0]
    g = torch.autograd.grad(o.float(), (q, k, v), do)
    qf, kf, vf = (t.detach().float().requires_grad_() for t in (q, k, v))
    ref = chunk_taylor_linear_attn(qf, kf, vf)[0]
    gr = torch.autograd.grad(ref, (qf, kf, vf), do)
    return {"o": rel(o, ref), "dq": rel(g[0], gr[0]), "dk": rel(g[1], gr[1]), "dv": rel(g[2], gr[2])}


def _ms(fn):
    return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))


def _inputs(T, B=8, H=16):
    q, k = (torch.randn(B, T, H, 16, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
    v = torch.randn(B, T, H, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    return q, k, v, torch.randn_like(v)


def time_variant(T, form="chunkwise"):
    q, k, v, do = _inputs(T)
    f = lambda: triton_taylor_linear_attn(q, k, v, form=form)[0]  # noqa: E731
    return _ms(f), _ms(lambda: torch.autograd.grad(f(), (q, k, v), do))


def breakdown(T):
    """Milliseconds per kernel of the forward and backward at length T (current settings)."""
    q, k, v, do = _inputs(T)
    q, k, v = q.detach(), k.detach(), v.detach()
    scale, eps = 0.25, 1e-6
    lay = CW._layout(q, v, None)
    o, den, _, _ = CW.taylor_chunkwise_fwd(q, k, v, None, None, None, scale, eps, False)
    out = {"T": T, "fwd_h_ms": _ms(lambda: CW._fwd_h(k, v, None, None, None, lay, False))}
    out["fwd_total_ms"] = _ms(lambda: CW.taylor_chunkwise_fwd(q, k, v, None, None, None, scale, eps, False))
    out["fwd_o_ms"] = out["fwd_total_ms"] - out["fwd_h_ms"]
    out["bwd_total_ms"] = _ms(lambda: CW.taylor_chunkwise_bwd(q, k, v, o, den, do, None, None, None, None, None, scale, eps))
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096, 8192])
    p.add_argument("--out", default=None)
    args = p.parse_args()
    sink = open(args.out, "w") if args.out else None
    best = None

    def emit(row):
        print(json.dumps(row), flush=True)
        if sink:
            sink.write(json.dumps(row) + "\n")

    for T in args.lengths:  # the other form, for reference in the same run
        fwd, fb = time_variant(T, "fused")
        emit({"fused": True, "T": T, "fwd_ms": fwd, "fwd_bwd_ms": fb})
    for variant in VARIANTS:
        for name, val in zip(NAMES, variant):
            setattr(CW, name, val)
        row = {"variant": dict(zip(NAMES, variant))}
        try:
            row["err"] = check()
            total = 0.0
            for T in args.lengths:
                fwd, fb = time_variant(T)
                row[f"fwd_ms_{T}"], row[f"fwd_bwd_ms_{T}"] = fwd, fb
                total += fb / T
            if best is None or total < best[0]:
                best = (total, variant)
        except Exception as e:  # noqa: BLE001 - a variant that does not compile is a result too
            row["error"] = repr(e)[:300]
        emit(row)
    if best is None:
        return 1
    for name, val in zip(NAMES, best[1]):
        setattr(CW, name, val)
    emit({"best": dict(zip(NAMES, best[1])), "breakdown": breakdown(max(args.lengths))})
    print(" ".join(f"BASED_TRITON_{n}={v}" for n, v in zip(NAMES, best[1])))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
