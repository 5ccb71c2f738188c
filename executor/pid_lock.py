"""An exclusive lock on a file that names its holder: ``flock(LOCK_EX)`` on the file, the holder's pid written in it
for the message a refused process prints. The run folder's lock (executor/run_lock.py) and the service's data-folder
lock (api/jobs/folder_lock.py) are both this.

The kernel releases a flock when the last descriptor of its open file is closed, which includes every exit of the
holder, ``kill -9`` too: a dead holder never leaves the file locked. No torch here: launchers import this module.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path


class LockHeld(RuntimeError):
    """Another process holds the lock; `holder` is the pid it wrote (None if it has not written one yet)."""

    def __init__(self, path: Path, holder: int | None):
        super().__init__(f"{path} is locked by {f'pid {holder}' if holder is not None else 'another process'}")
        self.path, self.holder = path, holder


def take(path: Path) -> int:
    """A descriptor of ``path`` (created if missing) holding its flock, this process's pid written in the file;
    LockHeld if another process holds it. Closing every copy of the descriptor releases the lock.

    A holder may remove the file before it releases the lock (run_lock.py does, so a finished run leaves no lock
    file): a lock won on a file that is no longer at ``path`` is stale, so try again with the file there now."""
    while True:
        descriptor = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)  # not O_TRUNC: the holder's pid
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(descriptor)
            os.close(descriptor)
            raise LockHeld(path, holder) from None
        if _same_file(descriptor, path):
            os.ftruncate(descriptor, 0)
            os.pwrite(descriptor, f"{os.getpid()}\n".encode(), 0)
            return descriptor
        os.close(descriptor)


def _same_file(descriptor: int, path: Path) -> bool:
    try:
        return os.path.samestat(os.fstat(descriptor), os.stat(path))
    except FileNotFoundError:
        return False


def _holder(descriptor: int) -> int | None:
    """The pid the holder wrote; None if it has not written it yet (or the file holds something else)."""
    text = os.pread(descriptor, 32, 0).decode(errors="replace").strip()
    return int(text) if text.isdigit() else None
