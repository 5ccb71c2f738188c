"""How a long command reports its progress: through a callback, so that no command needs a display. The CLI
draws it with rich (api/cli/progress.py); a job's process prints plain lines to its log (`LineProgress`); a
caller that wants nothing passes `SILENT`."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager
from typing import Protocol


class Update(Protocol):
    def __call__(self, done: int | None = None, total: int | None = None, what: str | None = None) -> None:
        """Move the task on: `done` of `total` (None: unchanged), doing `what`."""


class Progress(Protocol):
    def task(
        self, label: str, total: int | None = None, done: int = 0, what: str = ""
    ) -> AbstractContextManager[Update]:
        """A task with a bar, for the length of the `with`: at most one shows at a time, so a task started inside
        another hides the outer one until it ends."""

    def note(self, text: str, style: str | None = None) -> None:
        """A line for the reader (`style`: a hint such as "dim", "red", "yellow" that a display may use)."""


class LineProgress:
    """Plain lines on standard output, for a log: a task's state at most every `every_s` seconds and at its end."""

    def __init__(self, every_s: float = 10.0):
        self.every_s = every_s

    @contextmanager
    def task(self, label: str, total: int | None = None, done: int = 0, what: str = "") -> Iterator[Update]:
        state = {"done": done, "total": total, "what": what}
        last = time.monotonic()

        def update(done: int | None = None, total: int | None = None, what: str | None = None) -> None:
            nonlocal last
            state.update({k: v for k, v in (("done", done), ("total", total), ("what", what)) if v is not None})
            if time.monotonic() - last >= self.every_s:
                last = time.monotonic()
                self._line(label, state)

        yield update
        self._line(label, state)

    def note(self, text: str, style: str | None = None) -> None:
        print(text, flush=True)

    @staticmethod
    def _line(label: str, state: Mapping[str, object]) -> None:
        total = "?" if state["total"] is None else state["total"]
        print(f"{label}: {state['done']}/{total} {state['what']}".rstrip(), file=sys.stdout, flush=True)


class _Silent:
    @contextmanager
    def task(self, label: str, total: int | None = None, done: int = 0, what: str = "") -> Iterator[Update]:
        yield lambda done=None, total=None, what=None: None

    def note(self, text: str, style: str | None = None) -> None:
        pass


SILENT: Progress = _Silent()
