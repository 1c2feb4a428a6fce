import json
import subprocess
import sys

import pytest

from based.cli import build_parser, main


def test_help_lists_subcommands(capsys):
    text = build_parser().format_help()
    assert "report" in text and "bench" in text


def test_report_runs_the_debug_preset(capsys):
    assert main(["report", "--preset", "debug", "--seq-len", "64"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["forward"]["tokens"] == 64
    assert report["parameters"] > 0
    assert 0 < report["forward"]["loss"] < 20
    sizes = list(report["decode_state_bytes"].values())
    assert sizes[0] == sizes[-1]  # constant beyond the window for BASED


def test_console_entry_point():
    out = subprocess.run([sys.executable, "-m", "based", "--help"], capture_output=True, text=True, check=True)
    assert "report" in out.stdout


def test_report_refuses_a_seq_len_past_the_positional_limit():
    # Before: --preset transformer-debug --seq-len 100000 ran a full-attention forward far past its 512
    # positions (minutes of T^2 work on a CPU) instead of refusing, as train and generate do.
    with pytest.raises(SystemExit, match=r"^--seq-len 100000 exceeds transformer-debug's max_position_embeddings=512"):
        main(["report", "--preset", "transformer-debug", "--seq-len", "100000"])


def test_report_refuses_a_seed_torch_cannot_take():
    # Before: ValueError traceback "Overflow when unpacking long long".
    with pytest.raises(SystemExit, match=r"^--seed must fit in 64 bits"):
        main(["report", "--seed", str(2**70)])


def test_report_refuses_a_seq_len_past_the_built_in_text():
    # Before: --seq-len 100000000 ran the whole text (69,952 tokens) and reported that many, exit 0.
    with pytest.raises(SystemExit, match=r"^--seq-len 100000000 exceeds the built-in text's (\d+) tokens: lower "
                                         r"--seq-len to at most \1$"):
        main(["report", "--seq-len", "100000000"])
