"""MQAR sweeps: the BASED paper's figure 2 and a CPU-sized quick version; resumable run by run."""
from __future__ import annotations

import json
import os
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from pathlib import Path

import numpy as np

from .train import MQARRun, MQARTask, train_mqar

# BASED paper, figure 2 (Zoology's arxiv24_based_figure2 setting): (seq_len, kv pairs, examples).
FIGURE2_TRAIN = ((64, 4, 100_000), (128, 8, 20_000), (256, 16, 20_000), (256, 32, 20_000), (256, 64, 20_000))
FIGURE2_TEST = ((64, 4, 1000), (64, 8, 1000), (64, 16, 1000), (128, 32, 1000), (256, 64, 1000), (512, 128, 1000),
                (1024, 256, 1000))
FIGURE2_LRS = tuple(float(lr) for lr in np.logspace(-3, -1.5, 4))
FIGURE2_MODELS = (
    *[("linear_attn", d, {"feature_dim": f}) for d in (48, 64, 128) for f in (8, 16, 24)],
    *[("attention", d, {}) for d in (64, 128)],
    *[("sliding_window", 128, {"window_size": w}) for w in (8, 16, 32, 64, 128, 256, 512, 1024)],
    *[("mamba", d, {"ssm_state_size": n}) for d in (64, 128, 256) for n in (8, 16, 24)],
    *[("hyena", d, {}) for d in (64, 128, 256)],
    *[("h3", d, {}) for d in (64, 128, 256)],
    # Lightning's state is d^2 / H: the head count is its dial, as N is Mamba-2's (state 2 d N).
    *[("lightning", d, {"lightning_num_heads": h}) for d in (64, 128, 256) for h in (1, 4, 16)],
    *[("mamba2", d, {"ssm_state_size": n}) for d in (64, 128, 256) for n in (8, 16, 24)],
    *[("rwkv", d, {}) for d in (64, 128, 256)],  # RWKV-5, head size 64: state 64 d
)


def _tasks(spec, scale: float = 1.0) -> tuple[MQARTask, ...]:
    return tuple(MQARTask(T, kv, max(1, round(n * scale))) for T, kv, n in spec)


def figure2_runs(scale: float = 1.0, epochs: int = 32) -> list[MQARRun]:
    """The paper's sweep: every model of FIGURE2_MODELS at every lr of FIGURE2_LRS; batch 256, vocab 8192,
    AdamW wd 0.1, cosine. `scale` multiplies the example counts and `epochs` replaces 32: for smoke
    tests of the machinery, not for results."""
    train, test = _tasks(FIGURE2_TRAIN, scale), _tasks(FIGURE2_TEST, scale)
    return [
        MQARRun(mixer, d, lr, kwargs, train=train, test=test, vocab_size=8192, epochs=epochs, batch_size=256)
        for mixer, d, kwargs in FIGURE2_MODELS for lr in FIGURE2_LRS
    ]


# A GPU-sized figure 2 (one H200, --jobs 8, about 6 minutes; see docs/mqar.md for the estimate): the same
# tasks, test sets, vocabulary, batch and schedule, a quarter of the training examples for 6 epochs (1062
# steps, 4.7% of figure 2's 22.5k), the two middle learning rates, and the models that answer figure 2's
# question (does Based beat Mamba, H3 and Hyena at equal state?) with each state-size range covered. Longest
# runs first (estimated), so that the last ones to finish are short; the first lr for every model before
# the second, so that a time cap cuts the second lr only.
FIGURE2_SHORT_MODELS = (
    ("h3", 256, {}),
    ("mamba", 256, {"ssm_state_size": 16}),
    ("rwkv", 128, {}),
    ("h3", 128, {}),
    ("mamba", 128, {"ssm_state_size": 16}),
    ("mamba2", 128, {"ssm_state_size": 16}),
    ("hyena", 128, {}),
    ("mamba", 64, {"ssm_state_size": 16}),
    ("linear_attn", 128, {"feature_dim": 16}),
    ("lightning", 128, {"lightning_num_heads": 4}),
    *[("sliding_window", 128, {"window_size": w}) for w in (16, 64, 256)],
    ("h3", 64, {}),
    ("hyena", 64, {}),
    *[("linear_attn", 64, {"feature_dim": f}) for f in (8, 16, 24)],
    ("attention", 64, {}),
)
FIGURE2_SHORT_LRS = (FIGURE2_LRS[2], FIGURE2_LRS[1])  # 1e-2 first: short runs favour the larger step


def figure2_short_runs(scale: float = 1.0, epochs: int = 6) -> list[MQARRun]:
    """FIGURE2_SHORT_MODELS at the two middle lrs of figure 2, trained on a quarter of its examples for
    6 epochs, tested on its full test sets; `scale` multiplies every example count (smoke tests)."""
    train, test = _tasks(FIGURE2_TRAIN, 0.25 * scale), _tasks(FIGURE2_TEST, scale)
    return [
        MQARRun(mixer, d, lr, kwargs, train=train, test=test, vocab_size=8192, epochs=epochs, batch_size=256)
        for lr in FIGURE2_SHORT_LRS for mixer, d, kwargs in FIGURE2_SHORT_MODELS
    ]


