"""One run at a time in a run folder: whoever launches a run holds the folder's lock until every process of the run
is gone, so a second `paraplan train` or `--resume` into it is refused instead of training beside the first (two
copies appending to one metrics file and overwriting each other's checkpoints).

The lock is ``flock(LOCK_EX)`` on ``<run folder>/run.lock``, which holds the holder's pid for the error message.
The kernel releases a flock when the last descriptor of its open file is closed, which includes every exit of
the holder, ``kill -9`` too: a dead run never leaves its folder locked. The launcher passes the descriptor on to
torchrun's agent (``executor.launch.start``'s ``pass_fds``), so the folder stays locked while the agent stops
its workers, even when the launcher itself is gone.

No torch here: launchers import this module.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

LOCK_FILE = "run.lock"


class RunFolderInUse(RuntimeError):
    """A run folder another run holds: its message names the folder and the holder's pid."""

    def __init__(self, folder: Path, holder: int | None):
        self.folder, self.holder = folder, holder
        who = f"pid {holder}" if holder is not None else "another process"
        super().__init__(
            f"run folder {folder} is in use by {who}, which is running a training run there; wait for it to end "
            "or stop it (a run stopped with Ctrl-C, SIGTERM or SIGHUP saves a checkpoint), then --resume"
        )


@contextmanager
def hold(folder: Path) -> Iterator[int]:
    """Lock ``folder`` for this process; yields the lock's descriptor, for the processes that must keep it locked
    after this one. RunFolderInUse if another run holds it.

    The lock file is removed on release, and so is a folder created here (with the parents created for it) that
    nothing else was written to: a run refused as bad input leaves nothing behind."""
    folder = Path(folder)
    created = [path for path in (folder, *folder.parents) if not path.exists()]  # deepest first
    folder.mkdir(parents=True, exist_ok=True)
    descriptor = _lock(folder / LOCK_FILE)
    try:
        os.ftruncate(descriptor, 0)
        os.pwrite(descriptor, f"{os.getpid()}\n".encode(), 0)
        try:
            yield descriptor
        finally:
            (folder / LOCK_FILE).unlink(missing_ok=True)  # while still locked: see _lock
            _remove_empty(created)
    finally:
        os.close(descriptor)  # the lock goes with the last descriptor: this one, or a child's


def _lock(path: Path) -> int:
    """A descriptor of ``path`` holding its flock. A holder removes the file before it releases the lock, so a lock
    won on a file that is no longer at ``path`` is stale: try again with the file there now."""
    while True:
        descriptor = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(descriptor)
            os.close(descriptor)
            raise RunFolderInUse(path.parent, holder) from None
        if _same_file(descriptor, path):
            return descriptor
        os.close(descriptor)


def _same_file(descriptor: int, path: Path) -> bool:
    try:
        return os.path.samestat(os.fstat(descriptor), os.stat(path))
    except FileNotFoundError:
        return False


def _holder(descriptor: int) -> int | None:
    """The pid the holder wrote; None if it has not written it yet."""
    text = os.pread(descriptor, 32, 0).decode(errors="replace").strip()
    return int(text) if text.isdigit() else None


def _remove_empty(created: list[Path]) -> None:
    """Remove the folders ``hold`` created (deepest first) while they are empty."""
    for path in created:
        try:
            path.rmdir()
        except OSError:  # something was written there: the run's files
            return
