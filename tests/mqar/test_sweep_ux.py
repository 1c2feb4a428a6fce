"""What a user of the MQAR sweep sees (issue 20 section 4): one line per run, the best-run table, failures
that end non-zero with their tracebacks on disk, refused settings, broken results lines, shards."""

import json
import multiprocessing

import pytest

import based.mqar.sweeps as sweeps
from based.cli import main
from based.mqar import MQARRun, MQARTask, figure2_runs, read_results, run_sweep
from based.mqar.plot import decade_limits, overlapping
from based.mqar.stacked import group_runs, stack_key
from based.mqar.sweeps import append_row, parse_shard, shard_groups

TINY = dict(train=(MQARTask(16, 2, 32),), test=(MQARTask(16, 2, 8), MQARTask(16, 1, 8)), vocab_size=32, epochs=1,
            batch_size=16)


def tiny_sweep(scale=1.0, epochs=1):
    return [MQARRun(m, 16, lr, **{**TINY, "epochs": epochs}) for m in ("attention", "sliding_window")
            for lr in (1e-3, 1e-2)]


@pytest.fixture
def tiny_cli(monkeypatch):
    monkeypatch.setitem(sweeps.SWEEPS, "quick", tiny_sweep)


def test_failed_runs_exit_nonzero_and_leave_their_tracebacks(tmp_path, capsys, monkeypatch, tiny_cli):
    real = sweeps.train_mqar

    def flaky(run, device):
        if run.mixer == "sliding_window":
            raise RuntimeError("planted failure")
        return real(run, device)

    monkeypatch.setattr(sweeps, "train_mqar", flaky)
    assert main(["mqar", "--quick", "--jobs", "1", "--out", str(tmp_path)]) == 1
    out, err = capsys.readouterr()
    assert "2 runs failed" in err and str(tmp_path / "failures") in err
    failures = sorted((tmp_path / "failures").glob("*.txt"))
    assert len(failures) == 2 and all("planted failure" in f.read_text() for f in failures)
    # One line per finished run (model, lr, accuracy per test task, seconds), then the best-run table.
    lines = [line for line in out.splitlines() if line.startswith("attention d_model=16 lr=")]
    assert len(lines) == 2 and all("T16_kv2=" in line and "T16_kv1=" in line and " s)" in line for line in lines)
    assert "best lr" in out and "mean acc" in out
    # Fixed, the rerun trains only the failed runs and clears their traceback files.
    monkeypatch.setattr(sweeps, "train_mqar", real)
    assert main(["mqar", "--quick", "--jobs", "1", "--out", str(tmp_path)]) == 0
    assert len(read_results(tmp_path / "results.jsonl")) == 4 and not list((tmp_path / "failures").glob("*.txt"))


@pytest.mark.parametrize("flags, message", [
    (["--device", "nope"], "--device 'nope' is not a torch device"),
    (["--epochs", "0"], "--epochs must be >= 1"),
    (["--shard", "2/2"], "--shard must be I/N with 0 <= I < N"),
    (["--shard", "a"], "--shard must be I/N"),
    (["--fit"], "--fit needs --time-limit"),
    (["--scale", "nan"], "--scale > 0 and finite"),
    (["--scale", "inf"], "--scale > 0 and finite"),
    (["--time-limit", "nan"], "--time-limit >= 0"),
    (["--out", ""], "--out must name a folder"),  # (it wrote results.jsonl into the working folder)
])
def test_bad_settings_are_refused(tmp_path, flags, message, tiny_cli):
    with pytest.raises(SystemExit, match=message):
        main(["mqar", "--quick", "--out", str(tmp_path), *flags])
    assert not (tmp_path / "results.jsonl").exists()


