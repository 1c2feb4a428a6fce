"""The `based` command: one entry point; each subcommand lives in based/commands/<name>.py and exposes
`register(subparsers)`, which adds its parser and sets `func` to a function of the parsed args.

Building the parser imports no torch (tests/test_cli.py checks it): `based --help` and `based --version`
answer at once, and each subcommand pays for its own imports when it runs.
"""
from __future__ import annotations

import argparse
import importlib
import os
import pkgutil
import sys

from based import commands


def version() -> str:
    """The installed distribution's version; the package's own when it runs from a source tree."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as installed

    try:
        return installed("based")
    except PackageNotFoundError:
        from based import __version__

        return __version__


class _Version(argparse.Action):
    """--version, looked up only when asked for (the metadata scan is not free at every start)."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, help=None):
        super().__init__(option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        print(f"{parser.prog} {version()}")  # to stdout, as argparse's own version action
        parser.exit()


def torch_device(value: str | None, flag: str = "--device"):
    """The torch.device a --device flag names (None: cuda when available, else cpu); ValueError naming the
    flag when torch does not know the name or this machine lacks the device, instead of the traceback torch
    or the first CUDA call would give later. A named GPU (cuda:N) is made the current device: Triton kernels
    launch on the current device and CUDA graphs capture there. Imports torch: call it when the subcommand
    runs."""
    import torch

    if value is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(value)
    except (RuntimeError, ValueError):
        raise ValueError(f"{flag} {value!r} is not a torch device: use cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ValueError(f"{flag} {value}: no CUDA GPU is visible here; use {flag} cpu")
        if device.index is not None and device.index >= count:
            raise ValueError(f"{flag} {value}: this machine has {count} CUDA GPU(s), cuda:0 .. cuda:{count - 1}")
        if device.index is not None:
            torch.cuda.set_device(device)
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"{flag} {value}: MPS is not available here; use {flag} cpu")
    elif device.type not in ("cpu", "mps"):
        raise ValueError(f"{flag} {value}: {device.type} devices are not supported: use cpu or cuda")
    return device


def check_seed(seed: int, flag: str = "--seed") -> None:
    """ValueError naming the flag when `seed` is outside torch.manual_seed's range (which raises deep inside)."""
    if not -(2**63) <= seed < 2**64:
        raise ValueError(f"{flag} must fit in 64 bits (-2**63 .. 2**64 - 1), got {seed}")


def _subparsers(parser: argparse.ArgumentParser) -> list[tuple[argparse.ArgumentParser, str | None]]:
    """(parser, its one-line help) for each subcommand of `parser`, nested ones included."""
    found = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {a.dest: a.help for a in action._choices_actions}
            for name, child in action.choices.items():
                found += [(child, helps.get(name)), *_subparsers(child)]
    return found


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="based", description="BASED linear-attention language models.", formatter_class=commands.HelpFormatter
    )
    parser.add_argument("--version", action=_Version, help="print the installed version and exit")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for info in sorted(pkgutil.iter_modules(commands.__path__), key=lambda m: m.name):
        importlib.import_module(f"{commands.__name__}.{info.name}").register(sub)
    # One formatter for every subcommand (defaults shown), so no module has to remember it; each parser
    # records itself so that main() reports an unknown flag with that subcommand's usage.
    for child, summary in _subparsers(parser):
        child.formatter_class = commands.HelpFormatter
        child.description = child.description or summary
        child.set_defaults(_parser=child)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # Subparsers hand unknown arguments back to the top level, whose error would show `based`'s usage.
    args, unknown = parser.parse_known_args(argv)
    command_parser = vars(args).pop("_parser", parser)
    if unknown:
        command_parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    try:
        return args.func(args) or 0
    except BrokenPipeError:
        # The reader went away (`based mqar --table | head`): not an error of ours. Point stdout at devnull so
        # that the interpreter's final flush does not raise again (the Python docs' recipe for SIGPIPE).
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    raise SystemExit(main())
