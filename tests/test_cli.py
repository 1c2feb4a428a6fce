"""The `based` command itself: its help (every flag described, defaults shown), --version, unknown flags
reported by the subcommand's own parser, and a parser that is built without importing torch."""
import argparse
import dataclasses
import importlib
import json
import subprocess
import sys
from importlib.metadata import version

import pytest

from based import cli, commands
from based.commands import HelpFormatter
from based.commands.bench import BENCHMARKS


class _Built(Exception):
    def __init__(self, parser):
        self.parser = parser


def bench_parser(what: str, monkeypatch) -> argparse.ArgumentParser:
    """The parser that `based bench WHAT` builds inside its main(argv), caught as it starts parsing."""

    def catch(parser, *args, **kwargs):
        raise _Built(parser)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", catch)
    with pytest.raises(_Built) as built:
        importlib.import_module(f"based.bench.{what}").main([])
    return built.value.parser


def all_parsers(monkeypatch) -> dict[str, argparse.ArgumentParser]:
    """Every parser a user reaches: `based`, each subcommand, nested ones (`based tokenizer train`) and
    the benchmarks' own (`based bench ops`)."""
    top = cli.build_parser()
    found = {top.prog: top, **{child.prog: child for child, _ in cli._subparsers(top)}}
    for what in BENCHMARKS:
        parser = bench_parser(what, monkeypatch)
        found[parser.prog] = parser
    return found


def test_every_subcommand_is_walked(monkeypatch):
    progs = set(all_parsers(monkeypatch))
    assert {"based train", "based report", "based tokenizer train", "based bench ops", "based bench train",
            "based bench generate"} <= progs


def test_every_flag_has_help_and_every_default_is_shown(monkeypatch):
    for prog, parser in all_parsers(monkeypatch).items():
        assert issubclass(parser.formatter_class, HelpFormatter), prog
        assert parser.description, f"{prog} has no description"
        for action in parser._actions:
            if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
                continue
            name = "/".join(action.option_strings) or action.dest
            assert action.help and action.help.strip(), f"`{prog} {name}` has no help text"
            shown = " ".join(parser._get_formatter()._expand_help(action).split())
            if action.nargs != 0 and action.default not in (None, [], argparse.SUPPRESS):
                assert f"default: {action.default}" in shown, f"`{prog} {name}` does not show its default"


def test_help_shows_defaults_and_describes_the_report_flags(capsys):
    with pytest.raises(SystemExit) as exit:
        cli.main(["report", "--help"])
    assert exit.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "--seq-len SEQ_LEN tokens of built-in text in the forward pass (default: 256)" in out
    assert "(default: debug)" in out


def test_train_help_states_the_train_config_defaults():
    # Unset train flags stay None so that TrainConfig fills them in (by preset size): the help must say
    # what TrainConfig will use.
    from based.train.config import LARGE_DEFAULTS, SMALL_DEFAULTS, TrainConfig

    top = cli.build_parser()
    train = next(child for child, _ in cli._subparsers(top) if child.prog == "based train")
    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig) if f.default is not dataclasses.MISSING}
    checked = 0
    for action in train._actions:
        if action.dest not in defaults or action.nargs == 0:
            continue
        shown = " ".join(action.help.split())
        if action.dest in SMALL_DEFAULTS:
            small, large = SMALL_DEFAULTS[action.dest], LARGE_DEFAULTS[action.dest]
            assert f"(default: {small} with a *debug preset, else {large})" in shown, action.dest
            checked += 1
        elif defaults[action.dest] is not None:
            assert f"default: {defaults[action.dest]}" in shown, action.dest
            checked += 1
    assert checked >= 15


def test_version(capsys):
    with pytest.raises(SystemExit) as exit:
        cli.main(["--version"])
    assert exit.value.code == 0
    assert capsys.readouterr().out == f"based {version('based')}\n"


@pytest.mark.parametrize("argv, prog", [
    (["train", "--out", "runs/x", "--bogus"], "based train"),
    (["tokenizer", "train", "--out", "tok", "--bogus", "1"], "based tokenizer train"),
    (["report", "--preset", "debug", "--bogus"], "based report"),
])
def test_an_unknown_flag_is_reported_by_the_subcommands_parser(argv, prog, capsys):
    with pytest.raises(SystemExit) as exit:
        cli.main(argv)
    assert exit.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"usage: {prog} ")
    assert err.rstrip().endswith(f"{prog}: error: unrecognized arguments: {' '.join(argv[argv.index('--bogus'):])}")


