"""Stopping a command cleanly: Ctrl-C, SIGTERM or SIGHUP (its terminal closed) sets an event that the command's
launches watch, so torchrun's workers (in a session of their own) are stopped, not orphaned. The CLI, a job's
process and a job's supervisor all run their command under it."""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

T = TypeVar("T")

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
"""What asks a command to stop: Ctrl-C, `kill` (a scheduler, a job's cancel), and a hang-up (the terminal closed:
its workers would otherwise train on with no one to stop them)."""


@contextmanager
def stop_on_interrupt(cancel: threading.Event) -> Iterator[None]:
    """Ctrl-C, SIGTERM or SIGHUP asks the run to stop (it saves a checkpoint first) instead of killing this
    process and leaving the workers, which run in their own session, behind."""
    handler: Callable[[int, Any], None] = lambda signum, frame: cancel.set()  # noqa: E731
    previous = {sig: signal.signal(sig, handler) for sig in STOP_SIGNALS}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def with_interrupt(body: Callable[[threading.Event], T]) -> T:
    """Run `body(cancel)` with Ctrl-C / SIGTERM / SIGHUP setting `cancel`, so torchrun's workers are stopped, not
    orphaned."""
    cancel = threading.Event()
    with stop_on_interrupt(cancel):
        return body(cancel)
