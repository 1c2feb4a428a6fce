"""`based mqar`: MQAR recall sweeps and the recall vs state-size plot (BASED paper, figure 2)."""
from __future__ import annotations

import argparse


def register(sub) -> None:
    p = sub.add_parser(
        "mqar", help="MQAR recall sweep (--quick on CPU, --sweep figure2 on GPU): results.jsonl + pareto.png",
        description="Train 2-layer MQAR models (BaseConv + the mixer under test), append one row per run to "
        "OUT/results.jsonl (runs already there are skipped) and draw OUT/pareto.png.",
    )
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--quick", action="store_const", const="quick", dest="sweep",
                       help="the CPU sweep (<= 10 minutes on 2 cores); same as --sweep quick")
    which.add_argument("--sweep", choices=("quick", "figure2", "figure2-short"),
                       help="which sweep (figure2-short: figure 2 cut to ~6 minutes of one H200 at --jobs 8)")
    p.add_argument("--out", required=True, help="output folder (results.jsonl, pareto.png); sweeps started on one "
                   "folder share its models out (each trains under a claim in OUT/claims/), none trained twice")
    p.add_argument("--device", default="cpu", help="cpu, cuda (every visible GPU when --jobs > 1) or cuda:N")
    p.add_argument("--jobs", type=int, default=None,
                   help="runs trained in parallel, one process each, at most one per CPU core (default: one per "
                   "CPU core, at most 4, for --quick; 1 otherwise); with --device cuda and several GPUs each "
                   "process keeps one GPU")
    p.add_argument("--streams", type=int, default=1,
                   help="with --device cuda (one GPU, --jobs 1): train this many models at once, each on a CUDA "
                   "stream of its own in a thread, so that small models' kernels share the GPU side by side")
    p.add_argument("--limit", type=int, default=None, help="train at most this many new runs, then stop")
    p.add_argument("--time-limit", type=float, default=None, metavar="SECONDS",
                   help="start no new run after this many seconds; stacked models still training then save "
                   "their state to OUT/partial/ and stop, runs trained alone finish; rerun to go on")
    p.add_argument("--fit", action="store_true",
                   help="with --time-limit: start no model whose estimated time exceeds the time left, for "
                   "machines that lose OUT/partial/ between sittings (no sitting ends on a model it cannot "
                   "finish); the estimates are an H100's, so on a slower GPU give a smaller --time-limit")
    p.add_argument("--scale", type=float, default=1.0,
                   help="multiply every example count (smoke tests of the sweep machinery only)")
    p.add_argument("--epochs", type=int, default=None, help="override the sweep's epochs (smoke tests; >= 1)")
    p.add_argument("--stacked", action=argparse.BooleanOptionalAction, default=None,
                   help="train the runs of one model (its learning rates) as one stacked model, its step a CUDA "
                   "graph (default: on for CUDA devices)")
    p.add_argument("--max-stack", type=int, default=None, metavar="K",
                   help="at most K runs per stacked model (default: all learning rates of a model)")
    p.add_argument("--shard", default=None, metavar="I/N",
                   help="train only shard I of N (0 <= I < N) of the sweep, e.g. one Slurm array task each: "
                   "shards append to the same OUT/results.jsonl; a model's runs stay in one shard")
    p.add_argument("--plot-only", action="store_true", help="redraw pareto.png from results.jsonl, train nothing")
    p.add_argument("--table", action="store_true",
                   help="print, from OUT/results.jsonl, a markdown table of the best accuracy per mixer family and "
                   "state-size bucket beside the BASED paper's figure 2 (ours / paper; based/mqar/paper.py, "
                   "docs/mqar.md); trains nothing (with --plot-only: both)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import os
    import sys
    from pathlib import Path

    from based.mqar import SWEEPS, plot_pareto, read_results, run_sweep
    from based.mqar.sweeps import best_table, parse_shard

    from . import out_folder_problem

    if args.jobs is None:  # (--streams trains in threads of one process)
        args.jobs = min(os.cpu_count() or 1, 4) if args.sweep == "quick" and args.streams <= 1 else 1
    # (not x >= 0 rather than x < 0: NaN passed, and --scale nan or inf ended in a traceback)
    if (args.jobs < 1 or (args.limit is not None and args.limit < 0) or not 0 < args.scale < float("inf")
            or (args.time_limit is not None and not args.time_limit >= 0)):
        raise SystemExit("--jobs must be >= 1, --limit >= 0, --time-limit >= 0 and --scale > 0 and finite")
    if args.streams < 1 or (args.streams > 1 and args.jobs > 1):
        raise SystemExit(f"--streams must be >= 1, and > 1 only with --jobs 1 (got --streams {args.streams}, "
                         f"--jobs {args.jobs})")
    cores = os.cpu_count() or 1
    if args.jobs > cores:  # each job is a process with torch loaded and a core's threads: more only add memory
        raise SystemExit(f"--jobs {args.jobs} is more than this machine's {cores} CPU cores (one process per job, "
                         f"at least a core each): give --jobs {cores} or fewer")
    if args.streams > 1 and not args.device.startswith("cuda"):
        # On a CPU the threads only add up their models' memory (figure 2 at --scale 0.0005: 14 -> 22 GB at
        # --streams 2, no faster); --jobs runs models in parallel there.
        raise SystemExit(f"--streams needs --device cuda (CUDA streams on one GPU); on {args.device} use --jobs")
    if args.fit and args.time_limit is None:
        raise SystemExit("--fit needs --time-limit (it starts no model that would outlast the time left)")
    if args.epochs is not None and args.epochs < 1:
        raise SystemExit(f"--epochs must be >= 1 (it replaces the sweep's number of epochs), got {args.epochs}")
    if args.max_stack is not None and args.max_stack < 1:
        raise SystemExit(f"--max-stack must be >= 1, got {args.max_stack}")
    try:
        shard = None if args.shard is None else parse_shard(args.shard)
    except ValueError as error:
        raise SystemExit(str(error)) from None
    problem = out_folder_problem(args.out) or _out_entries_problem(args.out, args.plot_only or args.table,
                                                                   args.table and not args.plot_only)
    if problem:
        raise SystemExit(problem)
    if args.plot_only or args.table:
        rows = read_results(Path(args.out) / "results.jsonl")
        if not rows:
            raise SystemExit(f"no results in {args.out}/results.jsonl")
        if args.plot_only:
            print(plot_pareto(rows, Path(args.out) / "pareto.png"))
        if args.table:
            from based.mqar.paper import comparison_table

            print(comparison_table(rows))
        return 0
    _check_device(args.device)
    kwargs = {"scale": args.scale} | ({"epochs": args.epochs} if args.epochs is not None else {})
    runs = SWEEPS[args.sweep](**kwargs)
    rows = run_sweep(runs, args.out, device=args.device, jobs=args.jobs, limit=args.limit, time_limit=args.time_limit,
                     stacked=args.stacked, shard=shard, max_stack=args.max_stack, fit=args.fit,
                     streams=args.streams)
    ids = {r.run_id for r in runs}
    print(best_table([r for r in rows if r["run_id"] in ids]))
    print(f"{sum(r['run_id'] in ids for r in rows)} of {len(runs)} runs of '{args.sweep}' in {args.out}/results.jsonl; "
          f"plot: {args.out}/pareto.png")
    if rows.paused:
        print(f"{len(rows.paused)} models paused at the time limit, their state in {Path(args.out) / 'partial'}: "
              "run the same command again to go on")
    if rows.claimed:
        print(f"{len(rows.claimed)} models skipped: another process on {args.out} is training them (see above); "
              "their rows join results.jsonl when it finishes")
    if rows.unfit:
        print(f"{len(rows.unfit)} models not started: each needs more than the time that was left (--fit, see "
              "above); rerun to go on (one longer than the whole --time-limit needs a longer one)")
    if rows.failed:
        print(f"{len(rows.failed)} runs failed (not recorded; a rerun tries them again): tracebacks in "
              f"{Path(args.out) / 'failures'}/<run_id>.txt", file=sys.stderr)
        return 1
    return 0


def _out_entries_problem(out: str, trains_nothing: bool, table_only: bool) -> str | None:
    """Why what the command reads and writes in OUT cannot be (a folder where results.jsonl or pareto.png goes, a
    file where claims/, partial/ or failures/ go), else None: IsADirectoryError and friends, after the training."""
    from pathlib import Path

    from . import out_folder_problem

    files = ["results.jsonl"] + ([] if table_only else ["pareto.png"])
    for name in files:
        path = Path(out) / name
        if path.exists() and not path.is_file():
            what = "a folder" if path.is_dir() else "not a regular file"
            return f"--out {out}: {path} is {what}, not the sweep's {name}: move it away or choose another --out"
    for name in [] if trains_nothing else ["claims", "partial", "failures"]:
        path = Path(out) / name
        if out_folder_problem(path):
            return (f"--out {out}: {path} is a file, not the sweep's {name}/ folder: move it away or choose "
                    "another --out")
    return None


def _check_device(device: str) -> None:
    """--device must name a device torch knows and this machine has."""
    from based.cli import torch_device

    try:
        torch_device(device)
    except ValueError as error:
        raise SystemExit(str(error)) from None