# A CPU-sized version (2 cores, <= 10 minutes): T = 64, a 128-token vocabulary (fast to learn), one lr,
# d_model 64 (Mamba 32: its scan materialises [B, T, 2d, N], 4x the cost). Mamba first, the longest run:
# with --jobs 2 the short runs fill the other worker meanwhile.
QUICK_TRAIN = ((64, 4, 1000), (64, 8, 2000), (64, 16, 2000))
QUICK_TEST = ((64, 8, 500), (64, 16, 500))
QUICK_MODELS = (
    ("mamba", 32, {"ssm_state_size": 8}),
    ("attention", 64, {}),
    *[("sliding_window", 64, {"window_size": w}) for w in (8, 16, 32)],
    *[("linear_attn", 64, {"feature_dim": f}) for f in (2, 4, 8, 16)],
    ("h3", 64, {"h3_state_size": 16}),
    ("hyena", 64, {}),
    ("lightning", 64, {"lightning_num_heads": 4}),
    ("mamba2", 64, {"ssm_state_size": 8}),
    ("rwkv", 64, {}),
    ("base_conv", 64, {}),
)


def quick_runs(scale: float = 1.0, epochs: int = 4) -> list[MQARRun]:
    """QUICK_MODELS at lr 3e-3, batch 32, 4 epochs (~630 steps)."""
    train, test = _tasks(QUICK_TRAIN, scale), _tasks(QUICK_TEST, scale)
    return [
        MQARRun(mixer, d, 3e-3, kwargs, train=train, test=test, vocab_size=128, epochs=epochs, batch_size=32)
        for mixer, d, kwargs in QUICK_MODELS
    ]


SWEEPS = {"quick": quick_runs, "figure2": figure2_runs, "figure2-short": figure2_short_runs}


def read_results(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _init_worker(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)


def _devices(device: str, jobs: int) -> list[str]:
    """Devices to hand runs to in turn: with device "cuda" and several jobs, every visible GPU."""
    if device == "cuda" and jobs > 1:
        import torch

        n = torch.cuda.device_count()
        if n > 1:
            return [f"cuda:{i}" for i in range(n)]
    return [device]


def run_sweep(
    runs: list[MQARRun], out_dir: str | Path, device: str = "cpu", jobs: int = 1, limit: int | None = None,
    progress: bool = True, time_limit: float | None = None,
) -> list[dict]:
    """Train the runs not yet in out_dir/results.jsonl (at most `limit` of them), appending one row per
    finished run, then redraw out_dir/pareto.png from every row. Returns all rows.

    time_limit: seconds after which no new run starts (runs already started, and with jobs > 1 the one
    queued behind them, still finish). A run that raises is reported on stderr and left out of
    results.jsonl, so a rerun tries it again; the others go on.
    """
    import sys
    import time
    import traceback

    from tqdm import tqdm

    from .plot import plot_pareto

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    results = out / "results.jsonl"
    done = {row["run_id"] for row in read_results(results)}
    todo = [r for r in runs if r.run_id not in done][:limit]
    devices = _devices(device, jobs)
    deadline = None if time_limit is None else time.monotonic() + time_limit

    def record(row: dict) -> None:
        with results.open("a") as f:
            f.write(json.dumps(row) + "\n")

    def failed(run: MQARRun, error: BaseException) -> None:
        tb = "".join(traceback.format_exception(type(error), error, error.__traceback__))
        print(f"MQAR run {run.model_name} lr={run.lr:.3g} failed, not recorded:\n{tb}", file=sys.stderr)

    bar = tqdm(total=len(todo), desc=f"MQAR runs ({len(done)} done before)", disable=not progress)
    if jobs <= 1:
        for run in todo:
            if deadline is not None and time.monotonic() > deadline:
                break
            bar.set_postfix_str(run.model_name)
            try:
                record(train_mqar(run, device))
            except Exception as error:  # one broken mixer must not stop the sweep
                failed(run, error)
            bar.update()
    else:
        # Processes rather than threads: the small ops of these models scale better one core each.
        threads = max(1, (os.cpu_count() or 1) // jobs)
        import multiprocessing

        with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn"),
                                 initializer=_init_worker, initargs=(threads,)) as pool:
            futures = {pool.submit(train_mqar, run, devices[k % len(devices)]): run for k, run in enumerate(todo)}
            pending = set(futures)
            while pending:
                timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
                finished, pending = wait(pending, timeout=timeout, return_when=FIRST_COMPLETED)
                for future in finished:
                    if future.cancelled():
                        continue
                    try:
                        row = future.result()
                    except Exception as error:
                        failed(futures[future], error)
                    else:
                        record(row)
                        bar.set_postfix_str(row["model"])
                    bar.update()
                if deadline is not None and time.monotonic() > deadline:
                    for future in pending:
                        future.cancel()  # runs not yet handed to a worker
                    deadline = None
    bar.close()
    rows = read_results(results)
    if rows:
        plot_pareto(rows, out / "pareto.png")
    return rows
