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
    p.add_argument("--out", required=True, help="output folder (results.jsonl, pareto.png)")
    p.add_argument("--device", default="cpu", help="cpu, cuda (every visible GPU when --jobs > 1) or cuda:N")
    p.add_argument("--jobs", type=int, default=None,
                   help="runs trained in parallel, one process each (default: one per CPU core, at most 4, for "
                   "--quick; 1 otherwise)")
    p.add_argument("--limit", type=int, default=None, help="train at most this many new runs, then stop")
    p.add_argument("--time-limit", type=float, default=None, metavar="SECONDS",
                   help="start no new run after this many seconds (runs under way finish; rerun to go on)")
    p.add_argument("--scale", type=float, default=1.0,
                   help="multiply every example count (smoke tests of the sweep machinery only)")
    p.add_argument("--epochs", type=int, default=None, help="override the sweep's epochs (smoke tests)")
    p.add_argument("--plot-only", action="store_true", help="redraw pareto.png from results.jsonl, train nothing")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import os
    from pathlib import Path

    from based.mqar import SWEEPS, plot_pareto, read_results, run_sweep

    if args.jobs is None:
        args.jobs = min(os.cpu_count() or 1, 4) if args.sweep == "quick" else 1
    if (args.jobs < 1 or (args.limit is not None and args.limit < 0) or args.scale <= 0
            or (args.time_limit is not None and args.time_limit < 0)):
        raise SystemExit("--jobs must be >= 1, --limit >= 0, --time-limit >= 0 and --scale > 0")
    if args.plot_only:
        rows = read_results(Path(args.out) / "results.jsonl")
        if not rows:
            raise SystemExit(f"no results in {args.out}/results.jsonl")
        print(plot_pareto(rows, Path(args.out) / "pareto.png"))
        return 0
    kwargs = {"scale": args.scale} | ({"epochs": args.epochs} if args.epochs else {})
    runs = SWEEPS[args.sweep](**kwargs)
    rows = run_sweep(runs, args.out, device=args.device, jobs=args.jobs, limit=args.limit, time_limit=args.time_limit)
    print(f"{len(rows)} of {len(runs)} runs of '{args.sweep}' in {args.out}/results.jsonl; plot: {args.out}/pareto.png")
    return 0
