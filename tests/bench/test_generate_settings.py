"""`based bench generate` refuses settings that cannot mean anything in one line (exit 2) before anything is
built or timed, and ends non-zero when a section failed."""
import json
import re

import pytest

from based.cli import main

# As tests/bench/test_generation_bench.py's TINY, one debug engine and nothing else, at batch 1 (a setting let
# through runs in seconds; the largest batch of a CPU with --headroom-gb 0 takes all its memory).
TINY = ["--device", "cpu", "--prompt-len", "16", "--new-tokens", "40", "--prefill-batch", "1",
        "--point-seconds", "0.01", "--headroom-gb", "0", "--batches", "1", "--skip", "smoke", "based", "transformer",
        "hf_llama", "--presets", "debug"]


@pytest.mark.parametrize("flags, message", [
    # Before: each engine's section failed (recorded as its error) and the run exited 0, or it ran regardless.
    (["--batches", "0"], "argument --batches: each must be 'max' or a batch size >= 1, got '0'"),
    (["--batches", "2", "-3"], "argument --batches: each must be 'max' or a batch size >= 1, got '-3'"),
    (["--batches", "abc"], "argument --batches: each must be 'max' or a batch size >= 1, got 'abc'"),
    (["--set", "d_model=-1"], "--set d_model=-1 on preset debug: d_model must be a positive int, got -1"),
    (["--set", "d_model="], "--set d_model='' on preset debug: d_model must be a positive int"),
    (["--time-limit", "nan"], "--time-limit must be >= 0 and finite, got nan"),
    (["--time-limit", "-1"], "--time-limit must be >= 0 and finite"),
    (["--time-limit", "inf"], "--time-limit must be >= 0 and finite"),
    (["--reserve-s", "inf"], "--reserve-s must be >= 0 and finite"),
    (["--point-seconds", "-1"], "--point-seconds must be >= 0 and finite"),
    (["--headroom-gb", "nan"], "--headroom-gb must be >= 0 and finite"),
    (["--prefill-batch", "0"], "--prefill-batch must be >= 1, got 0"),
    (["--profile-top", "-1"], "--profile-top must be >= 1, got -1"),
    (["--hf-new-tokens", "1"], "--hf-new-tokens must be >= 2, got 1"),  # (its tokens/s divides by n - 1)
    # Before: IsADirectoryError after the smoke test; NotADirectoryError's traceback from mkdir.
    (["--out", "{tmp}"], "--out .* must be a JSON file's path"),
    (["--out", "{tmp}/file/x.json"], "--out .*file/x.json must be a JSON file's path"),
    (["--out", ""], "--out . must be a JSON file's path"),
])
def test_meaningless_settings_are_refused_in_one_line(flags, message, tmp_path, capsys):
    (tmp_path / "file").write_text("keep me")
    flags = [f.replace("{tmp}", str(tmp_path)) for f in flags]
    with pytest.raises(SystemExit) as exit_:
        main(["bench", "generate", *TINY, "--out", str(tmp_path / "gen.json"), *flags])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "Traceback" not in err
    assert re.search(f"based bench generate: error: {message}", err), err
    assert not (tmp_path / "gen.json").exists() and (tmp_path / "file").read_text() == "keep me"


def test_a_failed_section_exits_nonzero(tmp_path, capsys):
    # Before: exit 0 with every engine's section an error. No memory is left for a sequence beside 1e6 GiB of
    # headroom: the engine fails, its error is recorded, and the command says so and exits 1.
    out = tmp_path / "gen.json"
    assert main(["bench", "generate", *TINY, "--headroom-gb", "1e6", "--out", str(out)]) == 1
    assert "MemoryError" in json.loads(out.read_text())["debug"]["error"]
    assert f"based bench generate: debug failed (the error is in {out})" in capsys.readouterr().err
