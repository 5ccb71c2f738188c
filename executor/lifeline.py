"""Every process of a run dies with the process that started it.

A local run is a tree: the launcher (``paraplan train``, a job's supervisor or its command) starts torchrun's
agent, the agent starts the workers, and each sits in a session of its own (so a terminal's Ctrl-C reaches only
the launcher, which stops the run cleanly). The price: nothing ends a child whose parent was killed outright
(``kill -9``, the OOM killer), and it goes on training, beside whatever is started in its place.

So each child watches its parent: :func:`watch_parent` runs a thread that notices when the process that started
this one has gone (``os.getppid()`` changes when a process is re-parented) and then stops this process the way
its launcher would have: SIGTERM (a training rank finishes its step, saves a checkpoint and exits; torchrun's agent
stops its workers and waits for them), then SIGKILL once ``grace_s`` is up.

Why not ``prctl(PR_SET_PDEATHSIG)``: Linux sends that signal when the *thread* that forked the child exits, not
its process, so a launch started from a short-lived thread would be killed while its launcher still runs; and it
is not inherited across a fork, so it would still need every level to set it. Polling the parent pid is
thread-agnostic and costs one system call per ``POLL_S``.

The launcher names itself in the child's environment (``PARENT_PID_ENV``): a child whose parent died before the
watch started (while Python was still importing torch) sees the mismatch at once. ``python -m executor.lifeline
MODULE ARGS`` runs ``MODULE`` (torchrun's ``torch.distributed.run``) as ``python -m MODULE ARGS`` would, watched,
and names itself to the workers it starts.

No torch here: launchers import this module.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import runpy
import signal
import sys
import threading
import time
from collections.abc import Mapping
from typing import Any, TextIO

PARENT_PID_ENV = "PARAPLAN_PARENT_PID"
"""The pid of the process that started this one, set by a launcher in its child's environment."""
POLL_S = 0.2
"""How often the watch looks at the parent pid: the most an orphan runs on before it starts to stop."""
ORPHAN_GRACE_S = 60.0
"""How long an orphan may take to stop by SIGTERM (a training rank's step and checkpoint) before SIGKILL: the same
grace as `paraplan train` gives a run it stops."""
_PR_SET_CHILD_SUBREAPER = 36  # <linux/prctl.h>


def child_env(env: Mapping[str, str]) -> dict[str, str]:
    """``env`` naming this process as the parent that the child started with it must outlive."""
    return {**env, PARENT_PID_ENV: str(os.getpid())}


def expected_parent() -> int:
    """The parent this process must outlive: the one its launcher named, else the one it has now (a process
    started by hand or by Slurm's torchrun)."""
    named = os.environ.get(PARENT_PID_ENV, "")
    return int(named) if named.isdigit() else os.getppid()


def watch_parent(grace_s: float = ORPHAN_GRACE_S, parent: int | None = None) -> threading.Thread:
    """Start a daemon thread that stops this process once its parent (``parent``, default
    :func:`expected_parent`) has gone: SIGTERM, then SIGKILL after ``grace_s``."""
    watched = expected_parent() if parent is None else parent
    thread = threading.Thread(target=_watch, args=(watched, grace_s), name="paraplan-lifeline", daemon=True)
    thread.start()
    return thread


def _watch(parent: int, grace_s: float) -> None:
    while os.getppid() == parent:
        time.sleep(POLL_S)
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(grace_s)
    os.kill(os.getpid(), signal.SIGKILL)


class _OutputForAGoneReader:
    """A text stream that drops what it cannot write because its reader has gone (a broken pipe) instead of
    raising. torchrun's output is a pipe that only its launcher reads; once the launcher is killed, each write
    fails, and torchrun reports each failed copy of a worker's line through torch's logging, whose formatter
    imports torch._dynamo: its stop would take many seconds longer, for output no one can read."""

    def __init__(self, stream: TextIO):
        self._stream = stream

    def write(self, text: str) -> int:
        try:
            return self._stream.write(text)
        except BrokenPipeError:
            return len(text)

    def flush(self) -> None:
        with contextlib.suppress(BrokenPipeError):
            self._stream.flush()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


def adopt_orphans() -> bool:
    """Make this process the child subreaper of its tree (Linux): a descendant whose parent dies is re-parented to
    this process instead of to init, so it can still be found among this process's descendants and stopped.
    False where the system has no such call."""
    path = ctypes.util.find_library("c")
    if path is None or not sys.platform.startswith("linux"):
        return False
    libc = ctypes.CDLL(path, use_errno=True)
    return libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0


def main(argv: list[str]) -> None:
    """``python -m executor.lifeline MODULE ARGS``: run MODULE as ``__main__`` with ARGS, watched, naming this
    process as the parent of whatever it starts."""
    if not argv:
        raise SystemExit("usage: python -m executor.lifeline MODULE [ARGS...]")
    watch_parent()
    os.environ[PARENT_PID_ENV] = str(os.getpid())
    sys.stdout, sys.stderr = _OutputForAGoneReader(sys.stdout), _OutputForAGoneReader(sys.stderr)  # type: ignore[assignment]
    module, *args = argv
    sys.argv = [module, *args]  # run_module puts the module's file in argv[0], as `python -m` does
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main(sys.argv[1:])
