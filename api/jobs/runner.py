"""The job runner: a queue of training and profiling jobs, each run by a detached supervisor process.

A job is prepared when it is posted (its folder ``<data dir>/jobs/<id>/`` holds what its supervisor will run,
see api/jobs/supervise.py) and stored QUEUED. The runner starts the oldest queued jobs while fewer than
``max_concurrent_jobs`` run, watches each until its supervisor exits, then records how it ended (what the job's
kind makes of its files: a measured run, a stored profile, a failure reason).

Supervisors run in sessions of their own and write only to files, so jobs outlive client disconnects and the
server itself. When a server starts it reconciles what a previous one left RUNNING: a job whose supervisor still
runs is watched again; one that wrote its result meanwhile is finished from it; any other is FAILED with reason
"server restarted" and whatever it left running is killed. Nothing stays RUNNING forever.

A job of the Slurm launcher (api/jobs/slurm.py) has no supervisor: starting it submits its batch script, Slurm
runs and queues it (so it does not count toward ``max_concurrent_jobs``, which bounds this host's own work), its
watcher asks Slurm whether it has ended, and cancelling it is ``scancel``. A restarted server watches it again by
its Slurm job id.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Protocol

from api.jobs import folder_lock, slurm
from api.jobs.supervise import OUTPUT_FILE, is_supervisor_of, read_result, supervisor_argv
from api.settings import Settings
from api.store import FINAL_STATES, LOCAL, SLURM, ApiStore, JobRow, utc_now
from executor import launch

log = logging.getLogger("paraplan.jobs")

POLL_S = 0.25
"""How often a watcher looks at a supervisor it did not start (it cannot wait() for another server's child)."""
RESTARTED = "server restarted"


@dataclass(frozen=True)
class Outcome:
    """How a job ended: its final state, why it failed (if it did), and other columns to set."""

    state: str
    failure_reason: str | None = None
    updates: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class TimeLimit:
    """The wall time one kind of job may run, from its start, and the setting that sets it (named when a job is
    stopped for running past it)."""

    seconds: float
    setting: str

    def reason(self, kind: str) -> str:
        return f"ran past the time limit of {kind} jobs ({self.seconds:g} s, {self.setting}) and was stopped"


class JobKind(Protocol):
    """What one kind of job (training, profiling) makes of a finished supervisor's files."""

    def outcome(self, row: JobRow, job_dir: Path, returncode: int) -> Outcome: ...


class JobNotFound(LookupError):
    pass


class JobRunner:
    """Starts queued jobs (at most ``settings.max_concurrent_jobs`` at once), watches and cancels them."""

    def __init__(
        self,
        store: ApiStore,
        settings: Settings,
        kinds: Mapping[str, JobKind],
        time_limits: Mapping[str, TimeLimit] | None = None,
    ):
        """`time_limits`: kind -> the wall time its jobs may run (kinds not named: no limit)."""
        self._store, self._settings, self._kinds = store, settings, dict(kinds)
        self._time_limits = dict(time_limits or {})
        self._watched: dict[str, str] = {}  # job id -> its launcher
        self._lock = threading.Lock()  # guards _watched: the dispatcher and the watchers change it
        self._wake = threading.Event()
        self._closing = threading.Event()
        self._dispatcher: threading.Thread | None = None

    def job_dir(self, job_id: str) -> Path:
        return self._settings.jobs_dir / job_id

    # --------------------------------------------------------------------------------------------- lifecycle

    def start(self) -> None:
        """Reconcile what a previous server left, then start dispatching queued jobs (again, after a close:
        an app's lifespan can run more than once). FolderInUse if another server's runner holds the data folder."""
        folder_lock.acquire(self._settings.data_dir)
        self._closing.clear()
        try:
            self._settings.jobs_dir.mkdir(parents=True, exist_ok=True)
            self.reconcile()
        except BaseException:
            folder_lock.release(self._settings.data_dir)
            raise
        self._dispatcher = threading.Thread(target=self._dispatch_loop, name="paraplan-dispatcher", daemon=True)
        self._dispatcher.start()

    def close(self) -> None:
        """Stop dispatching and watching. Running jobs go on; the next server re-attaches to them."""
        self._closing.set()
        self._wake.set()
        if self._dispatcher is not None:
            self._dispatcher.join(timeout=5)
            self._dispatcher = None
            folder_lock.release(self._settings.data_dir)

    @property
    def alive(self) -> bool:
        return self._dispatcher is not None and self._dispatcher.is_alive()

    def wake(self) -> None:
        """Look at the queue now (a job was queued or one ended)."""
        self._wake.set()

    # ------------------------------------------------------------------------------------------ reconciling

    def reconcile(self) -> None:
        for row in self._store.jobs(states=["RUNNING"], limit=10_000):
            job_dir = self.job_dir(row.id)
            if row.launcher == SLURM:
                self._reattach_slurm(row)
            elif read_result(job_dir) is not None:
                self._finish(row.id)
            elif row.pid is not None and is_supervisor_of(row.pid, job_dir):
                log.info("job %s: re-attached to its supervisor (pid %d)", row.id, row.pid)
                self._watch(row.id, lambda pid=row.pid, d=job_dir: not is_supervisor_of(pid, d))
            else:
                kill_strays(job_dir)
                self._end(row.id, Outcome("FAILED", RESTARTED))

    def _reattach_slurm(self, row: JobRow) -> None:
        if row.slurm_job_id is None:  # the previous server stopped while submitting it: sbatch may have taken it
            try:
                slurm.cancel_by_name(self.job_dir(row.id))
            except slurm.SlurmError as error:
                log.warning("job %s: cannot cancel what its lost submission left in Slurm: %s", row.id, error)
            self._end(row.id, Outcome("FAILED", RESTARTED))
            return
        log.info("job %s: re-attached to Slurm job %s", row.id, row.slurm_job_id)
        self._watch_slurm(row.id, row.slurm_job_id)

    # ------------------------------------------------------------------------------------------ dispatching

    def _dispatch_loop(self) -> None:
        while not self._closing.is_set():
            try:
                self._start_queued()
            except Exception:  # the loop must outlive a database hiccup; the next wake-up retries
                log.exception("dispatching queued jobs failed")
            self._wake.wait(timeout=1.0)
            self._wake.clear()

    def _start_queued(self) -> None:
        """Every queued Slurm job (Slurm queues them in turn), and local ones while fewer than the limit run."""
        with self._lock:
            free = self._settings.max_concurrent_jobs - list(self._watched.values()).count(LOCAL)
        queued = list(self._store.jobs(states=["QUEUED"], launcher=SLURM, limit=10_000, oldest_first=True))
        if free > 0:
            queued += self._store.jobs(states=["QUEUED"], launcher=LOCAL, limit=free, oldest_first=True)
        for row in queued:
            if self._closing.is_set():
                return
            self._launch(row)

    def _launch(self, row: JobRow) -> None:
        """QUEUED -> RUNNING (unless it was cancelled meanwhile), then start its supervisor or submit it to Slurm."""
        if not self._store.update_job(row.id, only_if_state=["QUEUED"], state="RUNNING", started=utc_now()):
            return
        if row.launcher == SLURM:
            self._submit_to_slurm(row.id)
        else:
            self._start_supervisor(row.id)

    def _submit_to_slurm(self, job_id: str) -> None:
        try:
            slurm_job_id = slurm.submit(self.job_dir(job_id))
        except launch.LaunchError as error:
            self._end(job_id, Outcome("FAILED", f"could not submit the job to Slurm: {error}"))
            return
        self._store.update_job(job_id, slurm_job_id=slurm_job_id)
        log.info("job %s: submitted to Slurm (job %s)", job_id, slurm_job_id)
        self._watch_slurm(job_id, slurm_job_id)
        self._stop_if_cancelled_while_starting(job_id)

    def _watch_slurm(self, job_id: str, slurm_job_id: str) -> None:
        def store_state(state: str) -> None:
            self._store.update_job(job_id, slurm_state=state)

        self._watch(job_id, slurm.EndWatch(job_id, slurm_job_id, store_state), SLURM)

    def _start_supervisor(self, job_id: str) -> None:
        job_dir = self.job_dir(job_id)
        try:
            with (job_dir / OUTPUT_FILE).open("ab") as output:  # where a supervisor's own crash would show
                process = subprocess.Popen(
                    supervisor_argv(job_dir),
                    cwd=launch.REPO_ROOT,
                    env=launch.launch_env(),
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL,
                    stderr=output,
                    start_new_session=True,  # not stopped by the server's Ctrl-C; outlives the server
                )
        except OSError as error:
            self._end(job_id, Outcome("FAILED", f"could not start the job's supervisor: {error}"))
            return
        self._store.update_job(job_id, pid=process.pid)
        log.info("job %s: started (supervisor pid %d)", job_id, process.pid)
        self._watch(job_id, lambda: process.poll() is not None)
        self._stop_if_cancelled_while_starting(job_id)

    def _stop_if_cancelled_while_starting(self, job_id: str) -> None:
        """A cancel that came before the job's pid (or Slurm job id) was stored could not stop it: stop it now."""
        row = self._store.get_job(job_id)
        if row is not None and row.cancel_requested:
            self._stop(job_id)

    # --------------------------------------------------------------------------------------------- watching

    def _watch(self, job_id: str, exited: Callable[[], bool], launcher: str = LOCAL) -> None:
        with self._lock:
            self._watched[job_id] = launcher
        thread = threading.Thread(target=self._watch_loop, args=(job_id, exited), name=f"job-{job_id}", daemon=True)
        thread.start()

    def _watch_loop(self, job_id: str, exited: Callable[[], bool]) -> None:
        try:
            deadline = self._deadline(job_id)
            while not exited():
                if deadline is not None and datetime.now(UTC) > deadline:
                    self._stop_overdue(job_id)
                    deadline = None  # asked once; the supervisor stops it within its grace period
                if self._closing.wait(POLL_S):
                    return  # the server is stopping: the job goes on, and the next server watches it
            self._finish(job_id)
        except Exception:
            log.exception("job %s: watching failed", job_id)
            self._end(job_id, Outcome("FAILED", "the server failed while recording how the job ended; see its log"))
        finally:
            with self._lock:
                self._watched.pop(job_id, None)
            self.wake()

    def _deadline(self, job_id: str) -> datetime | None:
        """When the job's time is up: its start plus its kind's time limit (None: no limit)."""
        row = self._store.get_job(job_id)
        limit = None if row is None else self._time_limits.get(row.kind)
        if row is None or limit is None or row.started is None:
            return None
        return datetime.fromisoformat(row.started) + timedelta(seconds=limit.seconds)

    def _stop_overdue(self, job_id: str) -> None:
        """Stop a job that ran past its time limit as a cancel does; the reason recorded makes it end FAILED."""
        row = self._store.get_job(job_id)
        if row is None:
            return
        reason = self._time_limits[row.kind].reason(row.kind)
        if self._store.update_job(job_id, only_if_state=["RUNNING"], cancel_requested=True, failure_reason=reason):
            log.info("job %s: %s", job_id, reason)
            self._stop(job_id)

    def _finish(self, job_id: str) -> None:
        """Record how a job whose supervisor has exited (or that Slurm has ended) ended."""
        row = self._store.get_job(job_id)
        if row is None or row.state in FINAL_STATES:
            return
        self._end(job_id, self._slurm_outcome(row) if row.launcher == SLURM else self._local_outcome(row))

    def _local_outcome(self, row: JobRow) -> Outcome:
        job_dir = self.job_dir(row.id)
        result = read_result(job_dir)
        if result is None:
            kill_strays(job_dir)
            if row.cancel_requested:  # stopped before it could install its signal handler
                return _stopped(row)
            return Outcome("FAILED", "the job's supervisor exited without a result (it was killed)")
        if result.get("refused"):  # its run folder was in use: nothing started
            return Outcome("FAILED", result["refused"], updates={"returncode": result["returncode"]})
        if result.get("cancelled") or (row.cancel_requested and result["returncode"] != 0):
            return _stopped(row, returncode=result["returncode"])
        return self._kind_outcome(row, result["returncode"])

    def _slurm_outcome(self, row: JobRow) -> Outcome:
        """From Slurm's final state: CANCELLED as a cancel; COMPLETED or FAILED (the batch script ran to its end)
        as the job's kind reads its files; any other (TIMEOUT, NODE_FAIL, ...) FAILED, naming Slurm's state."""
        assert row.slurm_job_id is not None
        try:
            ended = slurm.job_state(row.slurm_job_id)
        except slurm.SlurmError as error:
            return Outcome("FAILED", f"Slurm job {row.slurm_job_id}: cannot read how it ended: {error}")
        if ended is None:
            forgotten = "the controller forgets an ended job after MinJobAge; accounting has no record"
            return Outcome("FAILED", f"Slurm job {row.slurm_job_id}: Slurm no longer knows how it ended ({forgotten})")
        if ended.state == "CANCELLED" or (row.cancel_requested and ended.returncode != 0):
            return _stopped(row, returncode=ended.returncode)
        if ended.state in slurm.RAN_TO_ITS_END:
            return self._kind_outcome(row, ended.returncode)
        reason = f"Slurm ended job {row.slurm_job_id} as {ended.state}" + (f" ({ended.reason})" if ended.reason else "")
        return Outcome("FAILED", reason, {"returncode": ended.returncode})

    def _kind_outcome(self, row: JobRow, returncode: int) -> Outcome:
        """What the job's kind makes of its files, now that its command has exited with `returncode`."""
        outcome = self._kinds[row.kind].outcome(row, self.job_dir(row.id), returncode)
        outcome.updates.setdefault("returncode", returncode)
        return outcome

    def _end(self, job_id: str, outcome: Outcome) -> None:
        self._store.update_job(
            job_id,
            only_if_state=["QUEUED", "RUNNING"],
            state=outcome.state,
            failure_reason=outcome.failure_reason,
            finished=utc_now(),
            **outcome.updates,
        )
        log.info("job %s: %s %s", job_id, outcome.state, outcome.failure_reason or "")

    # ------------------------------------------------------------------------------------------- cancelling

    def cancel(self, job_id: str) -> JobRow:
        """Cancel a job: a queued one at once; a running one is asked to stop (SIGTERM to its supervisor, which
        gives a training run the grace period to save a checkpoint, then kills every rank). Cancelling a job
        that has ended changes nothing."""
        row = self._store.get_job(job_id)
        if row is None:
            raise JobNotFound(job_id)
        if row.state == "QUEUED" and self._store.update_job(
            job_id, only_if_state=["QUEUED"], state="CANCELLED", cancel_requested=True, finished=utc_now()
        ):
            return self._store.get_job(job_id) or row
        if row.state == "RUNNING" or (row.state == "QUEUED"):  # QUEUED here: it started meanwhile
            self._store.update_job(job_id, only_if_state=["RUNNING"], cancel_requested=True)
            self._stop(job_id)
        return self._store.get_job(job_id) or row

    def _stop(self, job_id: str) -> None:
        """Ask a running job to stop: scancel for a Slurm job, SIGTERM to a local job's supervisor."""
        row = self._store.get_job(job_id)
        if row is not None and row.launcher == SLURM:
            if row.slurm_job_id is not None:  # else not submitted yet: it is stopped once its id is stored
                try:
                    slurm.cancel(row.slurm_job_id)
                except slurm.SlurmError as error:  # it ended meanwhile, or Slurm cannot be reached
                    log.warning("job %s: scancel of Slurm job %s failed: %s", job_id, row.slurm_job_id, error)
            return
        if row is None or row.pid is None or not is_supervisor_of(row.pid, self.job_dir(job_id)):
            return  # not started yet (the watcher will see cancel_requested) or already gone
        with contextlib.suppress(ProcessLookupError):
            os.kill(row.pid, signal.SIGTERM)


def _stopped(row: JobRow, **updates: Any) -> Outcome:
    """How a job that was asked to stop ended: CANCELLED, or FAILED if the runner stopped it for running too long
    (the only stop that records a reason before the job ends)."""
    if row.failure_reason is not None:
        return Outcome("FAILED", row.failure_reason, updates)
    return Outcome("CANCELLED", updates=updates)


STRAYS_LIMIT_S = 10.0
"""How long killing a dead supervisor's strays may take (SIGKILL is delivered at once, but a process exits only
once its memory is freed), and again for processes started meanwhile by a dying parent."""


def kill_strays(job_dir: Path, limit_s: float = STRAYS_LIMIT_S) -> None:
    """SIGKILL every process still running a job's command (found by its folder in their command lines) and wait
    until they are gone: what a killed supervisor left behind must not go on using the machine, and the job is
    recorded as ended only once nothing of it runs."""
    deadline = time.monotonic() + limit_s
    while (strays := _processes_naming(job_dir)) and time.monotonic() < deadline:
        for pid in strays:
            with contextlib.suppress(ProcessLookupError, PermissionError):  # gone meanwhile, or not ours to kill
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.05)
    if strays:
        log.warning("job folder %s: processes %s outlived SIGKILL for %.0f s", job_dir, strays, limit_s)


def _processes_naming(job_dir: Path) -> list[int]:
    """The live processes (other than this one) whose command line names ``job_dir``."""
    marker = str(job_dir).encode()
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        with contextlib.suppress(OSError, ValueError):  # gone meanwhile
            pid = int(cmdline.parent.name)
            if marker in cmdline.read_bytes() and pid != os.getpid() and launch.pid_alive(pid):
                found.append(pid)
    return found
