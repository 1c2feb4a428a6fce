"""`based bench ops` without a GPU: what it would time, and the table it prints from a recorded run."""
import json
from pathlib import Path

import pytest
import torch

from based.bench.ops import _table

RECORDED = Path(__file__).parents[2] / "benchmarks/results/ops-h200-2026-11-29-v4.json"


def test_both_triton_forms_and_sdpa_are_timed():
    pytest.importorskip("triton")
    from based.bench.ops import _methods

    names = list(_methods())
    assert names[:2] == ["based_triton", "based_triton_fused"] and "sdpa_flash_d64" in names


def test_table_of_the_recorded_run():
    run = json.loads(RECORDED.read_text())
    table = _table(run["prefill"], run["decode"], run["copy_GBps"])
    header = "| T | based_triton | based_triton_fused | fla_parallel_based | fla_fused_chunk_based | sdpa_flash_d64 |"
    assert table.count(header) == 2  # forward, forward + backward
    assert "| 8192 | 0.790 | 1.206 | 3.368 | 3.289 | 3.628 |" in table
    assert "| 256 | 0.0904 | 0.3709 | 3619 | 85% |" in table  # decode: step, torch step, GB/s, share of copy


def test_needs_cuda(capsys):
    if torch.cuda.is_available():
        pytest.skip("has CUDA")
    from based.cli import main

    assert main(["bench", "ops"]) == 2
    assert "needs a CUDA device" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["--out", "DIR"], ["--lengths", "0"], ["--lengths"]])
def test_bad_settings_are_refused_before_any_work(argv, tmp_path, capsys):
    # Checked before the CUDA check: an --out it cannot write failed only after the timed runs.
    from based.cli import main

    argv = [str(tmp_path) if a == "DIR" else a for a in argv]
    with pytest.raises(SystemExit) as e:
        main(["bench", "ops", *argv])
    assert e.value.code == 2 and "Traceback" not in capsys.readouterr().err