def test_more_jobs_than_cpu_cores_are_refused(tmp_path, monkeypatch, tiny_cli):
    # --jobs 100000 would have spawned a process (torch and all) per group of the sweep.
    monkeypatch.setattr("os.cpu_count", lambda: 2)
    for jobs in ("100000", "3"):
        with pytest.raises(SystemExit, match=rf"^--jobs {jobs} is more than this machine's 2 CPU cores \(one process "
                                             r"per job, at least a core each\): give --jobs 2 or fewer$"):
            main(["mqar", "--quick", "--jobs", jobs, "--out", str(tmp_path)])
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("sub, message", [("file", "is an existing file, not a folder"),
                                          ("file/sub", "is under .*file, a file, not a folder")])
@pytest.mark.parametrize("mode", [[], ["--table"]])
def test_an_out_that_is_a_file_is_refused_in_one_line(tmp_path, sub, message, mode, tiny_cli):
    # Before: FileExistsError's traceback from run_sweep's mkdir.
    (tmp_path / "file").write_text("keep me")
    with pytest.raises(SystemExit, match=f"^--out .*{message}: choose another --out$"):
        main(["mqar", "--quick", "--out", str(tmp_path / sub), *mode])
    assert (tmp_path / "file").read_text() == "keep me"


@pytest.fixture(scope="module")
def one_row(tmp_path_factory):
    """results.jsonl of one finished tiny run: something for --plot-only and --table to read."""
    out = tmp_path_factory.mktemp("one_row")
    run_sweep(tiny_sweep()[:1], out, progress=False)
    return (out / "results.jsonl").read_text()


@pytest.mark.parametrize("entry, kind, message", [
    ("results.jsonl", "dir", "results.jsonl is a folder, not the sweep's results.jsonl"),
    ("pareto.png", "dir", "pareto.png is a folder, not the sweep's pareto.png"),
    ("claims", "file", "claims is a file, not the sweep's claims/ folder"),
])
@pytest.mark.parametrize("mode", [[], ["--plot-only"], ["--table"]])
def test_an_entry_of_out_that_cannot_be_written_is_refused_in_one_line(tmp_path, entry, kind, message, mode, one_row,
                                                                        monkeypatch, tiny_cli):
    # Before: IsADirectoryError's traceback (for pareto.png after the whole sweep had trained), FileExistsError's.
    def train(*args):
        raise AssertionError("trained")

    monkeypatch.setattr(sweeps, "train_mqar", train)
    (tmp_path / "results.jsonl").write_text(one_row)
    path = tmp_path / entry
    if kind == "dir":
        path.unlink(missing_ok=True)
        path.mkdir()
    else:
        path.write_text("keep me")
    argv = ["mqar", "--quick", "--jobs", "1", "--out", str(tmp_path), *mode]
    # --table reads results.jsonl only; --plot-only and --table train nothing, so claims/ is not theirs.
    if (mode == ["--table"] and entry == "pareto.png") or (mode and entry == "claims"):
        assert main(argv) == 0
        return
    with pytest.raises(SystemExit, match=f"^--out {tmp_path}: {tmp_path}/{message}: move it away or choose another "
                                         "--out$"):
        main(argv)


def test_lines_that_are_not_results_rows_are_skipped_not_a_traceback(tmp_path, capsys):
    # Before: bytes that are not UTF-8 were a UnicodeDecodeError, a row of another tool a KeyError (--table and
    # --plot-only); now each is a broken line.
    path = tmp_path / "results.jsonl"
    run_sweep(tiny_sweep()[:1], tmp_path, progress=False)
    good = path.read_bytes()
    path.write_bytes(b"\xee\xff garbage\n" + json.dumps({"run_id": "x"}).encode() + b"\n" + good)
    capsys.readouterr()
    assert len(read_results(path)) == 1
    err = capsys.readouterr().err
    assert f"{path} line 1 is broken ('utf-8' codec" in err
    assert f"{path} line 2 is broken (not a results row (no mixer, model," in err
    assert main(["mqar", "--quick", "--out", str(tmp_path), "--table", "--plot-only"]) == 0


