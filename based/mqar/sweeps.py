"""MQAR sweeps: the BASED paper's figure 2 and a CPU-sized quick version; resumable run by run."""
from __future__ import annotations

import fcntl
import gc
import json
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from pathlib import Path

import numpy as np

from .claims import GroupClaim, GroupClaimed
from .train import MQARRun, MQARTask, steps_per_epoch, train_mqar

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


# What the table, the plot and the resume read of a row: one without them (edited, another tool's) is a broken
# line, not a KeyError traceback of --table or --plot-only.
ROW_KEYS = ("run_id", "mixer", "model", "d_model", "lr", "hparams", "state_size", "accuracy", "run")


def read_results(path: str | Path, quiet: bool = False) -> list[dict]:
    """The rows of a results.jsonl. A broken line (a write cut off by a kill, a bad merge) is reported on
    stderr with its line number and skipped, so a resumed sweep trains its run again. A run's second row (two
    sweeps started on one folder trained it twice) is reported and skipped: each run counts, and is plotted,
    once. quiet: no warnings (a re-read of a file already reported)."""
    path = Path(path)
    if not path.exists():
        return []
    rows, seen = [], set()
    # Bytes, decoded line by line: a line that is not UTF-8 is one more broken line (read_text's
    # UnicodeDecodeError was a traceback of --table and --plot-only).
    for number, line in enumerate(path.read_bytes().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line.decode())
            missing = [key for key in ROW_KEYS if key not in row] if isinstance(row, dict) else ["run_id"]
            if missing:
                raise ValueError(f"not a results row (no {', '.join(missing)})")
        except ValueError as error:
            if not quiet:
                print(f"warning: {path} line {number} is broken ({error}): skipped, its run will be trained "
                      "again", file=sys.stderr)
            continue
        if row["run_id"] in seen:
            if not quiet:
                print(f"warning: {path} line {number} repeats run {row['run_id']} (trained twice): the first row "
                      "is kept", file=sys.stderr)
            continue
        seen.add(row["run_id"])
        rows.append(row)
    return rows


def append_row(path: Path, row: dict) -> None:
    """Append one row as one write under an exclusive lock, so several processes (shards of one sweep on a
    shared folder) appending to one results.jsonl never interleave lines. A last line left without its
    newline (a writer killed mid-row) is ended first, so the new row stays a line of its own."""
    line = (json.dumps(row) + "\n").encode()
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        size = os.fstat(fd).st_size
        if size and os.pread(fd, 1, size - 1) != b"\n":
            line = b"\n" + line
        os.write(fd, line)
    finally:
        os.close(fd)  # releases the lock


def parse_shard(text: str) -> tuple[int, int]:
    """"I/N" (0 <= I < N) -> (I, N), e.g. --shard $SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT."""
    try:
        i, n = (int(v) for v in text.split("/"))
    except ValueError:
        raise ValueError(f"--shard must be I/N with integers 0 <= I < N, e.g. 0/4, got {text!r}") from None
    if not 0 <= i < n:
        raise ValueError(f"--shard must be I/N with 0 <= I < N, got {text!r}")
    return i, n


def shard_groups(groups: list[list[MQARRun]], shard: tuple[int, int] | None) -> list[list[MQARRun]]:
    """Shard I of N takes groups I, I + N, I + 2N, ... of the whole sweep's groups (finished runs included,
    so the assignment does not move as the sweep progresses): every shard computes the same split, no
    scheduler of our own decides it, and a stacked group is never split."""
    if shard is None:
        return groups
    i, n = shard
    return groups[i::n]


def run_line(row: dict) -> str:
    """One finished run: mixer, width, lr, accuracy per test task, seconds."""
    accs = " ".join(f"{task}={acc:.3f}" for task, acc in row["accuracy"].items())
    return f"{row['model']} lr={row['lr']:.2g}: {accs} ({row['seconds']:.0f} s)"


def best_table(rows: list[dict]) -> str:
    """The best run of each model (its lr with the best accuracy averaged over the test tasks), a table."""
    from .plot import best_per_model, mean_accuracy

    best = best_per_model(rows)
    if not best:
        return "no finished runs"
    width = max(len(r["model"]) for r in best)
    lines = [f"{'model':<{width}}  {'best lr':>8}  {'mean acc':>8}  {'state':>10}  runs"]
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["model"]] = counts.get(r["model"], 0) + 1
    for r in best:
        state = max(r["state_size"].values()) if r["state_size"] else 0
        lines.append(f"{r['model']:<{width}}  {r['lr']:>8.2g}  {mean_accuracy(r):>8.3f}  {state:>10,}  "
                     f"{counts[r['model']]}")
    return "\n".join(lines)


