"""Tuning sweep of the Taylor decode-step kernel: rows per iteration (block_f) x num_warps, per batch size.

    python benchmarks/taylor_decode_sweep.py --out benchmarks/results/taylor-decode-sweep-h200.json

Prints one JSON row per setting (step time, GB/s, fraction of the device-to-device copy bandwidth) and
a summary with the best setting per batch next to the default's figure.
"""
import argparse
import datetime
import json

import torch

from based.bench.ops import DV, D, H, _bench, _git_rev, copy_bandwidth
from based.ops.taylor import taylor_feature_dim, zero_state
from based.ops.taylor.triton.decode import triton_taylor_linear_attn_step


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batches", type=int, nargs="*", default=[16, 64, 256, 1024, 4096])
    p.add_argument("--block-f", type=int, nargs="*", default=[16, 32, 64, 128])
    p.add_argument("--warps", type=int, nargs="*", default=[1, 2, 4, 8])
    p.add_argument("--heads", type=int, default=H)
    p.add_argument("--dv", type=int, default=DV, help="value head dim (the 1.3b preset has 112)")
    p.add_argument("--cache-hints", type=int, nargs="*", default=[0], help="1: evict-first loads, streaming stores")
    p.add_argument("--out", default=None)
    a = p.parse_args()
    H_, DV_ = a.heads, a.dv
    F = taylor_feature_dim(D, "compact")
    copy = copy_bandwidth()
    rows, summary = [], {}
    for batch in a.batches:
        kv, ks = zero_state(batch, H_, D, DV_, "cuda")
        kv.normal_()
        ks.uniform_(1, 2)
        q, k = (torch.randn(batch, H_, D, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        v = torch.randn(batch, H_, DV_, device="cuda", dtype=torch.bfloat16)
        nbytes = batch * H_ * (2 * 4 * (F * DV_ + F) + 2 * (2 * D + 2 * DV_))
        best = None
        for bf in a.block_f:
            for w in a.warps:
                for hints in a.cache_hints:
                    ms = _bench(lambda: triton_taylor_linear_attn_step(
                        q, k, v, kv, ks, block_f=bf, num_warps=w, cache_hints=bool(hints)))
                    row = {"batch": batch, "block_f": bf, "num_warps": w, "cache_hints": bool(hints), "step_ms": ms,
                           "GBps": nbytes / ms / 1e6, "of_copy": nbytes / ms / 1e6 / copy}
                    print(json.dumps(row), flush=True)
                    rows.append(row)
                    best = row if best is None or ms < best["step_ms"] else best
        default_ms = _bench(lambda: triton_taylor_linear_attn_step(q, k, v, kv, ks))
        del kv, ks
        torch.cuda.empty_cache()
        summary[batch] = {"best": best, "default_step_ms": default_ms,
                          "default_of_copy": nbytes / default_ms / 1e6 / copy}
    result = {
        "date": datetime.date.today().isoformat(), "gpu": torch.cuda.get_device_name(),
        "git_revision": _git_rev(),
        "torch": torch.__version__, "shape": {"H": H_, "d": D, "dv": DV_, "F": F}, "copy_GBps": copy,
        "rows": rows, "summary": summary,
    }
    print(json.dumps(summary, indent=1))
    if a.out:
        with open(a.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
