"""The `based` command: one entry point; each subcommand lives in based/commands/<name>.py and exposes
`register(subparsers)`, which adds its parser and sets `func` to a function of the parsed args."""
from __future__ import annotations

import argparse
import importlib
import pkgutil

from based import commands


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="based", description="BASED linear-attention language models.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for info in sorted(pkgutil.iter_modules(commands.__path__), key=lambda m: m.name):
        importlib.import_module(f"{commands.__name__}.{info.name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args) or 0


if __name__ == "__main__":
    raise SystemExit(main())
