"""GPU timing shared by the op benchmarks (run as `python benchmarks/x.py`, so benchmarks/ is on sys.path)."""
from __future__ import annotations

import statistics

import torch


def cuda_ms(fn, reps: int, warmup: int = 3) -> float:
    """Median milliseconds of fn() over `reps` calls after `warmup` untimed ones, by CUDA events (each call
    timed alone: a synchronize after it), rounded to 3 decimals."""
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
