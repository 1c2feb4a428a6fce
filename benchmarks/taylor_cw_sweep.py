"""Launch settings of the chunkwise Triton form (based/ops/taylor/triton/chunkwise.py), checked and timed (GPU).

    python benchmarks/taylor_cw_sweep.py [--lengths 2048 4096 8192] [--out FILE.jsonl]

Each variant (overrides of the launch settings: feature tiles, warps, stages, value block of the
state walk, one or two backward launches) is first
checked against the fp32 chunked PyTorch form on a small bf16 problem (output and gradients), then
timed forward and forward+backward at B=8, H=16, d=16, dv=64, bf16 (the `based bench ops` shape) at
each length; the fused form (triton/chunk.py) is timed first for reference. The best forward and the
best backward variant are combined and their time split by kernel at the longest length. One JSON line
per result; the chosen settings are printed as BASED_TRITON_CW_* exports.
"""
import argparse
import json

import torch
import triton

from based.ops.taylor.triton import chunkwise as CW
from based.ops.taylor.triton import triton_taylor_linear_attn
from taylor_sweep import check  # noqa: E402 - benchmarks/ is on sys.path when run as a script

# Overrides of the module defaults (chunkwise.py); chunks of 32 and 128 and gathered features lost to
# the defaults in the 2026-11-29 sweep (NOTES-kernels.md).
VARIANTS = [
    {},
    {"CW_BWD_SPLIT": True},
    {"CW_BWD_BF": 32, "CW_BWD_SPLIT": True},
    {"CW_BWD_BF": 32},
    {"CW_BWD_WARPS": 8, "CW_BWD_SPLIT": True},
    {"CW_H_BV": 32},
    {"CW_H_WARPS": 8},
    {"CW_WARPS": 8},
    {"CW_STAGES": 3},
    {"CW_BF": 32, "CW_H_BV": 32},
]
KNOBS = ("CW_CHUNK", "CW_BF", "CW_BWD_BF", "CW_WARPS", "CW_H_WARPS", "CW_BWD_WARPS", "CW_STAGES", "CW_H_BV",
         "CW_BWD_SPLIT")


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
    out = {"T": T, "fwd_h_ms": _ms(lambda: CW._fwd_h(k, v, None, None, None, lay, False, CW.CW_BF))}
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

    def emit(row):
        print(json.dumps(row), flush=True)
        if sink:
            sink.write(json.dumps(row) + "\n")

    for T in args.lengths:  # the other form, for reference in the same run
        fwd, fb = time_variant(T, "fused")
        emit({"fused": True, "T": T, "fwd_ms": fwd, "fwd_bwd_ms": fb})
    defaults = {n: getattr(CW, n) for n in KNOBS}
    best_f = best_b = None
    for variant in VARIANTS:
        for name, val in {**defaults, **variant}.items():
            setattr(CW, name, val)
        row = {"variant": variant}
        try:
            row["err"] = check("chunkwise")
            f_sum = b_sum = 0.0
            for T in args.lengths:
                fwd, fb = time_variant(T)
                row[f"fwd_ms_{T}"], row[f"fwd_bwd_ms_{T}"] = fwd, fb
                f_sum, b_sum = f_sum + fwd / T, b_sum + (fb - fwd) / T
            if best_f is None or f_sum < best_f[0]:
                best_f = (f_sum, variant)
            if best_b is None or b_sum < best_b[0]:
                best_b = (b_sum, variant)
        except Exception as e:  # noqa: BLE001 - a variant that does not compile is a result too
            row["error"] = repr(e)[:300]
        emit(row)
    if best_f is None:
        return 1
    for name, val in defaults.items():
        setattr(CW, name, val)
    for variant in (best_f[1], best_b[1]):
        for name, val in variant.items():
            setattr(CW, name, val)
    chosen = {n: getattr(CW, n) for n in KNOBS}
    emit({"best_forward": best_f[1], "best_backward": best_b[1], "chosen": chosen,
          "breakdown": breakdown(max(args.lengths))})
    print(" ".join(f"BASED_TRITON_{n}={int(v)}" for n, v in chosen.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