class SweepRows(list):
    """run_sweep's rows (every row of results.jsonl), with the runs of this call that failed:
    `failed` [(run, path of its traceback)], the stacked groups stopped at the time limit: `paused`, and the
    groups skipped because another process was training them: `claimed`, and the groups not started because
    they would not finish in the time left (fit): `unfit`."""

    failed: list[tuple[MQARRun, Path]]
    paused: list
    claimed: list
    unfit: list[list[MQARRun]]


_WORKER_DEVICE: str | None = None  # a worker process's own GPU (run_sweep with several GPUs)


def _init_worker(threads: int, devices=None) -> None:
    """A worker process's set-up; with `devices` (a queue) it takes one device for its whole life, so that
    each GPU trains one group at a time whichever groups finish first."""
    global _WORKER_DEVICE
    import torch

    torch.set_num_threads(threads)
    if devices is not None:
        _WORKER_DEVICE = devices.get()
        if _WORKER_DEVICE.startswith("cuda"):
            torch.cuda.set_device(_WORKER_DEVICE)  # the current device too: empty_cache after an OOM, kernels


# ms per stacked step of a model's 4 runs at d_model 128 on one H100, averaged over figure 2's tasks (weighted
# by their share of the steps), with the fused conv / norm / cross-entropy kernels: attention, H3, Mamba,
# Mamba-2 and Based (measured at d_model 64, doubled) from
# benchmarks/results/mqar-stacked-h100-2026-12-07-shared-fused.json; Hyena, RWKV and Lightning from
# mqar-stacked-h100-2026-12-07-tasks.json (before those kernels) x 0.7, the measured families' mean ratio;
# sliding window as attention. Attention, sliding window and Based (the slowest feature dim, 24) at d_model 128
# are the full sweep's own groups since (benchmarks/results/mqar-figure2-h100, aa2a735: 177, 171-179 and 308 s
# with set-up), which the estimates from the benchmarks had put at 223 and 395 s. Parallel jobs take the
# longest groups first, so the sweep does not end waiting on one long group started last, and --fit starts no
# group a sitting cannot finish.
_MS_PER_STEP_D128 = {"attention": 7.3, "h3": 28.2, "mamba": 21.3, "mamba2": 19.8, "linear_attn": 12.9,
                     "hyena": 17.4, "rwkv": 13.4, "lightning": 10.6, "sliding_window": 7.3}


# Below d_model 64 a step costs about what it costs at 64 (Based d48, feature dim 8: 154 s for its 22,624
# steps with set-up, on an H100; feature dim 16 paused at step 18,650 after 146 s), and every group spends
# seconds generating its data and capturing its graphs before its first step.
_MIN_WIDTH, _SETUP_S = 64, 15.0


def estimated_seconds(group: list[MQARRun]) -> float:
    """A group's seconds on one H100 (stacked, CUDA graphs): ms per stacked step x max(d_model, 64) / 128 x
    its steps, plus set-up (data, graph capture)."""
    run = group[0]
    ms = _MS_PER_STEP_D128.get(run.mixer, 20) * max(run.d_model, _MIN_WIDTH) / 128
    return ms * steps_per_epoch(run) * run.epochs / 1000 + _SETUP_S


NOT_STARTED = object()  # a --streams group that --fit kept from starting
WIDE_D_MODEL = 256  # --streams trains one model this wide at a time


def _init_stream_thread(device: str) -> None:
    """A --streams worker thread: its own CUDA stream as the current one (thread-local), so its group's kernels
    and graph replays queue beside the other threads' instead of behind them."""
    import torch

    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
        torch.cuda.set_stream(torch.cuda.Stream(dev))


def _with_index(device: str) -> str:
    """"cuda" as "cuda:N", N the caller's current device: set_device refuses a device without an index, and a new
    thread's current device is 0 whatever the caller's was."""
    import torch

    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        return f"cuda:{torch.cuda.current_device()}"
    return device


