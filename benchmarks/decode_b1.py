"""Where a batch-1 decode step's time goes: the step timed with parts of it taken out or swapped.

    python benchmarks/decode_b1.py --out benchmarks/results/decode-b1-h200.json
    python benchmarks/decode_b1.py --variants as-is split-steps --steps 800

Each variant builds a Decoder (batch 1, the fused step in a CUDA graph on CUDA) after a 512-token prompt and
times --repeats runs of --steps steps with CUDA events. Variants:
    as-is               the step as shipped
    no-taylor-step      linear attention's step between its projections replaced by nothing (returns v)
    no-window-step      the same for sliding-window attention (returns v's part of the projection)
    no-mixer-steps      both: projections, embedding, argmax and position update only
    copy-mixer-steps    both replaced by a trivial kernel launched like them (PDL wait, copy v): the cost of
                        one more kernel boundary as such
    split-steps         the steps' split forms (state / ring rows over programs, merged by the last one)
                        instead of one program per head holding the state or ring
The stubbed variants compute something else (their tokens are not the model's): they only locate time.
--set MODULE.NAME=VALUE sets a module constant for the run (a kernel knob), e.g.
    --set based.ops.taylor.triton.decode.RESIDENT_WARPS=8 based.ops.decode_attn.triton.RING_WARPS=16
--device cpu runs the wiring (eager, no graph, wall clock) for tests.
--trace N profiles N more steps of each variant (torch.profiler, the CUDA graph's kernels) and adds the
kernel timeline: for each kernel of the step in order, its name, its duration and how much later it ends
than the kernel before it (`after_us`; under PDL a kernel starts before the one before it ends, so these
increments, not the durations, add up to the step's time).
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib
import json

import torch
import triton
import triton.language as tl

from based.bench.generate import build, elapsed_ms
from based.bench.ops import _git_rev
from based.generation import Decoder
from based.layers import Attention, LinearAttention
from based.ops.launch import pdl_options, wait_for_inputs

VARIANTS = ["as-is", "no-taylor-step", "no-window-step", "no-mixer-steps", "copy-mixer-steps", "split-steps"]


@triton.jit
def _copy_kernel(x, y, N, BN: tl.constexpr, PDL: tl.constexpr):
    wait_for_inputs(PDL)
    o = tl.program_id(0) * BN + tl.arange(0, BN)
    tl.store(y + o, tl.load(x + o, mask=o < N), mask=o < N)


def copy_kernel(v: torch.Tensor) -> torch.Tensor:
    """v copied by 16 programs of a Triton kernel with the mixers' launch (PDL where supported)."""
    v = v.contiguous()
    if v.device.type != "cuda":
        return v.clone()
    o = torch.empty_like(v)
    launch = pdl_options(v.device, 16)
    BN = triton.next_power_of_2(triton.cdiv(v.numel(), 16))
    _copy_kernel[(16,)](v, o, v.numel(), BN=BN, PDL=bool(launch), **launch)
    return o


@contextlib.contextmanager
def variant(name: str, d_model: int):
    """Patch the mixers' steps (or the step kernels' choice) for one variant, and undo it after."""
    taylor = importlib.import_module("based.ops.taylor.triton.decode")
    window = importlib.import_module("based.ops.decode_attn.triton")
    saved = (LinearAttention.step_attend, Attention.step_attend, taylor.RESIDENT_MAX_VALUES, window.RING_MAX_VALUES)
    wrap = copy_kernel if name == "copy-mixer-steps" else (lambda t: t)
    if name in ("no-taylor-step", "no-mixer-steps", "copy-mixer-steps"):
        LinearAttention.step_attend = lambda self, q, k, v, state: wrap(v.reshape(v.shape[0], -1))
    if name in ("no-window-step", "no-mixer-steps", "copy-mixer-steps"):
        Attention.step_attend = lambda self, qkv, state, offset: wrap(qkv[:, 2 * d_model:])
    if name == "split-steps":
        taylor.RESIDENT_MAX_VALUES = window.RING_MAX_VALUES = 0
    try:
        yield
    finally:
        LinearAttention.step_attend, Attention.step_attend, taylor.RESIDENT_MAX_VALUES, window.RING_MAX_VALUES = saved


def time_steps(decoder, steps: int, device: torch.device) -> float:
    """ms per step over `steps` steps."""

    def steps_run():
        for _ in range(steps):
            decoder.step()

    return elapsed_ms(device, steps_run) / steps


