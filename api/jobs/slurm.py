"""Jobs run by Slurm: a job's batch script (executor.launch.sbatch_script: srun starts one torchrun of this server's
own Python per node) is submitted with ``sbatch``, followed with ``scontrol show job`` (``sacct`` once the controller
has forgotten it), and cancelled with ``scancel``. Its output goes to the job's ``output.log``, as a local job's does,
so the logs are read and streamed the same way.

Slurm, not a supervisor of the server's, runs the job: it outlives the server by itself, and a restarted server
follows it again by the Slurm job id stored in its row. The nodes must share the job's folder with the server (the
data folder on a shared file system), as they share the Python environment.

No torch here: this module only runs Slurm's commands and reads what they print.
"""

from __future__ import annotations

import logging
import shutil
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from api.jobs.supervise import OUTPUT_FILE
from executor import launch

log = logging.getLogger("paraplan.jobs")

SCRIPT_FILE = "job.sbatch"
"""The batch script a Slurm job runs, in its folder (written when the job is posted)."""
COMMAND_TIMEOUT_S = 60.0
"""How long one call of a Slurm command may take (the controller answers in milliseconds; a busy one in seconds)."""
POLL_S = 1.0
"""How often a running Slurm job's state is asked for: the controller serves every user of the cluster."""

ENDED_STATES = frozenset(
    {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED", "BOOT_FAIL",
     "DEADLINE", "REVOKED"}
)  # fmt: skip
"""Slurm's job states after which nothing of the job runs (`man squeue`, JOB STATE CODES). COMPLETING is not one:
some of its processes are still ending."""
RAN_TO_ITS_END = frozenset({"COMPLETED", "FAILED"})
"""States in which the batch script itself ended (with exit status 0, or another): its output says how it went."""


class SlurmError(RuntimeError):
    """A Slurm command failed (the controller is unreachable, or refused the request)."""


@dataclass(frozen=True)
class SlurmJobState:
    """What Slurm says of a job: its state (the first word: ``CANCELLED by 0`` is CANCELLED), why, and how its batch
    script exited (``returncode``: its exit status, or minus the signal that killed it)."""

    state: str
    reason: str
    returncode: int

    @property
    def ended(self) -> bool:
        return self.state in ENDED_STATES


def missing_reason() -> str | None:
    """Why this server cannot run Slurm jobs (Slurm's commands are not on its PATH), or None if it can."""
    missing = [command for command in ("sbatch", "scontrol", "scancel") if shutil.which(command) is None]
    if missing:
        return f"this server cannot submit to Slurm: {', '.join(missing)} not on its PATH"
    return None


def write_script(
    job_dir: Path, spec: launch.LaunchSpec, partition: str | None, time_limit: str, cpu_only: bool
) -> None:
    """The job's batch script, in its folder: srun starts one torchrun of this server's Python per node."""
    script = launch.sbatch_script(spec, job_name=job_name(job_dir), time_limit=time_limit, partition=partition,
                                  cpu_only=cpu_only)  # fmt: skip
    (job_dir / SCRIPT_FILE).write_text(script)


def job_name(job_dir: Path) -> str:
    """The Slurm job name of the service's job in ``job_dir``: ``paraplan-<job id>``, so squeue shows which job of
    the service it is, and a job whose id was never stored can still be found."""
    return f"paraplan-{job_dir.name}"


def submit(job_dir: Path) -> str:
    """Submit the job's batch script (written by the job's preparation) from its folder; return Slurm's job id. Its
    output, and every rank's under torchrun's --tee, goes to the job's output.log. LaunchError if sbatch refuses."""
    env = launch.launch_env(launch.torch_cache_env(job_dir))  # the job inherits it (sbatch's default --export=ALL)
    output = str(job_dir / OUTPUT_FILE).replace("%", "%%")  # sbatch reads %j, %N, ... in a file name; %% is a %
    return launch.run_sbatch(job_dir / SCRIPT_FILE, options=[f"--output={output}"], env=env)


def cancel(slurm_job_id: str) -> None:
    """``scancel``: Slurm sends SIGTERM to every process of the job (a training run saves a checkpoint and exits),
    then SIGKILL after the cluster's KillWait (slurm.conf; 30 s by default)."""
    _run(["scancel", slurm_job_id])


def cancel_by_name(job_dir: Path) -> None:
    """``scancel`` whatever Slurm job runs for ``job_dir`` (by its job name): a submission whose id was lost."""
    _run(["scancel", f"--name={job_name(job_dir)}"])


def job_state(slurm_job_id: str) -> SlurmJobState | None:
    """The job's state from the controller, or from accounting (``sacct``) once the controller has forgotten it
    (MinJobAge after it ended). None when neither knows the job. SlurmError if Slurm cannot be asked."""
    try:
        shown = _run(["scontrol", "show", "job", "--oneliner", slurm_job_id])
    except SlurmError as error:
        if "Invalid job id" not in str(error):
            raise
        return _accounted_state(slurm_job_id)
    fields = dict(word.partition("=")[::2] for word in shown.split() if "=" in word)
    return SlurmJobState(fields.get("JobState", "UNKNOWN"), fields.get("Reason", ""),
                         _returncode(fields.get("ExitCode", "0:0")))  # fmt: skip


def _accounted_state(slurm_job_id: str) -> SlurmJobState | None:
    """The job's state as accounting recorded it; None without accounting (``sacct`` fails) or without a record."""
    command = ["sacct", "--noheader", "--parsable2", "--allocations", "--jobs", slurm_job_id,
               "--format=State,Reason,ExitCode"]  # fmt: skip
    try:
        lines = _run(command).splitlines()
    except SlurmError:
        return None
    if not lines or lines[0].count("|") != 2:
        return None
    state, reason, exit_code = lines[0].split("|")
    return SlurmJobState(state.split()[0] if state else "UNKNOWN", reason, _returncode(exit_code))


def _returncode(exit_code: str) -> int:
    """Slurm's ``ExitCode=status:signal`` as a return code: minus the signal if one ended it, else the status."""
    status, _, signal = exit_code.partition(":")
    if signal.isdigit() and int(signal):
        return -int(signal)
    return int(status) if status.isdigit() else 1


def _run(argv: list[str]) -> str:
    """Run a Slurm command; its output, or SlurmError with what it printed."""
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired) as error:
        raise SlurmError(f"{argv[0]}: {error}") from error
    if done.returncode != 0:
        raise SlurmError(f"{argv[0]} failed (exit {done.returncode}): {(done.stderr or done.stdout).strip()}")
    return done.stdout


class EndWatch:
    """Whether a Slurm job has ended, for the runner's watcher, which asks every fraction of a second: Slurm is
    asked at most every POLL_S, and a failing ask (the controller restarting) reads as "still running". Each new
    state Slurm reports goes to ``on_state`` (the runner stores it, so a job's view tells PENDING from RUNNING)."""

    def __init__(self, job_id: str, slurm_job_id: str, on_state: Callable[[str], object]):
        self._job_id, self._slurm_job_id, self._on_state = job_id, slurm_job_id, on_state
        self._next_ask = 0.0
        self._last_state: str | None = None

    def __call__(self) -> bool:
        if time.monotonic() < self._next_ask:
            return False
        self._next_ask = time.monotonic() + POLL_S
        try:
            state = job_state(self._slurm_job_id)
        except SlurmError as error:
            log.warning("job %s: cannot ask Slurm about job %s: %s", self._job_id, self._slurm_job_id, error)
            return False
        if state is not None and state.state != self._last_state:
            self._last_state = state.state
            self._on_state(state.state)
        return state is None or state.ended
