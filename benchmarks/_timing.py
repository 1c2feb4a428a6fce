"""GPU timing shared by the op benchmarks (run as `python benchmarks/x.py`, so benchmarks/ is on sys.path)."""
from __future__ import annotations

import json
import os
import statistics
import tempfile

import torch


def cuda_ms(fn, reps: int, warmup: int = 3, graph: bool = False) -> float:
    """Median milliseconds of fn() over `reps` calls after `warmup` untimed ones, by CUDA events (each call
    timed alone: a synchronize after it), rounded to 3 decimals. graph=True captures fn once in a CUDA graph
    and times its replays: the kernels alone, without the host's Python and dispatch time, which for
    vmap(grad(...)) of small ops is milliseconds and would hide the kernels (the stacked trainer replays graphs
    too)."""
    if graph:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(warmup):
                fn()
        torch.cuda.current_stream().wait_stream(side)
        captured = torch.cuda.CUDAGraph()
        with torch.cuda.graph(captured):
            fn()
        fn, warmup = captured.replay, 1
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return round(statistics.median(times), 3)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| in fp64, the error measure the benchmarks report against a reference form."""
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def emit(result: dict, out: str | None) -> None:
    """Print a benchmark's JSON and write it to `out` (if given), as benchmarks/results/ keeps them."""
    text = json.dumps(result, indent=1)
    print(text)
    if out:  # whole or not at all: a kill mid-write, or a second run on the same path, leaves no torn file
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(out)), prefix=".emit-")
        with os.fdopen(fd, "w") as f:
            f.write(text + "\n")
        os.chmod(tmp, 0o644)  # as open() would have made it (mkstemp's file is private)
        os.replace(tmp, out)
