"""Tuning sweep of the Taylor decode-step kernel: rows per iteration (block_f) x num_warps, per batch size.

    python benchmarks/taylor_decode_sweep.py --out benchmarks/results/taylor-decode-sweep-h200.json
    python benchmarks/taylor_decode_sweep.py --fold-every 1 4 8 16 --batches 8915 --dv 112

Prints one JSON row per setting (mean step time, GB/s, fraction of the device-to-device copy bandwidth) and
a summary with the best setting per batch next to the default's figure. --fold-every > 1 runs the step with
a pending buffer (based/ops/taylor/pending.py), which writes the state once every that many calls: the
mean over calls is its cost per token, and its bytes per token are the state read every call and written
every fold_every-th.
"""
import argparse
import datetime
import itertools
import json

import torch

from based.bench.ops import DV, D, H, _bench, _git_rev, copy_bandwidth
from based.ops.taylor import taylor_feature_dim, zero_pending, zero_state
from based.ops.taylor.triton.decode import FOLD_ROWS, triton_taylor_linear_attn_step


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batches", type=int, nargs="*", default=[16, 64, 256, 1024, 4096])
    p.add_argument("--block-f", type=int, nargs="*", default=[16, 32, 64, 128])
    p.add_argument("--warps", type=int, nargs="*", default=[1, 2, 4, 8])
    p.add_argument("--heads", type=int, default=H)
    p.add_argument("--dv", type=int, default=DV, help="value head dim (the 1.3b preset has 112)")
    p.add_argument("--cache-hints", type=int, nargs="*", default=[0], help="1: evict-first loads, streaming stores")
    p.add_argument("--fold-every", type=int, nargs="*", default=[1], help="1: the state written every token")
    p.add_argument("--fold-rows", type=int, nargs="*", default=[FOLD_ROWS], help="rows per iteration of the fold pass")
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
        state_bytes = 4 * (F * DV_ + F)
        best = {}
        for every in a.fold_every:
            pending = None if every == 1 else zero_pending(batch, H_, D, DV_, every, torch.bfloat16, "cuda")
            # per token: the state read, written every `every`-th; q, k, v, o; half the pending slots read
            nbytes = batch * H_ * (state_bytes * (1 + 1 / every) + 2 * (2 * D + 2 * DV_) + (every - 1) * (D + DV_))
            fold_rows = a.fold_rows[:1] if every == 1 else a.fold_rows  # unused without a buffer
            settings = itertools.product(a.block_f, a.warps, a.cache_hints, fold_rows)
            for bf, w, hints, fr in settings:
                ms = _bench(lambda: triton_taylor_linear_attn_step(
                    q, k, v, kv, ks, block_f=bf, num_warps=w, cache_hints=bool(hints), pending=pending, fold_rows=fr),
                    "mean")
                row = {"batch": batch, "fold_every": every, "block_f": bf, "num_warps": w, "cache_hints": bool(hints),
                       "fold_rows": fr, "step_ms": ms, "GBps": nbytes / ms / 1e6, "of_copy": nbytes / ms / 1e6 / copy}
                print(json.dumps(row), flush=True)
                rows.append(row)
                if every not in best or ms < best[every]["step_ms"]:
                    best[every] = row
            default_ms = _bench(lambda: triton_taylor_linear_attn_step(q, k, v, kv, ks, pending=pending), "mean")
            summary[f"{batch}/fold_every={every}"] = {"best": best[every], "default_step_ms": default_ms,
                                                      "default_of_copy": nbytes / default_ms / 1e6 / copy}
        del kv, ks, pending
        torch.cuda.empty_cache()
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
