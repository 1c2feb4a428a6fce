"""Prefill throughput as `based serve` runs it: n prompts prefilled at once into scattered slots of a large state
(random weights, bf16), tokens per second per n, and optionally a torch.profiler table of one size.

    BASED_GIT_REV=$(git rev-parse HEAD) python benchmarks/prefill.py [--preset 1.3b] [--prompts 1 8 32]
        [--prompt-len 512] [--slots 2048] [--profile 8] [--out PATH]

Serving a 512-token prompt costs about as much GPU time as decoding its answer (docs/serving.md), so prefill
speed bounds the server's throughput. `BASED_CONV_FUSED=0` (and the other switches) compare the PyTorch forms.
Per size: ms (mean of back-to-back calls), and of single calls from an idle GPU the host's time to issue one
(host_ms) beside its whole time (call_ms): host_ms close to call_ms means the host, not the GPU, sets the pace.
CUDA only; prints one JSON object (and writes it to --out) with date, GPU and revision.
"""
from __future__ import annotations

import argparse
import datetime
import os
import sys
import time


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--preset", default="1.3b")
    p.add_argument("--prompts", type=int, nargs="+", default=[1, 8, 32], help="prompts prefilled at once")
    p.add_argument("--prompt-len", type=int, default=512)
    p.add_argument("--slots", type=int, default=2048, help="slots of the state the prompts go into")
    p.add_argument("--profile", type=int, default=0, metavar="N", help="also profile N prompts at once (0: no)")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    if (min(args.prompts) < 1 or args.prompt_len < 1 or args.profile < 0
            or args.slots < max(args.prompts + [args.profile])):
        p.error("--prompts and --prompt-len must be >= 1, --profile >= 0, and --slots at least the most prompts "
                "prefilled at once")
    import torch
    from _timing import emit  # benchmarks/ is on sys.path when run as a script

    if not torch.cuda.is_available():
        sys.exit("benchmarks/prefill.py needs a CUDA GPU")
    from based.bench.generate import build
    from based.generation.engine import prefill
    from based.generation.state import InferenceState

    model = build(args.preset)
    state = InferenceState.allocate(model, args.slots, torch.bfloat16, "cuda", max_seq_len=args.prompt_len + 1024)
    g = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    result = {"date": datetime.date.today().isoformat(), "gpu": torch.cuda.get_device_name(),
              "torch": torch.__version__, "git_rev": os.environ.get("BASED_GIT_REV", "unknown"),
              "preset": args.preset, "prompt_len": args.prompt_len, "slots": args.slots,
              "switches": {k: v for k, v in os.environ.items() if k.startswith("BASED_") and k.endswith("_FUSED")},
              "rates": {}}

    def batch(n):
        ids = torch.randint(0, vocab, (n, args.prompt_len), generator=g).cuda()
        return ids, torch.randperm(args.slots, generator=g)[:n]  # scattered, as a server's free slots are

    for n in args.prompts:
        ids, slots = batch(n)
        prefill(model, state, ids, None, slots)
        torch.cuda.synchronize()
        reps = max(3, 64 // n)
        t = time.perf_counter()
        for _ in range(reps):
            prefill(model, state, ids, None, slots)
        torch.cuda.synchronize()
        dt = (time.perf_counter() - t) / reps
        # Single calls from an idle GPU: the host's time to issue one (its launches fit the launch queue) against
        # the call's whole time. host_ms near call_ms: the host is the limit, not the GPU.
        host, whole = [], []
        for _ in range(3):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            prefill(model, state, ids, None, slots)
            host.append(time.perf_counter() - t0)
            torch.cuda.synchronize()
            whole.append(time.perf_counter() - t0)
        result["rates"][str(n)] = {"ms": round(dt * 1e3, 2), "tokens_per_s": round(n * args.prompt_len / dt),
                                   "host_ms": round(sorted(host)[1] * 1e3, 2), "call_ms": round(sorted(whole)[1] * 1e3, 2)}
        print(n, result["rates"][str(n)], flush=True)
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        ids, slots = batch(args.profile)
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                prefill(model, state, ids, None, slots)
            torch.cuda.synchronize()
        table = prof.key_averages().table(sort_by="self_device_time_total", row_limit=40, max_name_column_width=90)
        print(table)
        result[f"profile_{args.profile}_prompts_5_calls_top40"] = table.splitlines()
    emit(result, args.out)


if __name__ == "__main__":
    main()
