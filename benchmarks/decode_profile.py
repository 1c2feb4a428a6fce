"""Which code launches each kernel of a decode step: a kernel table with the CPU ops (and their input
shapes) that launched every kernel, for finding what a step spends its time on.

    python benchmarks/decode_profile.py --preset 1.3b --batch 1024 --compile [--match Memcpy Memset]

The profiled steps are eager replays of the Decoder's step (the CUDA graph replays the same kernels).
"""
import argparse
import json
from collections import defaultdict

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from based.bench.generate import build, fill_slots
from based.generation import Decoder


def launchers(event, depth: int = 3) -> str:
    """The op that launched a kernel and up to `depth` - 1 of its callers, innermost first."""
    names = []
    while event is not None and len(names) < depth:
        shapes = [s for s in (event.input_shapes or []) if s]
        names.append(event.name + (str(shapes[:3]) if shapes else ""))
        event = event.cpu_parent
    return " < ".join(names)


@torch.no_grad()
def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="1.3b")
    p.add_argument("--batch", type=int, default=1024)
    p.add_argument("--compile", action="store_true")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--top", type=int, default=25, help="kernels listed, costliest first")
    p.add_argument("--match", nargs="*", default=[], help="also list every launcher of kernels with these names")
    a = p.parse_args()
    model = build(a.preset)
    dec = Decoder(model, a.batch, max_seq_len=1024, compile=a.compile)
    n = min(64, a.batch)
    dec.add(torch.randint(0, model.config.vocab_size, (n, 128), device="cuda"))
    fill_slots(dec, n)
    for _ in range(3):
        dec._step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], record_shapes=True) as prof:
        for _ in range(a.steps):
            dec._step()
        torch.cuda.synchronize()
    kernels = defaultdict(lambda: {"ms": 0.0, "count": 0, "launched_by": defaultdict(int)})
    for e in prof.events():
        if e.device_type != DeviceType.CPU:
            continue
        for k in e.kernels:
            row = kernels[k.name]
            row["ms"] += k.duration / 1e3 / a.steps
            row["count"] += 1 / a.steps
            row["launched_by"][launchers(e)] += 1
    table = sorted(kernels.items(), key=lambda kv: -kv[1]["ms"])
    total = sum(r["ms"] for _, r in table)
    print(f"{a.preset} batch {a.batch} compile={a.compile}: {len(table)} kernel names, "
          f"{total:.3f} ms of kernels per step")
    for name, r in table[: a.top]:
        top_launcher = max(r["launched_by"].items(), key=lambda kv: kv[1])[0]
        print(f"{r['ms']:9.3f} ms {r['count']:6.0f}x  {name[:70]:70s}  {top_launcher[:160]}")
    for name, r in table:
        if any(m in name for m in a.match):
            print(json.dumps({"kernel": name, "ms": r["ms"], "launched_by": dict(r["launched_by"])}, indent=1))


if __name__ == "__main__":
    main()