def train_on_streams(groups: list[list[MQARRun]], streams: int, device: str, start: Callable,
                     deadline: float | None) -> Iterator[tuple[list[MQARRun], object]]:
    """Yield (group, outcome) as `streams` threads train the groups, each thread on a CUDA stream of its own
    (_init_stream_thread); outcome is start(group)'s result or the exception it raised.

    Threads take the first group left in order, except that a model of width >= WIDE_D_MODEL waits while another
    one trains (four such runs stacked hold 15-38 GB on an H100: two would not fit) and the thread takes the
    next narrow group instead. No group starts past `deadline` (time.monotonic())."""
    cond = threading.Condition()
    device = _with_index(device)
    todo, done = list(groups), []
    state = {"wide": False, "alive": streams, "error": None}

    def wide(group: list[MQARRun]) -> bool:
        return group[0].d_model >= WIDE_D_MODEL

    def take() -> list[MQARRun] | None:  # under cond
        while todo and (deadline is None or time.monotonic() <= deadline):
            group = next((g for g in todo if not (wide(g) and state["wide"])), None)
            if group is not None:
                todo.remove(group)
                state["wide"] = state["wide"] or wide(group)
                return group
            cond.wait()
        return None

    def worker() -> None:
        try:
            try:
                _init_stream_thread(device)
            except Exception as error:  # no stream, no training: said in the main thread once all have ended
                state["error"] = error
                return
            while True:
                with cond:
                    group = take()
                if group is None:
                    return
                try:
                    outcome = start(group)
                except Exception as error:  # noqa: BLE001 - the sweep reports it; this thread goes on
                    outcome = error
                with cond:
                    state["wide"] = state["wide"] and not wide(group)
                    done.append((group, outcome))
                    cond.notify_all()
        finally:
            with cond:
                state["alive"] -= 1
                cond.notify_all()

    threads = [threading.Thread(target=worker, name=f"mqar-stream-{i}", daemon=True) for i in range(streams)]
    for thread in threads:
        thread.start()
    while True:
        with cond:
            while not done and state["alive"]:
                cond.wait()
            batch = done[:]
            done.clear()
            if not batch and not state["alive"]:
                break
        yield from batch
    for thread in threads:
        thread.join()
    if state["error"] is not None and todo:
        raise RuntimeError(f"--streams: a training thread could not start on {device}: {state['error']}")


def _devices(device: str, jobs: int) -> list[str]:
    """Devices to hand runs to in turn: with device "cuda" and several jobs, every visible GPU."""
    if device == "cuda" and jobs > 1:
        import torch

        n = torch.cuda.device_count()
        if n > 1:
            return [f"cuda:{i}" for i in range(n)]
    return [device]


def train_group(runs: list[MQARRun], device: str, stacked: bool, deadline: float | None = None,
                checkpoint_dir: Path | None = None) -> list[dict]:
    """Rows of the runs of one group: stacked, or one by one. A stacked group that does not fit the device's
    memory is halved and tried again (k = 1 trains alone); one still training at `deadline` (time.time())
    saves its state to checkpoint_dir and raises Paused."""
    import torch

    if not stacked:
        return [train_mqar(run, device) for run in runs]
    from .stacked import CUDA_SETUP_LOCK, train_stacked

    try:
        return train_stacked(runs, device, deadline=deadline, checkpoint_dir=checkpoint_dir)
    except torch.OutOfMemoryError:
        if len(runs) == 1:
            raise
    # Outside the except block, so the failed attempt's tensors (its traceback holds them) are freed first.
    gc.collect()
    with CUDA_SETUP_LOCK:
        torch.cuda.empty_cache()
    half = len(runs) // 2
    return (train_group(runs[:half], device, stacked, deadline, checkpoint_dir)
            + train_group(runs[half:], device, stacked, deadline, checkpoint_dir))


def train_claimed(group: list[MQARRun], device: str, stacked: bool, deadline: float | None, out: Path) -> list[dict]:
    """Train the runs of `group` that out/results.jsonl does not hold yet, under the group's claim
    (claims.py: read again once claimed, so a run another process finished meanwhile is not trained twice),
    append their rows and return them. Raises GroupClaimed while another process trains the group."""
    device = _WORKER_DEVICE or device
    results = out / "results.jsonl"
    with GroupClaim(out, [r.run_id for r in group], group[0].model_name):
        done = {row["run_id"] for row in read_results(results, quiet=True)}
        left = [r for r in group if r.run_id not in done]
        rows = train_group(left, device, stacked, deadline, out / "partial") if left else []
        for row in rows:
            append_row(results, row)
    return rows


