"""Worker processes that run plan searches side by side, off the server's event loop.

A search is about half a second of pure-Python CPU: in the server's process it holds the interpreter, so distinct
searches run one at a time and even `/healthz` waits. Here each runs in a worker process of a
ProcessPoolExecutor, one worker per core by default (Settings.search_workers).

- Workers are started with `spawn`, not `fork`: the server has threads (the event loop's, the job runner's,
  SQLAlchemy's pool) whose locks a forked child would inherit held. `forkserver` is not used either: its server
  process outlives any pool, so an app whose lifespan ended would leave a process behind. The executor starts
  workers on demand (up to the limit), so an app that never searches starts none. As with any spawned process,
  a script run as `python script.py` that builds the app must do so under `if __name__ == "__main__":` (the
  worker imports the script); `paraplan serve`, `python -m api.cli` and uvicorn's command need nothing. The first
  spawn also starts Python's resource tracker, one per server process, kept until it exits.
- `start()` / `close()` follow the app's lifespan and may be repeated; close() terminates the workers and joins
  them, so none outlives the lifespan. A pool that is not started (an app used without its lifespan) and a pool
  of 0 workers run each search in the calling thread, as the server did before.
- A worker that dies (killed, out of memory) breaks the whole executor: every search it held fails with
  SearchUnavailable (the service answers 503), and a fresh executor takes the next search.
- The planner's errors come back as the same exceptions (planner/errors.py keeps them picklable); one that would
  not survive the trip is replaced in the worker by a RuntimeError carrying its text, because an exception that
  fails to unpickle in the server breaks the executor.
"""

from __future__ import annotations

import functools
import logging
import multiprocessing
import os
import pickle
import signal
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from planner.request import PlanRequest
    from planner.search.result import SearchResult

log = logging.getLogger("paraplan.api")
T = TypeVar("T")
RECENT_RUNS = 256
"""Runs remembered for diagnosis (which process ran a search, from when to when)."""
WORKER_NICENESS = 5
"""Added to the workers' nice value: Linux's scheduler then gives a busy worker about a third of the CPU share of
a busy server process (each nice step is a factor of about 1.25 in weight: sched_prio_to_weight in the kernel's
kernel/sched/core.c, 1024 at nice 0 and 335 at nice 5)."""
SHUTTING_DOWN = "the server is shutting down; the search did not run"


class SearchUnavailable(RuntimeError):
    """The search could not be answered this time (its worker died, or the server is shutting down); the same
    request may be retried."""


@dataclass(frozen=True)
class Run:
    """Where and when one task ran: its process and its start and end on the monotonic clock (CLOCK_MONOTONIC,
    one clock for every process of the machine, so runs of different workers compare)."""

    pid: int
    started_s: float
    ended_s: float


