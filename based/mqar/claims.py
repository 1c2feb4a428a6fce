"""One process per model group of a sweep folder: OUT/claims/<group>.lock, held while the group trains.

Two sweeps started on one --out (by mistake, or on purpose: one per GPU, or shards whose processes
overlap) would otherwise train the same runs twice and both append them. A process takes a group's claim
(an flock, which the kernel drops when its holder dies, so a killed sweep leaves no stale claim), reads
results.jsonl again under it (another process may have finished the group since this one listed its
work), trains what is left, appends the rows and only then lets go. A group whose claim is held is
skipped and named; the process holding it records its pid, host and start in the file.

On a file system without flock (some network mounts) claims are not taken and the sweep works as before;
shards (--shard I/N) split such a sweep without overlap.
"""
from __future__ import annotations

import datetime
import fcntl
import hashlib
import json
import os
import socket
from pathlib import Path


def group_key(run_ids: list[str]) -> str:
    """A group's name on disk (claims, paused state): its runs' ids, hashed."""
    return hashlib.sha1(" ".join(run_ids).encode()).hexdigest()[:16]


class GroupClaimed(Exception):
    """Another process holds this group's claim: it is training these runs now."""

    def __init__(self, model_name: str, holder: str):
        super().__init__(f"{model_name}: skipped, another process is training it ({holder})")
        self.model_name, self.holder = model_name, holder

    def __reduce__(self):  # from a worker process back to the sweep
        return GroupClaimed, (self.model_name, self.holder)


class GroupClaim:
    """Context manager: exclusive training of one group (its run ids) in the sweep folder `out`; raises
    GroupClaimed when a live process holds it."""

    def __init__(self, out: str | Path, run_ids: list[str], model_name: str):
        self.path = Path(out) / "claims" / f"{group_key(run_ids)}.lock"
        self.model_name = model_name
        self._fd: int | None = None

    def __enter__(self) -> "GroupClaim":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                holder = json.loads(os.pread(fd, 4096, 0) or b"{}")
                holder = f"pid {holder['pid']} on {holder['host']} since {holder['started']}"
            except (ValueError, KeyError, TypeError):
                holder = "a process starting now"
            os.close(fd)
            raise GroupClaimed(self.model_name, f"{holder}; claim file {self.path}") from None
        except OSError:  # no flock here: train unclaimed (module docstring)
            os.close(fd)
            return self
        record = {"pid": os.getpid(), "host": socket.gethostname(),
                  "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(record).encode(), 0)
        self._fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self._fd is not None:
            os.ftruncate(self._fd, 0)  # the file stays (unlinking it would race a process opening it now)
            os.close(self._fd)  # drops the flock
            self._fd = None
