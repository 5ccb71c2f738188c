"""The commands' progress (api/commands/progress.py) drawn with rich: one bar a task, one live display at a time
(a task started inside another, such as the profiler's inside a validation's runs, hides the outer bar until it
ends)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from api.commands.progress import Update


class RichProgress:
    def __init__(self, console: Console):
        self.console = console
        self._shown: list[Progress] = []

    @contextmanager
    def task(self, label: str, total: int | None = None, done: int = 0, what: str = "") -> Iterator[Update]:
        bar = Progress(
            TextColumn(f"[bold]{label}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[what]}"),
            TimeElapsedColumn(), TimeRemainingColumn(), console=self.console,
        )  # fmt: skip
        outer = self._shown[-1] if self._shown else None
        if outer is not None:
            outer.stop()
        self._shown.append(bar)
        try:
            with bar:
                task = bar.add_task(label, total=total, completed=done, what=what)

                def update(done: int | None = None, total: int | None = None, what: str | None = None) -> None:
                    bar.update(task, completed=done, total=total)
                    if what is not None:
                        bar.update(task, what=what)

                yield update
        finally:
            self._shown.pop()
            if outer is not None:
                outer.start()

    def note(self, text: str, style: str | None = None) -> None:
        self.console.print(text, style=style, markup=False, highlight=False)