@torch.no_grad()
def run(preset: str, variants: list[str], steps: int, repeats: int, prompt_len: int, device: torch.device,
        trace: int = 0) -> list:
    torch.manual_seed(0)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = build(preset, dtype, device)
    prompt = torch.randint(0, model.config.vocab_size, (1, prompt_len), device=device)
    rows = []
    for name in variants:
        with variant(name, model.config.d_model):
            def new_decoder():
                decoder = Decoder(model, 1, max_seq_len=prompt_len + 16 + steps * repeats + 1,
                                  cuda_graph=device.type == "cuda")
                decoder.add(prompt)
                for _ in range(16):
                    decoder.step()
                return decoder

            decoder = new_decoder()
            ms = [time_steps(decoder, steps, device) for _ in range(repeats)]
            row = {"variant": name, "step": decoder.step_kind, "ms_per_step": ms, "best_ms": min(ms)}
            print(json.dumps(row), flush=True)
            del decoder
            if trace and device.type == "cuda":
                row["timeline"] = kernel_timeline(new_decoder, trace)
            rows.append(row)
    return rows


@torch.no_grad()
def kernel_timeline(new_decoder, steps: int) -> dict:
    """Each kernel of a step, in order: name, mean duration and mean end-to-end increment (microseconds).

    The decoder is made (and its graph captured) under the profiler: kernels of a graph captured before
    profiling may not be reported one by one. A marker kernel separates the replays from the set-up."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        decoder = new_decoder()
        torch.cuda.synchronize()
        torch.cuda._sleep(1000)  # ATen's spin_kernel: marks where the replays begin
        for _ in range(steps):
            decoder.step()
        torch.cuda.synchronize()
    kernels = sorted(
        (e.time_range.start, e.time_range.end, e.name) for e in prof.events() if e.device_type == DeviceType.CUDA
    )
    marks = [i for i, k in enumerate(kernels) if "spin_kernel" in k[2]]
    kernels = kernels[marks[-1] + 1:] if marks else kernels
    if not kernels or len(kernels) % steps:
        return {"error": f"{len(kernels)} kernel events for {steps} steps"}
    n = len(kernels) // steps
    rows = [{"name": kernels[i][2][:80], "us": 0.0, "after_us": 0.0} for i in range(n)]
    for s in range(1, steps):  # the first step's first kernel has no predecessor: skip step 0
        for i in range(n):
            start, end, _ = kernels[s * n + i]
            rows[i]["us"] += (end - start) / (steps - 1)
            rows[i]["after_us"] += (end - kernels[s * n + i - 1][1]) / (steps - 1)
    return {"kernels_per_step": n, "step_us": sum(r["after_us"] for r in rows), "kernels": rows}


def set_knobs(assignments: list[str]) -> dict:
    """Apply MODULE.NAME=VALUE assignments (VALUE read as JSON, else kept as text); returns them as a dict."""
    knobs = {}
    for item in assignments:
        target, sep, text = item.partition("=")
        module, _, name = target.rpartition(".")
        if not sep or not module:
            raise SystemExit(f"--set takes MODULE.NAME=VALUE, got {item!r}")
        mod = importlib.import_module(module)
        if not hasattr(mod, name):
            raise SystemExit(f"--set: {module} has no {name}")
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            value = text
        setattr(mod, name, value)
        knobs[target] = value
    return knobs


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="1.3b")
    p.add_argument("--variants", nargs="*", default=VARIANTS, choices=VARIANTS)
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--prompt-len", type=int, default=512)
    p.add_argument("--device", default="cuda")
    p.add_argument("--set", nargs="*", default=[], metavar="MODULE.NAME=VALUE", help="module constants (kernel knobs)")
    p.add_argument("--trace", type=int, default=0, metavar="N", help="profile N more steps: the kernel timeline")
    p.add_argument("--git-rev", default=None)
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    device = torch.device(a.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("decode_b1.py needs a CUDA device (or --device cpu, to check the wiring)")
    knobs = set_knobs(a.set)
    result = {
        "date": datetime.date.today().isoformat(),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "git_revision": a.git_rev or _git_rev(), "torch": torch.__version__, "preset": a.preset,
        "batch": 1, "prompt_len": a.prompt_len, "steps": a.steps, "knobs": knobs,
        "rows": run(a.preset, a.variants, a.steps, a.repeats, a.prompt_len, device, a.trace),
    }
    if a.out:
        with open(a.out, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