def test_parser_choices_match_the_package():
    from based.convert import FORMATS
    from based.models import PRESETS

    assert commands.PRESETS == PRESETS
    assert commands.convert.FORMATS == FORMATS


LAZY = r"""
import json, sys, time
start = time.perf_counter()
import based.cli
based.cli.build_parser()
seconds = time.perf_counter() - start
heavy = sorted(m for m in ("torch", "transformers", "matplotlib", "numpy", "triton") if m in sys.modules)
print(json.dumps({"heavy": heavy, "seconds": seconds}))
"""


def test_the_parser_is_built_without_torch():
    # The deterministic form of "based --help answers at once": 0.3 s against 4.8 s when it imported torch.
    result = subprocess.run([sys.executable, "-c", LAZY], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["heavy"] == [], f"building the parser imported {out['heavy']}"


def test_import_based_is_lazy_but_whole():
    # A fresh process with nothing but `import based` resolving the Auto classes: tests/eval/test_hf_auto.py.
    import based
    from based import BasedConfig
    from based.models import modeling

    assert (based.BasedForCausalLM, based.BasedModel) == (modeling.BasedForCausalLM, modeling.BasedModel)
    assert BasedConfig.from_preset("debug").model_type == "based"
    assert based.ops.FEATURE_MAPS is importlib.import_module("based.ops").FEATURE_MAPS
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        based.nope


@pytest.mark.parametrize("value, message", [
    ("nope", "--device 'nope' is not a torch device: use cpu, cuda or cuda:N"),
    ("meta", "--device meta: meta devices are not supported: use cpu or cuda"),
])
def test_torch_device_names_the_flag(value, message):
    with pytest.raises(ValueError) as error:
        cli.torch_device(value)
    assert str(error.value) == message
    assert str(cli.torch_device("cpu")) == "cpu"


def test_torch_device_refuses_a_gpu_this_machine_lacks(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    current = []
    monkeypatch.setattr(torch.cuda, "set_device", current.append)
    assert cli.torch_device("cuda:1") == torch.device("cuda:1")
    assert current == [torch.device("cuda:1")]  # the named GPU is made current (Triton launches there)
    assert cli.torch_device("cuda") == torch.device("cuda") and len(current) == 1  # unnamed: left as it is
    with pytest.raises(ValueError, match=r"--device cuda:7: this machine has 2 CUDA GPU\(s\), cuda:0 \.\. cuda:1"):
        cli.torch_device("cuda:7")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="--device cuda: no CUDA GPU is visible here; use --device cpu"):
        cli.torch_device("cuda")


@pytest.mark.parametrize("argv", [
    ["train", "--preset", "debug", "--out", "{tmp}/run", "--device", "nope"],
    ["generate", "--preset", "debug", "--prompt", "x", "--device", "nope"],
    ["eval", "--checkpoint", "{tmp}", "--task", "perplexity", "--data", "{tmp}", "--device", "nope"],
    ["bench", "train", "--size", "debug", "--seq-len", "64", "--device", "nope"],
    ["bench", "generate", "--device", "nope"],
])
def test_a_bad_device_is_one_line_in_every_subcommand(argv, tmp_path, capsys):
    # Before: torch's RuntimeError traceback ("Expected one of cpu, cuda, ... device type at start of
    # device string: nope"), or an AssertionError at the first CUDA call for `cuda` on a CPU-only torch.
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    with pytest.raises(SystemExit) as exit:
        rc = cli.main(argv)
        raise SystemExit(rc)
    message = exit.value.code if isinstance(exit.value.code, str) else capsys.readouterr().err
    assert exit.value.code != 0
    assert message.strip().splitlines()[-1].endswith("--device 'nope' is not a torch device: use cpu, cuda or cuda:N")
    assert "Traceback" not in message
    assert not (tmp_path / "run").exists()


def test_a_reader_that_goes_away_is_no_error():
    """`based mqar --table | head -1`: the pipe closes before the table is written; exit 0 and no traceback."""
    from pathlib import Path

    folder = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "mqar-figure2-h100"
    cmd = [sys.executable, "-m", "based", "mqar", "--sweep", "figure2", "--out", str(folder), "--table"]
    # The reader closes its end at once; the command (seconds of imports later) writes into a closed pipe.
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, bufsize=0)
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 0 and "Traceback" not in err, err