class SearchPool:
    """Run functions of the planner (importable by name, arguments picklable) in worker processes."""

    def __init__(self, workers: int):
        self.workers = workers
        self.recent_runs: deque[Run] = deque(maxlen=RECENT_RUNS)
        self._executor: ProcessPoolExecutor | None = None
        self._retired: list[ProcessPoolExecutor] = []  # broken ones, joined at close()
        self.in_flight = 0
        """Tasks handed to workers and not finished (queued or running)."""
        self._lock = threading.Lock()

    @property
    def started(self) -> bool:
        return self._executor is not None

    def start(self) -> None:
        """Accept searches in workers (started as searches arrive). No-op with 0 workers."""
        with self._lock:
            if self.workers > 0 and self._executor is None:
                self._executor = self._new_executor()

    def close(self) -> None:
        """Stop every worker now: searches still queued or running fail with SearchUnavailable (by now the server
        has answered or dropped their requests). Stopped rather than waited for, since a worker still starting
        (seconds, on a busy machine) would hold up the shutdown. Afterwards searches run in the calling thread
        until start()."""
        with self._lock:
            executors, self._executor, self._retired = [self._executor, *self._retired], None, []
        for executor in executors:
            if executor is not None:
                _stop(executor)

    def submit(self, fn: Callable[..., T], *args: Any) -> Future[T]:
        """`fn(*args)` in a worker; the future's exception is fn's own, or SearchUnavailable."""
        answer: Future[T] = Future()
        executor = self._executor
        if executor is None:
            self._run_here(answer, fn, args)
            return answer
        try:
            try:
                running = executor.submit(_run_in_worker, fn, *args)
            except BrokenProcessPool:  # broke while idle: nothing of this search ran, so a fresh executor runs it
                executor = self._replace(executor) or executor
                running = executor.submit(_run_in_worker, fn, *args)
        except RuntimeError:  # shut down meanwhile: the app's lifespan is ending
            answer.set_exception(SearchUnavailable(SHUTTING_DOWN))
            return answer
        with self._lock:
            self.in_flight += 1
        running.add_done_callback(functools.partial(self._settle, answer, executor))
        return answer

    def _run_here(self, answer: Future[T], fn: Callable[..., T], args: tuple[Any, ...]) -> None:
        try:
            value, run = _timed(fn, *args)
        except Exception as error:  # handed to the caller through the future, as a worker's would be
            answer.set_exception(error)
            return
        self.recent_runs.append(run)
        answer.set_result(value)

    def _settle(self, answer: Future[T], executor: ProcessPoolExecutor, done: Future[tuple[T, Run]]) -> None:
        """Pass a worker's outcome on (called in the executor's own thread: nothing slow here)."""
        with self._lock:
            self.in_flight -= 1
        if done.cancelled():
            answer.set_exception(SearchUnavailable(SHUTTING_DOWN))
            return
        error = done.exception()
        if isinstance(error, BrokenProcessPool):
            self._replace(executor)
            message = ("the worker process running this search stopped (killed, or out of memory); the workers "
                       "have been restarted, so the request may be retried")  # fmt: skip
            answer.set_exception(SearchUnavailable(message))
        elif error is not None:
            answer.set_exception(error)
        else:
            value, run = done.result()
            self.recent_runs.append(run)
            answer.set_result(value)

    def _replace(self, broken: ProcessPoolExecutor) -> ProcessPoolExecutor | None:
        """The executor to use instead of `broken` (a fresh one, once); None once the pool is closed."""
        with self._lock:
            if self._executor is broken:
                log.warning("a search worker died; starting fresh search workers")
                self._retired.append(broken)  # its workers are gone; close() joins what is left of it
                self._executor = self._new_executor()
            return self._executor

    def _new_executor(self) -> ProcessPoolExecutor:
        context = multiprocessing.get_context("spawn")
        return ProcessPoolExecutor(self.workers, mp_context=context, initializer=_prepare_worker)


def _stop(executor: ProcessPoolExecutor) -> None:
    """Cancel what is queued, terminate the workers, and join them and the executor's thread. (The executor has
    no public way to terminate its workers before Python 3.14's terminate_workers; this is what it does.)"""
    workers = list((getattr(executor, "_processes", None) or {}).values())
    executor.shutdown(wait=False, cancel_futures=True)
    for worker in workers:
        worker.terminate()
    for worker in workers:
        worker.join()
    executor.shutdown(wait=True)


# ==================================================================================== what a worker runs


@dataclass(frozen=True)
class SearchAnswer:
    """A SearchResult as JSON text, with what the plans table copies out of it (read once, not per request)."""

    json: str
    found: int
    best_step_time_s: float | None

    @classmethod
    def of(cls, result: SearchResult) -> SearchAnswer:
        best = result.plans[0].estimate.step_time_s if result.plans else None
        return cls(result.model_dump_json(), len(result.plans), best)


def search_answer(request: PlanRequest) -> SearchAnswer:
    """Search, answering in JSON: the task the service gives its workers (here, so that a worker imports the
    planner and this module, not the service's database layer), and the text is what crosses back."""
    from planner.search import search

    return SearchAnswer.of(search(request))


def _prepare_worker() -> None:
    """In each worker, once: yield the CPU to the server (with one worker per core the workers alone can fill the
    machine, and the server's event loop must still answer at once: /healthz, memoized searches, job logs); leave
    Ctrl-C to the server (a terminal sends SIGINT to the whole process group, and the server stops its workers
    itself); import the search before the first one is timed."""
    os.nice(WORKER_NICENESS)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    import planner.search  # noqa: F401


def _run_in_worker(fn: Callable[..., T], *args: Any) -> tuple[T, Run]:
    """`_timed(fn, *args)` in a worker. An exception that could not be unpickled in the server (one whose
    constructor takes more than its message) is replaced by a RuntimeError with its traceback: that one can."""
    try:
        return _timed(fn, *args)
    except Exception as error:
        if not _survives_pickling(error):
            raise RuntimeError(f"{type(error).__qualname__} (not picklable): {traceback.format_exc()}") from None
        raise


def _timed(fn: Callable[..., T], *args: Any) -> tuple[T, Run]:
    """fn(*args), and where and when it ran."""
    started_s = time.monotonic()
    value = fn(*args)
    return value, Run(os.getpid(), started_s, time.monotonic())


def _survives_pickling(error: BaseException) -> bool:
    try:
        pickle.loads(pickle.dumps(error))
    except Exception:  # noqa: BLE001  (any failure means it cannot make the trip)
        return False
    return True
