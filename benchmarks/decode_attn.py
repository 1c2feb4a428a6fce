"""decode_attn (one token against a ring KV cache): Triton kernel vs the SDPA form, GB/s of cache read.

    python benchmarks/decode_attn.py --out benchmarks/results/decode-attn-h200.json

    python benchmarks/decode_attn.py --sweep     # kernel settings (rows per iteration x warps x stages)

Sliding window at the 1.3b preset's shape (ring of 128 rows, 16 heads of 112) over batch sizes, and full
attention with a 4096-row cache holding 1024 tokens (what Transformer++ decode sees mid-generation).
"""
import argparse
import datetime
import json

import torch

from based.bench.ops import _bench, _git_rev, copy_bandwidth
from based.ops.decode_attn import decode_attn
from based.ops.decode_attn.triton import triton_decode_attn


def point(kind, batch, L, filled, H=16, D=112):
    q = torch.randn(batch, H, D, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(batch, L, H, D, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    last = torch.full((batch,), filled - 1, device="cuda")
    read = 2 * batch * min(L, filled) * H * D * 2  # keys and values the query attends to
    ms = {b: _bench(lambda: decode_attn(q, k, v, last, backend=b)) for b in ("triton", "torch")}
    return {"kind": kind, "batch": batch, "cache_rows": L, "tokens": filled, "heads": H, "head_dim": D,
            "triton_ms": ms["triton"], "torch_ms": ms["torch"], "speedup": ms["torch"] / ms["triton"],
            "triton_GBps": read / ms["triton"] / 1e6, "torch_GBps": read / ms["torch"] / 1e6}


def sweep(batch=2048, L=128, H=16, D=112):
    q = torch.randn(batch, H, D, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(batch, L, H, D, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    last = torch.full((batch,), 4095, device="cuda")
    read = 2 * batch * L * H * D * 2
    rows = []
    for bl in (16, 32, 64, 128):
        for w in (1, 2, 4, 8):
            for st in (1, 2, 3):
                ms = _bench(lambda: triton_decode_attn(q, k, v, last, block_l=bl, num_warps=w, num_stages=st))
                rows.append({"batch": batch, "block_l": bl, "num_warps": w, "num_stages": st, "ms": ms,
                             "GBps": read / ms / 1e6})
                print(json.dumps(rows[-1]), flush=True)
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=None)
    p.add_argument("--sweep", action="store_true", help="time kernel settings at --batch, window 128")
    p.add_argument("--batch", type=int, default=2048, help="sweep batch (the 1.3b preset's largest is ~8,900)")
    a = p.parse_args()
    if a.sweep:
        rows = sweep(a.batch)
        print(json.dumps(min(rows, key=lambda r: r["ms"])))
        if a.out:
            with open(a.out, "w") as f:
                json.dump({"date": datetime.date.today().isoformat(), "gpu": torch.cuda.get_device_name(),
                           "git_revision": _git_rev(), "rows": rows}, f, indent=1)
        return
    rows = []
    for batch in (1, 16, 256, 2048, 8192):
        rows.append(point("sliding_window", batch, 128, 4096))
        print(json.dumps(rows[-1]), flush=True)
    for batch in (1, 16, 128):
        rows.append(point("full", batch, 4096, 1024))
        print(json.dumps(rows[-1]), flush=True)
    result = {"date": datetime.date.today().isoformat(), "gpu": torch.cuda.get_device_name(),
              "git_revision": _git_rev(), "torch": torch.__version__, "copy_GBps": copy_bandwidth(), "rows": rows}
    if a.out:
        with open(a.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
