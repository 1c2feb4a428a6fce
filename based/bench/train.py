"""Training throughput: BASED against Transformer++ of the same size, in one run, on one GPU.

    based bench train [--size 360m] [--seq-len 2048] [--batch-size 8] [--steps 10] [--warmup 3] [--compile]
                      [--presets rwkv-360m lightning-360m ...] [--out JSON]

--presets adds any other presets (the issue-8 baselines) after the two, each reported the same way and
as a ratio to BASED.

Each model takes the trainer's step (based.train): bf16 autocast, fp32 master weights, fused AdamW with
the trainer's weight-decay groups, gradient clipping, loss over T tokens per sequence; random token ids
stand in for data, which does not change the work. Timed over --steps steps after --warmup (kernel
compilation and autotuning happen there; with --compile also torch.compile's, each block and the loss
as `based train --compile` does) with CUDA synchronisation at both ends. MFU uses
based.train.flops (6 N plus each mixer's work; causal attention counts half the score matrix) over the
dense bf16 peak of the GPU.
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import platform
import sys
import time
from pathlib import Path

import torch

from ..cli import torch_device
from ..commands import HelpFormatter
from .ops import _git_rev  # honours BASED_GIT_REV (GPU copies of the tree have no .git)


def _compile_stats() -> dict:
    """Graphs Dynamo built and graph breaks it met since the counters were last cleared."""
    from torch._dynamo.utils import counters

    # A reason is several lines: what Dynamo met, then an explanation naming the function.
    reasons = sorted({" ".join(line.strip() for line in r.splitlines()[:2])[:240] for r in counters["graph_break"]})
    return {"graphs": counters["stats"]["unique_graphs"], "graph_breaks": sum(counters["graph_break"].values()),
            "graph_break_reasons": reasons}


def bench_preset(preset: str, seq_len: int, batch_size: int, steps: int, warmup: int, device: torch.device,
                 compile: bool = False) -> dict:
    from based import BasedConfig, BasedForCausalLM
    from based.train.distributed import compile_blocks
    from based.train.flops import flops_per_token, mixer_flops_per_token, peak_flops
    from based.train.trainer import _loss, loss_function, param_groups

    torch.manual_seed(0)
    if compile:  # this preset's graphs only, counted from zero
        import torch._dynamo as dynamo
        from torch._dynamo.utils import counters

        dynamo.reset()
        counters.clear()
    config = BasedConfig.from_preset(preset)
    model = BasedForCausalLM(config).to(device)
    n_params = model.num_parameters()
    if compile:
        compile_blocks(model)
    loss_fn = loss_function(compile)
    cuda = device.type == "cuda"
    optimizer = torch.optim.AdamW(param_groups(model, 0.1), lr=8e-4, betas=(0.9, 0.95), fused=cuda)
    tokens = torch.randint(0, config.vocab_size, (batch_size, seq_len + 1), device=device)
    x, y = tokens[:, :-1], tokens[:, 1:]
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda)

    def step() -> torch.Tensor:
        with autocast:
            loss = _loss(model, x, y, loss_fn=loss_fn)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    t0 = time.perf_counter()
    for _ in range(warmup):
        loss = step()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    warmup_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(steps):
        loss = step()
    if cuda:
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - t0
    tps = batch_size * seq_len * steps / elapsed
    fpt = flops_per_token(config, seq_len, n_params)
    peak = peak_flops(device)
    row = {
        "preset": preset, "parameters": n_params, "seq_len": seq_len, "batch_size": batch_size,
        "steps": steps, "warmup_steps": warmup, "warmup_s": round(warmup_s, 2),
        "step_ms": round(1000 * elapsed / steps, 2), "tokens_per_s": round(tps, 1),
        "flops_per_token": fpt, "mixer_flops_per_token": mixer_flops_per_token(config, seq_len),
        "tflops": round(fpt * tps / 1e12, 2), "mfu": None if peak is None else round(fpt * tps / peak, 4),
        "peak_memory_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if cuda else None,
        "final_loss": round(loss.item(), 4), "compile": compile,
    }
    if compile:
        row.update(_compile_stats())
    del model, optimizer
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="based bench train", description=__doc__.split("\n\n")[0],
                                formatter_class=HelpFormatter)
    p.add_argument("--size", default="360m", help="preset size: debug, 360m or 1.3b (BASED and transformer-SIZE)")
    p.add_argument("--seq-len", type=int, default=2048, help="tokens per sequence")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per step")
    p.add_argument("--steps", type=int, default=10, help="timed training steps per preset")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (compilation, allocator)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile each block and the loss, as based train --compile does")
    p.add_argument("--presets", nargs="*", default=[], help="more presets to time after the two")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="where to train")
    p.add_argument("--out", type=Path, help="write the results as JSON here")
    p.add_argument("--git-rev", help="recorded in the JSON (default: git rev-parse HEAD, where git works)")
    args = p.parse_args(argv)
    from based.models import PRESETS

    unknown = [name for name in args.presets if name not in PRESETS]
    if unknown:
        p.error(f"unknown preset(s) {unknown}: use names from {', '.join(PRESETS)}")
    for flag, value, least in (("--steps", args.steps, 1), ("--warmup", args.warmup, 0),
                               ("--seq-len", args.seq_len, 1), ("--batch-size", args.batch_size, 1)):
        if value < least:
            p.error(f"{flag} must be at least {least}, got {value}")
    from ..commands import out_file_problem

    problem = args.out is not None and out_file_problem(args.out)  # (it failed after the timed runs)
    if problem:
        p.error(problem)
    from based import BasedConfig

    for preset in (f"transformer-{args.size}", args.size, *args.presets):
        if preset not in PRESETS:
            p.error(f"--size {args.size}: no preset {preset!r}; sizes: debug, 360m, 1.3b")
        config = BasedConfig.from_preset(preset)
        limit = config.max_position_embeddings
        if {"attention", "hyena"} & set(config.mixer_types) and args.seq_len > limit:  # contexts bounded by it
            p.error(f"--seq-len {args.seq_len} exceeds {preset}'s max_position_embeddings={limit} (full attention "
                    f"or Hyena; generation refuses longer sequences): lower --seq-len to at most {limit}")

    try:
        device = torch_device(args.device)
    except ValueError as e:
        p.error(str(e))
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    result = {
        "benchmark": "train", "date": datetime.date.today().isoformat(), "git_rev": args.git_rev or _git_rev(),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__, "python": platform.python_version(),
        "dtype": "bf16 autocast, fp32 weights" if device.type == "cuda" else "fp32",
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}, "results": [],
    }
    # Transformer++ first: it needs no kernel compilation, so a run cut short still has the baseline.
    for preset in (f"transformer-{args.size}", args.size, *args.presets):
        row = bench_preset(preset, args.seq_len, args.batch_size, args.steps, args.warmup, device, args.compile)
        result["results"].append(row)
        mfu = "n/a" if row["mfu"] is None else f"{100 * row['mfu']:.1f}%"
        compiled = f"  compiled: {row['graphs']} graphs, {row['graph_breaks']} breaks" if args.compile else ""
        print(f"{preset:>18}: {row['tokens_per_s']:>12,.0f} tokens/s  {row['step_ms']:>9.1f} ms/step  "
              f"{row['tflops']:>7.1f} TFLOP/s  MFU {mfu}  peak {row['peak_memory_gib']} GiB  warm-up "
              f"{row['warmup_s']} s{compiled}", flush=True)
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(result, indent=1) + "\n")
    base, ours, *others = result["results"]
    result["based_over_transformer_tokens_per_s"] = round(ours["tokens_per_s"] / base["tokens_per_s"], 3)
    print(f"BASED / Transformer++ tokens/s: {result['based_over_transformer_tokens_per_s']:.3f}")
    for row in others:
        result[f"based_over_{row['preset']}_tokens_per_s"] = round(ours["tokens_per_s"] / row["tokens_per_s"], 3)
        print(f"BASED / {row['preset']} tokens/s: {ours['tokens_per_s'] / row['tokens_per_s']:.3f}")
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
