"""`based bench WHAT ...`: the GPU benchmarks; each lives in based/bench/<what>.py with main(argv)."""
from __future__ import annotations

import argparse
import importlib

BENCHMARKS = ("ops", "generate", "train", "serve")


def register(sub) -> None:
    p = sub.add_parser("bench", help="benchmarks (GPU): `based bench ops --help`, `based bench generate --help`")
    p.add_argument("what", choices=BENCHMARKS, help="which benchmark: %(choices)s")
    p.add_argument("rest", nargs=argparse.REMAINDER, help="arguments of that benchmark")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    return importlib.import_module(f"based.bench.{args.what}").main(args.rest) or 0
