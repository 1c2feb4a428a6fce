"""Subcommands of `based`, one module each (see based/cli.py), and what their parsers share.

Nothing here (nor at the top of a subcommand module) imports torch or transformers: building the parser
must stay cheap, so `based --help` answers at once; each subcommand imports what it needs when it runs.
"""
from __future__ import annotations

import argparse
import runpy
import textwrap
from pathlib import Path


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every flag's help ends with its default; descriptions keep their line breaks (module docstrings are
    laid out by hand) while lines too long for the terminal are wrapped."""

    def _get_help_string(self, action: argparse.Action) -> str:
        # None and empty defaults mean "not given" (the help says what happens then); switches have no value.
        if action.default is None or action.default == [] or action.nargs == 0:
            return action.help or ""
        return super()._get_help_string(action)

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        lines = []
        for line in textwrap.dedent(text).strip("\n").splitlines():
            lead = indent + line[: len(line) - len(line.lstrip())]
            lines.append(textwrap.fill(line.strip(), width, initial_indent=lead, subsequent_indent=lead) or "")
        return "\n".join(lines)


def _preset_names() -> tuple[str, ...]:
    # based/models/presets.py imports nothing, but importing it as a module runs based/models/__init__.py,
    # which imports transformers and torch (seconds): the CLI reads the names by running the file alone.
    return tuple(runpy.run_path(str(Path(__file__).parent.parent / "models" / "presets.py"))["PRESETS"])


PRESETS = _preset_names()
"""based.models.PRESETS, for `choices=` (tests/test_cli.py checks they are the same)."""


def out_folder_problem(out: str | Path, flag: str = "--out") -> str | None:
    """Why `flag` cannot name a folder to write into (empty, an existing file, or a path under one), else None:
    checked before the work starts, not when its results are written. Pass the flag's text as given: Path('')
    is '.', the working folder."""
    if str(out) == "":
        return f"{flag} must name a folder (got an empty string)"
    path = Path(out).absolute()
    existing = next(p for p in (path, *path.parents) if p.exists())
    if existing.is_dir():
        return None
    where = "is an existing file" if existing == path else f"is under {existing}, a file"
    return f"{flag} {out} {where}, not a folder: choose another {flag}"


def number_problem(flag: str, value: float, low: float, inclusive: bool = True) -> str | None:
    """Why `value` cannot be `flag`'s (under `low`, or at it when not inclusive; NaN; infinite), else None: the
    one line a command refuses it with, before the work starts. (What passes is tested, `low <= value`, not what
    fails: NaN fails every comparison, so `value < low` let it through.)"""
    if ((low <= value) if inclusive else (low < value)) and value < float("inf"):
        return None
    bound = f"{'>=' if inclusive else '>'} {low}" + (" and finite" if isinstance(value, float) else "")
    return f"{flag} must be {bound}, got {value}"


def out_file_problem(out: str | Path, flag: str = "--out") -> str | None:
    """Why `flag` cannot name a JSON file to write (empty, an existing folder, or a path under a file), else None:
    checked before the work starts, not when the results are written (IsADirectoryError, NotADirectoryError)."""
    if str(out) == "" or Path(out).is_dir() or out_folder_problem(Path(out).parent, flag):
        return f"{flag} {out} must be a JSON file's path (not a folder, nor under a file)"
    return None
