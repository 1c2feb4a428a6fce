"""One trainer per --out: a second one is refused naming the first; a dead trainer's lock is taken over."""
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from based.cli import main
from based.train import TrainError, train
from based.train.lock import LOCK, RunLock, RunLocked
from tests.train.test_trainer import cli_args, make_config


def dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_second_trainer_on_the_same_out_is_refused(small_corpus, small_tokenizer, tmp_path, based_cache):
    cfg = make_config(tmp_path, small_corpus, small_tokenizer, max_steps=100000)
    env = {**os.environ, "BASED_CACHE": str(based_cache), "OMP_NUM_THREADS": "1"}
    first = subprocess.Popen([sys.executable, "-m", "based", "train", *cli_args(cfg)], env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    lock = tmp_path / LOCK
    try:
        deadline = time.monotonic() + 120
        while not (lock.exists() and lock.read_text().strip()):
            assert first.poll() is None, first.stderr.read().decode()[-2000:]
            assert time.monotonic() < deadline, "the first trainer never took the lock"
            time.sleep(0.01)
        holder = json.loads(lock.read_text())
        assert (holder["pid"], holder["host"]) == (first.pid, socket.gethostname()) and holder["started"]
        with pytest.raises(TrainError, match=rf"another trainer is running in {tmp_path}: pid {first.pid} on host "
                                             rf"{socket.gethostname()}, started .*choose another --out"):
            train(make_config(tmp_path, small_corpus, small_tokenizer, seed=1))
        with pytest.raises(SystemExit, match=rf"^error: another trainer is running .*pid {first.pid}"):
            main(["train", *cli_args(cfg), "--resume"])
        assert first.poll() is None  # the first run goes on undisturbed
        os.kill(first.pid, signal.SIGKILL)
    finally:
        if first.poll() is None:
            first.kill()
        first.wait()
        first.stderr.close()
    # SIGKILL left the file behind; its pid is dead, so the next trainer takes it over.
    assert json.loads(lock.read_text())["pid"] == first.pid
    with RunLock(tmp_path) as taken:
        assert taken.took_over["pid"] == first.pid
        assert json.loads(lock.read_text())["pid"] == os.getpid()
    assert not lock.exists()


def test_stale_and_foreign_lock_files(tmp_path):
    lock = tmp_path / LOCK
    here = socket.gethostname()
    lock.write_text(json.dumps({"pid": dead_pid(), "host": here, "started": "2026-01-01T00:00:00+00:00"}))
    with RunLock(tmp_path) as taken:  # same host, pid gone: stale
        assert taken.took_over["started"] == "2026-01-01T00:00:00+00:00"
        with pytest.raises(RunLocked, match=rf"another trainer is running .*pid {os.getpid()}"):
            RunLock(tmp_path).acquire()  # held (flock), even from this process
    lock.write_text(json.dumps({"pid": os.getppid(), "host": here, "started": "x"}))
    with pytest.raises(RunLocked, match=rf"pid {os.getppid()} on host {here}.*if pid {os.getppid()} is not a "
                                        rf"trainer, delete the lock file"):
        RunLock(tmp_path).acquire()  # a live process on this host, even without its flock
    lock.write_text(json.dumps({"pid": 1, "host": "elsewhere", "started": "x"}))
    with pytest.raises(RunLocked, match=rf"locked by pid 1 on host elsewhere.*cannot be checked from host {here}: "
                                        rf"if that run is over, delete {lock}"):
        RunLock(tmp_path).acquire()
    assert json.loads(lock.read_text())["host"] == "elsewhere"  # a refusal leaves the file alone
