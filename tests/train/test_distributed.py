"""torchrun on the CPU (gloo): 2-process DDP and FSDP2 runs match 1 process with the same global batch,
rank 0 alone writes checkpoints, and a checkpoint resumes on another number of processes."""
import os
import subprocess
import sys

import pytest

from based.train import train
from based.train.checkpoint import list_checkpoints

from .test_trainer import cli_args, make_config, train_rows, val_rows

STEPS = 6


def torchrun(cfg, based_cache, *extra: str) -> None:
    env = {**os.environ, "BASED_CACHE": str(based_cache), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "based", "train", *cli_args(cfg), *extra]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


def assert_close_rows(got: list[dict], want: list[dict], key: str) -> None:
    assert [r["step"] for r in got] == [r["step"] for r in want]
    for a, b in zip(got, want):
        assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6), (a["step"], key)


@pytest.fixture(scope="module")
def single(tmp_path_factory, small_corpus, small_tokenizer):
    out = tmp_path_factory.mktemp("single")
    train(make_config(out, small_corpus, small_tokenizer, max_steps=STEPS, save_every=3, eval_every=3))
    return out


def test_ddp_matches_one_process(single, small_corpus, small_tokenizer, tmp_path, based_cache):
    cfg = make_config(tmp_path, small_corpus, small_tokenizer, max_steps=STEPS, save_every=3, eval_every=3)
    torchrun(cfg, based_cache)
    for key in ("loss", "grad_norm"):
        assert_close_rows(train_rows(tmp_path), train_rows(single), key)
    assert_close_rows(val_rows(tmp_path), val_rows(single), "val_loss")
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-0000003", "step-0000006"]
    assert not list((tmp_path / "checkpoints").glob(".tmp-*"))
    assert len(train_rows(tmp_path)) == STEPS  # one writer: no duplicated rows


def test_fsdp_matches_and_resumes_on_one_process(single, small_corpus, small_tokenizer, tmp_path, based_cache):
    cfg = make_config(tmp_path, small_corpus, small_tokenizer, max_steps=STEPS, save_every=3, eval_every=3)
    torchrun(cfg, based_cache, "--fsdp", "--stop-at", "3")
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-0000003"]
    # The sharded run's checkpoint holds full tensors: one process picks it up.
    cfg.resume = True
    train(cfg)
    for key in ("loss", "grad_norm"):
        assert_close_rows(train_rows(tmp_path), train_rows(single), key)
    assert_close_rows(val_rows(tmp_path), val_rows(single), "val_loss")
