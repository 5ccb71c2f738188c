"""One data folder, one job runner: a server holds ``<data dir>/server.lock`` (an exclusive ``flock``) for as long as
its job runner runs.

Two servers on one folder would each run ``--max-jobs`` jobs at once on one machine, and each would fail, as "server
restarted", the running jobs of the other one that it cannot see. So a second server on a folder is refused at
start, naming the pid of the one that holds it. The kernel releases a ``flock`` when its holder exits, however it
exits, so a server killed with SIGKILL does not leave the folder locked: the next one starts (and reconciles the
jobs the dead one left RUNNING).

Within one process the lock is counted, not taken again: ``paraplan serve`` takes it before uvicorn starts (so a
refusal is a clear message, not a failed startup's traceback), and the app's job runner takes it too (so an app run
in-process by another host, such as a test client, is refused alike). The descriptor is not inherited by the
processes a server starts (Python's default): a job's supervisor, which outlives the server, never holds it.
"""

from __future__ import annotations

import fcntl
import os
import threading
from pathlib import Path

from api.errors import InputError

LOCK_FILE = "server.lock"

_held: dict[Path, tuple[int, int]] = {}  # lock file -> (descriptor, holds in this process)
_guard = threading.Lock()


class FolderInUse(InputError):
    """Another live process's server holds the data folder."""

    def __init__(self, data_dir: Path, holder: int | None):
        who = f"pid {holder}" if holder is not None else "a process whose pid it did not record"
        super().__init__(
            f"the data folder {data_dir} is in use by another paraplan server ({who}); stop that server, or start "
            "this one with another --data-dir (PARAPLAN_DATA_DIR)",
            kind="conflict",
        )
        self.holder = holder


def acquire(data_dir: Path) -> None:
    """Hold `data_dir`'s lock (again, if this process holds it already); FolderInUse if another process does."""
    path = Path(data_dir).resolve() / LOCK_FILE
    with _guard:
        if path in _held:
            descriptor, holds = _held[path]
            _held[path] = (descriptor, holds + 1)
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)  # not O_TRUNC: the holder's pid is in it
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _recorded_pid(descriptor)
            os.close(descriptor)
            raise FolderInUse(path.parent, holder) from None
        os.ftruncate(descriptor, 0)
        os.pwrite(descriptor, f"{os.getpid()}\n".encode(), 0)
        _held[path] = (descriptor, 1)


def release(data_dir: Path) -> None:
    """Give back one hold of `data_dir`'s lock; the last one unlocks it. Nothing if this process holds none."""
    path = Path(data_dir).resolve() / LOCK_FILE
    with _guard:
        if path not in _held:
            return
        descriptor, holds = _held.pop(path)
        if holds > 1:
            _held[path] = (descriptor, holds - 1)
            return
        os.close(descriptor)  # closing the only descriptor releases the flock; the file stays, unlocked


def _recorded_pid(descriptor: int) -> int | None:
    """The pid the holder wrote (None if it has not written it yet, or the file holds something else)."""
    try:
        return int(os.pread(descriptor, 32, 0).decode().strip())
    except (OSError, ValueError):
        return None
