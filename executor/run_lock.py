"""One run at a time in a run folder: whoever launches a run holds the folder's lock until every process of the run
is gone, so a second `paraplan train` or `--resume` into it is refused instead of training beside the first (two
copies appending to one metrics file and overwriting each other's checkpoints).

The lock is executor/pid_lock.py's on ``<run folder>/run.lock``: released by the kernel however the holder exits, so a
dead run never leaves its folder locked. The launcher passes the descriptor on to
torchrun's agent (``executor.launch.start``'s ``pass_fds``), so the folder stays locked while the agent stops
its workers, even when the launcher itself is gone.

No torch here: launchers import this module.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from executor import pid_lock

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
    try:
        descriptor = pid_lock.take(folder / LOCK_FILE)
    except pid_lock.LockHeld as held:
        raise RunFolderInUse(folder, held.holder) from None
    try:
        try:
            yield descriptor
        finally:
            (folder / LOCK_FILE).unlink(missing_ok=True)  # while still locked: see pid_lock.take
            _remove_empty(created)
    finally:
        os.close(descriptor)  # the lock goes with the last descriptor: this one, or a child's


def _remove_empty(created: list[Path]) -> None:
    """Remove the folders ``hold`` created (deepest first) while they are empty."""
    for path in created:
        try:
            path.rmdir()
        except OSError:  # something was written there: the run's files
            return
