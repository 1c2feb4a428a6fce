"""Activation memory of one forward + backward with and without gradient checkpointing, on the CPU.

    python benchmarks/grad_checkpointing_memory.py [--preset 360m] [--batch-size 1] [--seq-len 512]

Each setting runs in a fresh subprocess (so one's allocations cannot hide the other's) and reports:
- saved_bytes: bytes of the tensors autograd keeps for the backward (torch.autograd.graph.saved_tensors_hooks,
  each storage counted once, parameters left out since they exist either way). The checkpointed run uses
  use_reentrant=True here, so that the block inputs a checkpoint keeps pass through the same hook; with the
  default use_reentrant=False they are kept outside autograd's saved tensors, where the hook cannot see them.
- peak_rss_delta_bytes: the process's peak resident memory (ru_maxrss) during forward + backward above
  its level after building the model, with transformers' default checkpoint (use_reentrant=False). It also
  holds the gradients (4 bytes a parameter in both runs) and the logits.
- seconds for the forward + backward, and whether the gradients match the run without checkpointing.
Writes benchmarks/results/grad-checkpointing-<preset>-<date>.json with date, machine and git revision.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _git_rev() -> str:
    try:
        return subprocess.check_output(["git", "rev-parse", "HEAD"], cwd=ROOT, text=True, stderr=subprocess.DEVNULL).strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kilobytes on Linux


def measure(preset: str, batch_size: int, seq_len: int, checkpointing: bool, mode: str) -> dict:
    """One forward + backward of a seeded model; `mode` is "saved" (the hook, reentrant checkpoint) or
    "peak" (ru_maxrss, default checkpoint)."""
    import torch

    from based import BasedConfig, BasedForCausalLM

    torch.manual_seed(0)
    model = BasedForCausalLM(BasedConfig.from_preset(preset)).train()
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": mode == "saved"})
    ids = torch.randint(0, model.config.vocab_size, (batch_size, seq_len), generator=torch.Generator().manual_seed(1))
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = max(seen.get(storage.data_ptr(), 0), storage.nbytes())
        return t

    base_rss = _peak_rss_bytes()
    start = time.perf_counter()
    if mode == "saved":
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = model(ids, labels=ids).loss
    else:
        loss = model(ids, labels=ids).loss
    loss.backward()
    seconds = time.perf_counter() - start
    grad_norm = torch.sqrt(sum(p.grad.double().pow(2).sum() for p in model.parameters() if p.grad is not None))
    out = {"loss": loss.item(), "grad_norm": grad_norm.item(), "seconds": round(seconds, 2)}
    if mode == "saved":
        out["saved_bytes"] = sum(seen.values())
    else:
        out["peak_rss_delta_bytes"] = _peak_rss_bytes() - base_rss
    return out


def _child(args) -> dict:
    """measure() in a fresh interpreter; its JSON is the last line of stdout."""
    cmd = [sys.executable, __file__, "--child", args.mode_of_child, "--preset", args.preset,
           "--batch-size", str(args.batch_size), "--seq-len", str(args.seq_len)]
    if args.checkpointing_of_child:
        cmd.append("--checkpointing")
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    if result.returncode != 0:
        raise SystemExit(f"measurement failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="360m", help="model preset (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=1, help="sequences (default: %(default)s)")
    p.add_argument("--seq-len", type=int, default=512, help="tokens per sequence (default: %(default)s)")
    p.add_argument("--out", type=Path, help="JSON path (default: benchmarks/results/grad-checkpointing-PRESET-DATE.json)")
    p.add_argument("--child", choices=("saved", "peak"), help=argparse.SUPPRESS)
    p.add_argument("--checkpointing", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(measure(args.preset, args.batch_size, args.seq_len, args.checkpointing, args.child)))
        return 0

    runs = {}
    for mode in ("saved", "peak"):
        for checkpointing in (False, True):
            args.mode_of_child, args.checkpointing_of_child = mode, checkpointing
            name = f"{mode}_{'checkpointing' if checkpointing else 'plain'}"
            runs[name] = _child(args)
            print(name, runs[name], file=sys.stderr)
    plain, ckpt = runs["saved_plain"], runs["saved_checkpointing"]
    date = datetime.datetime.now(datetime.timezone.utc)
    result = {
        "benchmark": "gradient checkpointing memory, one forward + backward on the CPU (fp32)",
        "date": date.isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "cpus": os.cpu_count(), "threads": int(os.environ.get("OMP_NUM_THREADS", "1"))},
        "git_revision": _git_rev(),
        "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
        "preset": args.preset, "batch_size": args.batch_size, "seq_len": args.seq_len,
        "runs": runs,
        "saved_bytes_ratio": round(ckpt["saved_bytes"] / plain["saved_bytes"], 4),
        "peak_rss_delta_ratio": round(runs["peak_checkpointing"]["peak_rss_delta_bytes"]
                                      / runs["peak_plain"]["peak_rss_delta_bytes"], 4),
        "same_gradients": all(abs(r["grad_norm"] - plain["grad_norm"]) <= 1e-5 * plain["grad_norm"]
                              and abs(r["loss"] - plain["loss"]) <= 1e-6 * abs(plain["loss"]) for r in runs.values()),
    }
    out = args.out or ROOT / "benchmarks" / "results" / f"grad-checkpointing-{args.preset}-{date:%Y-%m-%d}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