def run_sweep(
    runs: list[MQARRun], out_dir: str | Path, device: str = "cpu", jobs: int = 1, limit: int | None = None,
    progress: bool = True, time_limit: float | None = None, stacked: bool | None = None,
    shard: tuple[int, int] | None = None, max_stack: int | None = None, fit: bool = False, streams: int = 1,
) -> SweepRows:
    """Train the runs not yet in out_dir/results.jsonl (at most `limit` of them), appending one row per
    finished run and printing it as one line, then redraw out_dir/pareto.png from every row. Returns all
    rows (SweepRows: with the failed runs of this call).

    stacked: train the runs that differ only in lr as one stacked model (based/mqar/stacked.py; default:
    on CUDA), at most max_stack at once. shard (I, N): train only this shard's groups (shard_groups).
    time_limit: seconds after which no new group starts; a stacked group still training then saves its
    state to out_dir/partial/ and stops (Paused; the next call goes on from there), runs trained alone
    finish (with jobs > 1, so does the one queued behind them). A run that raises is left out of
    results.jsonl (a rerun tries it again), its traceback written to out_dir/failures/<run_id>.txt; the
    others go on. Each group trains under its claim (claims.py): sweeps started on one out_dir share its
    groups out instead of training them twice. jobs > 1 with device "cuda" and several GPUs: each worker
    process keeps one GPU; stacked groups go to workers longest first (estimated_seconds).

    fit (with time_limit): start no group whose estimated_seconds (an H100's) exceed the time left (jobs > 1:
    the time limit), for machines that lose out_dir/partial/ between sittings, where a paused group is
    wasted work; it is reported, listed in `unfit`, and later groups that fit go on.
    streams > 1 (with jobs 1): that many groups train at once in threads of this process, each on a CUDA
    stream of its own, so that small groups' kernels, which may not fill a GPU, can run side by side on one
    GPU (threads, not processes: kernels of different processes do not overlap without MPS).
    """
    import traceback

    from tqdm import tqdm

    from .plot import plot_pareto
    from .stacked import Paused, group_runs

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    results = out / "results.jsonl"
    if stacked is None:
        stacked = device.startswith("cuda")
    done = {row["run_id"] for row in read_results(results)}
    # The sweep's order kept (figure2-short puts every model's first lr before any second one).
    mine_ids = {r.run_id for g in shard_groups(group_runs(runs), shard) for r in g}
    mine = [r for r in runs if r.run_id in mine_ids]
    todo = [r for r in mine if r.run_id not in done][:limit]
    groups = group_runs(todo, max_stack) if stacked else [[r] for r in todo]
    if streams < 1 or (streams > 1 and jobs > 1):
        raise ValueError(f"streams must be >= 1 and needs jobs 1 when > 1, got streams={streams}, jobs={jobs}")
    devices = _devices(device, jobs)
    if (jobs > 1 or streams > 1) and stacked:  # (unstacked, the sweep's own order stands: figure2-short puts first lrs first)
        groups.sort(key=estimated_seconds, reverse=True)  # stable: the sweep's order among equals
    deadline = None if time_limit is None else time.monotonic() + time_limit
    pause_at = None if time_limit is None else time.time() + time_limit
    failed: list[tuple[MQARRun, Path]] = []
    paused: list[Paused] = []
    claimed: list[GroupClaimed] = []
    unfit: list[list[MQARRun]] = []

    bar = tqdm(total=len(todo), desc=f"MQAR runs ({len(done)} done before)", disable=not progress)

    def finished(rows: list[dict]) -> None:
        for row in rows:  # train_claimed appended them
            (out / "failures" / f"{row['run_id']}.txt").unlink(missing_ok=True)  # an earlier failure, now fixed
            tqdm.write(run_line(row), file=sys.stdout)

    def failed_group(group: list[MQARRun], error: BaseException) -> None:
        tb = "".join(traceback.format_exception(type(error), error, error.__traceback__))
        (out / "failures").mkdir(exist_ok=True)
        for run in group:
            path = out / "failures" / f"{run.run_id}.txt"
            path.write_text(f"{run.model_name} lr={run.lr:.3g} on {device}\n{json.dumps(run.to_dict())}\n\n{tb}")
            failed.append((run, path))
            tqdm.write(f"FAILED {run.model_name} lr={run.lr:.2g}: {type(error).__name__}: {error} ({path})",
                       file=sys.stderr)

    def ended(group: list[MQARRun], outcome) -> None:
        """A group's end, whatever it was: rows, paused, claimed by another process, failed."""
        if isinstance(outcome, Paused):
            paused.append(outcome)
            tqdm.write(f"paused: {outcome} (rerun to go on)", file=sys.stdout)
        elif isinstance(outcome, GroupClaimed):
            claimed.append(outcome)
            tqdm.write(str(outcome), file=sys.stdout)
        elif isinstance(outcome, BaseException):  # one broken mixer must not stop the sweep
            failed_group(group, outcome)
        else:
            finished(outcome)
        bar.update(len(group))

    def fits(group: list[MQARRun], left: float) -> bool:
        """fit: a group that would still train when the time is up is not started (its partial state would be
        lost with the machine); reported and counted. Beside other streams a group may run up to `streams`
        times slower than alone (the estimate's case)."""
        need = estimated_seconds(group) * streams
        if not fit or deadline is None or need <= left:
            return True
        unfit.append(group)
        tqdm.write(f"not started: {group[0].model_name} needs ~{need:.0f} s on an H100, "
                   f"{left:.0f} s left (--fit)", file=sys.stdout)
        bar.update(len(group))
        return False

    if jobs <= 1 and streams <= 1:
        for group in groups:
            if deadline is not None and time.monotonic() > deadline:
                break
            if not fits(group, 0.0 if deadline is None else deadline - time.monotonic()):
                continue
            bar.set_postfix_str(group[0].model_name)
            try:
                outcome = train_claimed(group, device, stacked, pause_at, out)
            except Exception as error:
                outcome = error
            ended(group, outcome)
    elif streams > 1:
        import torch

        # training_device sets TF32 on CUDA and restores the previous setting as each group ends: "high" while the
        # threads run, so no thread's matmuls change precision under another's; the caller's setting after.
        precision = torch.get_float32_matmul_precision()
        if device.startswith("cuda"):
            torch.set_float32_matmul_precision("high")

        def start(group: list[MQARRun]):
            """--fit judged when a thread takes the group up, on the time then left (threads share the clock
            and the lists)."""
            if not fits(group, 0.0 if deadline is None else deadline - time.monotonic()):
                return NOT_STARTED
            return train_claimed(group, device, stacked, pause_at, out)

        try:
            for group, outcome in train_on_streams(groups, streams, device, start, deadline):
                if outcome is not NOT_STARTED:
                    ended(group, outcome)
        finally:
            torch.set_float32_matmul_precision(precision)
    else:
        # Processes rather than threads: the small ops of these models scale better one core each.
        threads = max(1, (os.cpu_count() or 1) // jobs)
        import multiprocessing

        context = multiprocessing.get_context("spawn")
        queue = None
        if len(devices) > 1:  # each worker keeps one GPU: jobs = GPUs trains one group per GPU at a time
            queue = context.Queue()
            for k in range(jobs):
                queue.put(devices[k % len(devices)])
        with ProcessPoolExecutor(jobs, mp_context=context, initializer=_init_worker,
                                 initargs=(threads, queue)) as pool:
            # fit: all groups are queued at once, so only those longer than the whole limit are known not to
            # fit; one queued behind others may still start late and pause.
            futures = {pool.submit(train_claimed, group, device, stacked, pause_at, out): group for group in groups
                       if fits(group, time_limit or 0.0)}
            pending = set(futures)
            while pending:
                timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
                done_now, pending = wait(pending, timeout=timeout, return_when=FIRST_COMPLETED)
                for future in done_now:
                    if not future.cancelled():
                        error = future.exception()
                        ended(futures[future], error if error is not None else future.result())
                if deadline is not None and time.monotonic() > deadline:
                    for future in pending:
                        future.cancel()  # groups not yet handed to a worker
                    deadline = None
    bar.close()
    rows = SweepRows(read_results(results))
    rows.failed, rows.paused, rows.claimed, rows.unfit = failed, paused, claimed, unfit
    if rows:
        plot_pareto(rows, out / "pareto.png")
    return rows