def test_a_broken_line_is_reported_skipped_and_its_run_redone(tmp_path, capsys):
    runs = tiny_sweep()[:3]
    run_sweep(runs, tmp_path, progress=False)
    path = tmp_path / "results.jsonl"
    lines = path.read_text().splitlines()
    # Line 2 mangled; line 3 cut off mid-row without its newline (a writer killed mid-write).
    path.write_text(f"{lines[0]}\n{lines[1][:40]}}}\n{lines[2][:50]}")
    capsys.readouterr()
    assert [r["run_id"] for r in read_results(path)] == [runs[0].run_id]
    err = capsys.readouterr().err
    assert f"{path} line 2 is broken" in err and f"{path} line 3 is broken" in err
    rows = run_sweep(runs, tmp_path, progress=False)
    assert sorted(r["run_id"] for r in rows) == sorted(r.run_id for r in runs)
    assert len(path.read_text().splitlines()) == 5  # the broken lines stay, each new row on a line of its own


def test_a_run_trained_twice_counts_once(tmp_path, capsys):
    """Two sweeps started on one folder may both train a run: each row is appended whole (locked), and the
    reader keeps a run's first row, so counts, tables and the plot see every run once."""
    runs = tiny_sweep()[:2]
    run_sweep(runs, tmp_path, progress=False)
    path = tmp_path / "results.jsonl"
    first, second = path.read_text().splitlines()
    twin = {**json.loads(first), "final_train_loss": -1.0}
    append_row(path, twin)  # the other process's row for the same run
    capsys.readouterr()
    rows = read_results(path)
    assert [r["run_id"] for r in rows] == [runs[0].run_id, runs[1].run_id]
    assert rows[0] == json.loads(first)  # the first row kept, the twin left out
    assert f"{path} line 3 repeats run {runs[0].run_id}" in capsys.readouterr().err


def test_shards_split_the_sweep_by_whole_groups(tmp_path):
    groups = group_runs(figure2_runs())
    assert len(groups) == 55 and all(len(g) == 4 and len({stack_key(r) for r in g}) == 1 for g in groups)
    shards = [shard_groups(groups, (i, 3)) for i in range(3)]
    ids = [r.run_id for s in shards for g in s for r in g]
    assert sorted(ids) == sorted(r.run_id for r in figure2_runs()) and [len(s) for s in shards] == [19, 18, 18]
    assert parse_shard("1/3") == (1, 3)
    for i in range(2):  # two "nodes" of one sweep, one results.jsonl
        run_sweep(tiny_sweep(), tmp_path, progress=False, shard=(i, 2))
        models = {r["mixer"] for r in read_results(tmp_path / "results.jsonl")}
        assert len(models) == i + 1
    assert len(read_results(tmp_path / "results.jsonl")) == 4


def _append_many(path, tag):
    for i in range(30):
        append_row(path, {"run_id": f"{tag}-{i}", "pad": tag * 20_000})  # rows far beyond one pipe buffer


def test_appends_from_several_processes_never_interleave(tmp_path):
    path = tmp_path / "results.jsonl"
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_append_many, args=(path, tag)) for tag in "abcd"]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert sorted(r["run_id"] for r in rows) == sorted(f"{t}-{i}" for t in "abcd" for i in range(30))


def test_overlapping_points_are_clustered_for_spreading():
    panel = [(1024, 0.5, "a"), (1024, 0.52, "b"), (1024, 0.9, "c"), (2048, 0.5, "d"), (1024, 0.49, "e")]
    assert [[p[2] for p in c] for c in overlapping(panel)] == [["c"], ["b", "a", "e"], ["d"]]


def test_a_group_out_of_memory_is_halved(monkeypatch):
    import torch

    import based.mqar.stacked as stacked

    sizes = []

    def fake(runs, device, **kw):
        sizes.append(len(runs))
        if len(runs) > 1:
            raise torch.OutOfMemoryError("planted")
        return [{"run_id": runs[0].run_id}]

    monkeypatch.setattr(stacked, "train_stacked", fake)
    runs = tiny_sweep()[:2] + tiny_sweep()[:1]
    rows = sweeps.train_group(runs, "cpu", stacked=True)
    assert [r["run_id"] for r in rows] == [r.run_id for r in runs] and sizes == [3, 1, 2, 1, 1]


