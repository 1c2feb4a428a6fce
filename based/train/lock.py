"""One trainer per run folder: OUT/train.lock, held from start to exit.

Two trainers writing one OUT would interleave metrics, checkpoints and the exported model. The lock file
holds {"pid", "host", "started"}, named in the message a second trainer prints. A lock file is stale,
and taken over, when it names this host and a pid that is no longer alive (a trainer killed with
SIGKILL leaves its file behind). Any other holder is refused: a live pid here, or another host, which
cannot be checked from here (the message names the file to delete once that run is over). An flock on
the file, which the kernel drops when its holder dies, makes the check-and-take-over atomic between
two trainers starting at once.
"""
from __future__ import annotations

import contextlib
import datetime
import fcntl
import json
import os
import socket
from pathlib import Path

LOCK = "train.lock"


class RunLocked(RuntimeError):
    """Another trainer holds this run folder."""


def pid_alive(pid) -> bool:
    """Whether a process with this pid exists on this host."""
    if isinstance(pid, bool) or not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by another user
        return True
    return True


def _describe(holder: dict, path: Path) -> str:
    if not holder:  # it has the flock but has not written its record yet
        return f"a trainer starting now (lock file {path})"
    return (f"pid {holder.get('pid')} on host {holder.get('host')}, started {holder.get('started')} "
            f"(lock file {path})")


class RunLock:
    """Context manager: exclusive use of the run folder `out` (created if missing)."""

    def __init__(self, out: Path):
        self.path = Path(out) / LOCK
        self._fd: int | None = None
        self._created_out = False
        self.took_over: dict | None = None  # the stale holder replaced, if any

    def acquire(self) -> "RunLock":
        self._created_out = not self.path.parent.exists()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:  # a live process holds it
                holder = self._read(fd)
                os.close(fd)
                raise RunLocked(f"another trainer is running in {self.path.parent}: {_describe(holder, self.path)}; "
                                f"wait for it to finish, stop it, or choose another --out") from None
            except OSError:
                pass  # no flock on this filesystem (ENOLCK, EOPNOTSUPP): the pid check below decides alone
            except BaseException:
                os.close(fd)
                raise
            try:
                same_file = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same_file = False
            if same_file:
                break
            os.close(fd)  # the holder unlinked it while we waited for the flock: lock the new file instead
        try:
            self._claim(fd)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        return self

    def _claim(self, fd: int) -> None:
        """Under the flock: refuse a live or uncheckable holder, else write this process's record."""
        holder, here = self._read(fd), socket.gethostname()
        if holder and holder.get("host") != here:
            raise RunLocked(f"{self.path.parent} is locked by {_describe(holder, self.path)}, which cannot be "
                            f"checked from host {here}: if that run is over, delete {self.path}")
        if holder and holder.get("pid") != os.getpid() and pid_alive(holder.get("pid")):
            raise RunLocked(f"another trainer is running in {self.path.parent}: {_describe(holder, self.path)}; "
                            f"wait for it to finish, stop it, or choose another --out (if pid {holder.get('pid')} "
                            f"is not a trainer, delete the lock file)")
        self.took_over = holder or None
        record = {"pid": os.getpid(), "host": here,
                  "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(record).encode(), 0)
        os.fsync(fd)

    @staticmethod
    def _read(fd: int) -> dict:
        try:
            data = os.pread(fd, 4096, 0)
            holder = json.loads(data) if data.strip() else {}
        except (OSError, ValueError):
            return {}
        return holder if isinstance(holder, dict) else {}

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)  # before unlocking: a waiting trainer then creates a fresh file
        finally:
            os.close(self._fd)  # drops the flock
            self._fd = None
        if self._created_out:  # a run refused before writing anything leaves no empty OUT behind
            with contextlib.suppress(OSError):
                self.path.parent.rmdir()

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