def test_runs_keep_the_sweep_order(tmp_path):
    """Unstacked, runs train in the sweep's order (figure2-short's first lr of every model before any
    second one), not grouped by model."""
    runs = [MQARRun(m, 16, lr, **TINY) for lr in (1e-3, 1e-2) for m in ("attention", "sliding_window")]
    rows = run_sweep(runs, tmp_path, progress=False, limit=2)
    assert [(r["mixer"], r["lr"]) for r in rows] == [("attention", 1e-3), ("sliding_window", 1e-3)]


def test_a_group_another_process_trains_is_skipped_then_trained_later(tmp_path, capsys, tiny_cli):
    from based.mqar.claims import GroupClaim, GroupClaimed

    runs = tiny_sweep()
    held = [r for r in runs if r.mixer == "attention"]
    with GroupClaim(tmp_path, [r.run_id for r in held], held[0].model_name):  # "another process" (own fd)
        with pytest.raises(GroupClaimed, match=r"another process is training it \(pid \d+ on "):
            with GroupClaim(tmp_path, [r.run_id for r in held], held[0].model_name):
                pass
        # one group per run on the CPU (not stacked): the attention runs are held as a group of two here,
        # so claim each alone as the sweep does
        with GroupClaim(tmp_path, [held[0].run_id], held[0].model_name), \
                GroupClaim(tmp_path, [held[1].run_id], held[1].model_name):
            assert main(["mqar", "--quick", "--jobs", "1", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert out.count("skipped, another process is training it") == 2 and "2 models skipped" in out
    assert {r["mixer"] for r in read_results(tmp_path / "results.jsonl")} == {"sliding_window"}
    assert main(["mqar", "--quick", "--jobs", "1", "--out", str(tmp_path)]) == 0  # the claims are free again
    assert sorted(r["run_id"] for r in read_results(tmp_path / "results.jsonl")) == sorted(r.run_id for r in runs)


def _sweep_into(out, barrier):
    import based.mqar.sweeps as sweeps_here

    real, first = sweeps_here.train_group, [True]

    def slow(*args, **kwargs):  # each process's first group starts once both hold one
        if first.pop() if first else False:
            barrier.wait(timeout=60)
        return real(*args, **kwargs)

    sweeps_here.train_group = slow
    run_sweep(tiny_sweep(), out, progress=False)


def test_two_sweeps_on_one_folder_train_each_run_once(tmp_path):
    ctx = multiprocessing.get_context("fork")
    barrier = ctx.Barrier(2)
    procs = [ctx.Process(target=_sweep_into, args=(tmp_path, barrier)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=300)
    assert [p.exitcode for p in procs] == [0, 0]
    lines = [json.loads(line)["run_id"] for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert sorted(lines) == sorted(r.run_id for r in tiny_sweep())  # every run, none twice


def test_parallel_jobs_take_the_longest_groups_first():
    groups = group_runs(figure2_runs())
    order = sorted(groups, key=sweeps.estimated_seconds, reverse=True)
    assert order[0][0].mixer in ("h3", "mamba", "mamba2") and order[0][0].d_model == 256
    assert order[-1][0].d_model == 64 and order[-1][0].mixer in ("attention", "sliding_window", "lightning")


def test_estimated_seconds_match_the_measured_group():
    """Figure 2's attention d_model 128 group (4 lrs stacked) took 177 s on an H100 in the full sweep, set-up
    included (benchmarks/results/mqar-figure2-h100/results.jsonl, its "seconds"); sliding window w 8 179 s."""
    groups = group_runs(figure2_runs())
    for mixer, seconds in (("attention", 177), ("sliding_window", 179)):
        group = next(g for g in groups if g[0].mixer == mixer and g[0].d_model == 128)
        assert len(group) == 4 and abs(sweeps.estimated_seconds(group) / seconds - 1) < 0.1


@pytest.mark.parametrize("jobs", [1, 2])
def test_fit_starts_no_group_longer_than_the_time_left(tmp_path, capsys, monkeypatch, tiny_cli, jobs):
    """--fit: a group the sitting cannot finish is not started (its partial state would be lost with the
    machine), reported, and the groups after it that fit still train."""
    too_long = {r.run_id for r in tiny_sweep() if r.mixer == "attention"}  # the sweep's first groups
    monkeypatch.setattr(sweeps, "estimated_seconds", lambda g: 10_000.0 if g[0].run_id in too_long else 1.0)
    rows = run_sweep(tiny_sweep(), tmp_path, jobs=jobs, progress=False, time_limit=600, fit=True)
    assert {r["mixer"] for r in read_results(tmp_path / "results.jsonl")} == {"sliding_window"} == {
        r["mixer"] for r in rows}
    assert sorted(r.run_id for g in rows.unfit for r in g) == sorted(too_long)
    out = capsys.readouterr().out
    assert out.count("not started: attention d_model=16 needs ~10000 s on an H100, ") == 2 and "(--fit)" in out
    if jobs == 1:  # (the parallel path differs only in what it submits)
        # The CLI sums the unfit models up and exits 0 (nothing failed); without fit the time limit starts them.
        assert main(["mqar", "--quick", "--jobs", "1", "--out", str(tmp_path / "cli"), "--time-limit", "600",
                     "--fit"]) == 0
        assert "2 models not started: each needs more than the time that was left (--fit" in capsys.readouterr().out
        assert len(run_sweep(tiny_sweep(), tmp_path, progress=False, time_limit=600)) == 4


def test_each_worker_keeps_one_gpu(tmp_path, monkeypatch):
    import queue

    import torch

    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)  # this test process keeps its threads
    current = []
    monkeypatch.setattr(torch.cuda, "set_device", current.append)
    devices = queue.Queue()
    for d in ("cuda:1", "cuda:0"):
        devices.put(d)
    seen = []
    monkeypatch.setattr(sweeps, "train_group", lambda runs, device, *a: seen.append(device) or [])
    monkeypatch.setattr(sweeps, "_WORKER_DEVICE", None)
    sweeps._init_worker(1, devices)  # as a worker process starts: it takes the next GPU for good
    sweeps.train_claimed(tiny_sweep()[:1], "cuda", False, None, tmp_path)
    sweeps.train_claimed(tiny_sweep()[1:2], "cuda", False, None, tmp_path)
    assert seen == ["cuda:1", "cuda:1"] and devices.get_nowait() == "cuda:0" and current == ["cuda:1"]


def _hold_claim(out, run_ids, ready):
    from based.mqar.claims import GroupClaim

    with GroupClaim(out, run_ids, "held"):
        ready.set()
        import time

        time.sleep(600)


def test_a_killed_sweep_leaves_no_claim_behind(tmp_path):
    import os
    import signal

    from based.mqar.claims import GroupClaim, GroupClaimed

    ids = [r.run_id for r in tiny_sweep()[:2]]
    ctx = multiprocessing.get_context("fork")
    ready = ctx.Event()
    holder = ctx.Process(target=_hold_claim, args=(tmp_path, ids, ready))
    holder.start()
    assert ready.wait(60)
    with pytest.raises(GroupClaimed, match=f"pid {holder.pid} on "):
        with GroupClaim(tmp_path, ids, "m"):
            pass
    os.kill(holder.pid, signal.SIGKILL)  # its claim file stays, naming it; the kernel dropped its flock
    holder.join()
    with GroupClaim(tmp_path, ids, "m"):
        assert json.loads((tmp_path / "claims").glob("*.lock").__next__().read_text())["pid"] == os.getpid()


def test_parallel_jobs_train_every_run_once(tmp_path):
    """--jobs 2: worker processes (spawned) train under claims and append their rows themselves."""
    rows = run_sweep(tiny_sweep(), tmp_path, jobs=2, progress=False)
    assert sorted(r["run_id"] for r in rows) == sorted(r.run_id for r in tiny_sweep())
    assert not rows.failed and not rows.claimed
    lines = (tmp_path / "results.jsonl").read_text().splitlines()
    assert len(lines) == 4 and (tmp_path / "pareto.png").exists()


def test_log_panels_span_whole_decades_around_every_state():
    # Within one decade matplotlib labels the minor ticks and the labels overlap; whole decades (two labelled
    # major ticks at least) with room for the sideways spread of overlapping points avoid that.
    assert decade_limits([2_500, 22_000]) == (1_000, 100_000)
    assert decade_limits([3_000]) == (1_000, 10_000)
    assert decade_limits([1_000]) == (100, 10_000)  # 1,000 / 1.5 falls below the decade
    for xs in ([7.0, 7.0], [2_925, 9_945, 19_737], [1e6, 3.1e6]):
        lo, hi = decade_limits(xs)
        assert lo * 1.5 <= min(xs) and max(xs) * 1.5 <= hi and hi >= 10 * lo


@pytest.mark.parametrize("stacked", [True, False])
def test_streams_train_every_group_once_as_one_after_the_other_does(tmp_path, stacked):
    """--streams 2: two groups at once in threads of this process (each on a CUDA stream of its own on a GPU);
    every run's row equals the one-after-the-other sweep's (the same inits: model init holds a lock around the
    global seed), and each run is trained once. Stacked or one run at a time (the CPU's default)."""
    one = run_sweep(tiny_sweep(), tmp_path / "one", progress=False, stacked=stacked)
    two = run_sweep(tiny_sweep(), tmp_path / "two", progress=False, stacked=stacked, streams=2)

    def outcome(rows):
        return {r["run_id"]: (r["final_train_loss"], r["accuracy"]) for r in rows}

    assert len(two) == 4 and outcome(two) == outcome(one)
    assert len((tmp_path / "two" / "results.jsonl").read_text().splitlines()) == 4
    with pytest.raises(ValueError, match="streams"):
        run_sweep(tiny_sweep(), tmp_path / "three", streams=2, jobs=2)
    for bad in (["--streams", "0"], ["--streams", "2", "--jobs", "2"]):
        with pytest.raises(SystemExit, match="--streams must be >= 1"):
            main(["mqar", "--quick", "--out", str(tmp_path / "cli"), *bad])


def test_fit_with_streams_judges_each_group_when_it_starts(tmp_path, capsys, monkeypatch, tiny_cli):
    """Beside another stream a group may take up to `streams` times its time alone: --fit counts that, and judges
    a group on the time left when a thread takes it up (not when it was queued)."""
    first = {r.run_id for r in tiny_sweep() if r.mixer == "attention"}
    monkeypatch.setattr(sweeps, "estimated_seconds", lambda g: 400.0 if g[0].run_id in first else 1.0)
    rows = run_sweep(tiny_sweep(), tmp_path, progress=False, stacked=True, streams=2, time_limit=600, fit=True)
    assert {r["mixer"] for r in rows} == {"sliding_window"}  # 2 x 400 s > 600 s
    assert "not started: attention d_model=16 needs ~800 s on an H100, " in capsys.readouterr().out


def test_streams_run_groups_side_by_side(tmp_path, monkeypatch):
    import threading
    import time

    spans = []

    def train(group, *args):
        start = time.monotonic()
        time.sleep(0.3)
        spans.append((threading.get_ident(), start, time.monotonic()))
        return []

    monkeypatch.setattr(sweeps, "train_claimed", train)
    run_sweep(tiny_sweep(), tmp_path, progress=False, stacked=True, streams=2)
    (a, a0, a1), (b, b0, b1) = sorted(spans, key=lambda s: s[1])
    assert a != b and b0 < a1  # two groups (4 runs, 2 lrs each), in two threads at once
    # Two wide groups (d_model >= WIDE_D_MODEL) would not fit the GPU together: one at a time, and the other
    # thread takes the narrow group queued behind them meanwhile.
    spans.clear()
    wide = [MQARRun(m, sweeps.WIDE_D_MODEL, lr, **TINY) for m in ("attention", "sliding_window") for lr in (1e-3, 1e-2)]
    run_sweep([*wide, *tiny_sweep()[:2]], tmp_path / "wide", progress=False, stacked=True, streams=2)
    (_, w0, w1), (_, n0, n1), (_, v0, v1) = sorted(spans, key=lambda s: s[1])
    assert len(spans) == 3 and n0 < w1 and v0 >= w1  # wide, the narrow one beside it, then the second wide


def test_stream_threads_get_the_callers_cuda_device_with_its_index(monkeypatch):
    # Its first GPU run failed: every thread called set_device("cuda"), which torch refuses without an index
    # (and a new thread's current device is 0, not the caller's). torch.cuda stands in here as torch answers.
    import torch

    calls = []

    def set_device(device):
        if torch.device(device).index is None:
            raise ValueError(f"Expected a torch.device with a specified index or an integer, but got:{device}")
        calls.append(str(device))

    monkeypatch.setattr(torch.cuda, "set_device", set_device)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    monkeypatch.setattr(torch.cuda, "Stream", lambda device: device)
    monkeypatch.setattr(torch.cuda, "set_stream", lambda stream: None)
    from types import SimpleNamespace

    groups = [[SimpleNamespace(d_model=64, name=name)] for name in "abc"]
    done = list(sweeps.train_on_streams(groups, 2, "cuda", start=lambda group: group[0].name, deadline=None))
    assert sorted(outcome for _, outcome in done) == ["a", "b", "c"]
    assert calls == ["cuda:3", "cuda:3"]


@pytest.mark.gpu
@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs CUDA")
def test_streams_on_cuda_capture_and_replay_graphs_side_by_side(tmp_path):
    # Two groups capture (one at a time, CUDA_SETUP_LOCK) and replay their graphs on their own streams; each row
    # as the one-after-the-other sweep gives it (up to the atomics of index_add's backward).
    runs = [r for r in figure2_runs(scale=0.002, epochs=1) if r.mixer in ("attention", "mamba") and r.d_model == 64
            and r.mixer_kwargs.get("ssm_state_size", 8) == 8]
    one = run_sweep(runs, tmp_path / "one", device="cuda", progress=False)
    two = run_sweep(runs, tmp_path / "two", device="cuda", progress=False, streams=2)
    assert len(one) == len(two) == 8 and all(r["cuda_graphs"] for r in two)
    by_id = {r["run_id"]: r for r in one}
    for row in two:
        assert abs(row["final_train_loss"] - by_id[row["run_id"]]["final_train_loss"]) < 1e-3


def test_streams_from_the_command_line(tmp_path, capsys, tiny_cli, monkeypatch):
    # --quick's default --jobs (one a core) gives way to --streams: threads of one process, not processes. The CLI
    # takes --streams on CUDA only; the sweep's calls are watched here, on a CPU, through its device check.
    with pytest.raises(SystemExit, match="--streams needs --device cuda .* on cpu use --jobs"):
        main(["mqar", "--quick", "--streams", "2", "--out", str(tmp_path)])
    import based.commands.mqar as command
    import based.mqar

    calls = []

    def sweep(runs, out, **kw):
        calls.append(kw)
        rows = sweeps.SweepRows([])
        rows.failed = rows.paused = rows.claimed = rows.unfit = []
        return rows

    monkeypatch.setattr(command, "_check_device", lambda device: None)
    monkeypatch.setattr(based.mqar, "run_sweep", sweep)
    assert main(["mqar", "--quick", "--streams", "2", "--device", "cuda", "--out", str(tmp_path)]) == 0
    assert calls[0]["streams"] == 2 and calls[0]["jobs"] == 1


def test_streams_that_cannot_start_are_an_error_not_an_empty_sweep(tmp_path, monkeypatch):
    def broken(device):
        raise RuntimeError("no such stream")

    monkeypatch.setattr(sweeps, "_init_stream_thread", broken)
    with pytest.raises(RuntimeError, match="could not start on cpu: no such stream"):
        run_sweep(tiny_sweep(), tmp_path, progress=False, stacked=True, streams=2)
