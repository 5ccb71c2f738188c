"""A job's supervisor: ``python -m api.jobs.supervise JOB_DIR`` runs the command in ``JOB_DIR/command.json``.

The REST service starts one per job, in a session of its own and writing only to files, so a job outlives the
server that started it (and any client): a restarted server finds the supervisor by pid and re-attaches, or
reads what it left. The supervisor

- holds the lock of the job's run folder, if it has one (``executor.run_lock``), and passes it on to the command;
  a folder another run holds ends the job at once, with ``refused`` naming the holder;
- writes the command's output (stdout and stderr, every rank's under torchrun's ``--tee``) to ``output.log``;
- on SIGTERM, SIGINT or SIGHUP stops the command with ``executor.launch.stop``: SIGTERM to its process group (a
  training run saves a checkpoint and exits), then SIGKILL to every process below it after the grace period;
- adopts the orphans of its tree (a child subreaper: workers whose agent was killed become its children), and once
  the command has ended waits for them to be gone, killing what remains after the grace period: a job is over
  only when none of its processes runs;
- writes ``result.json`` (``returncode``, ``cancelled``) last, atomically: its presence means the job is over.

The command dies with the supervisor (``executor.lifeline``): a supervisor killed outright leaves nothing running.

No torch here: the supervisor only starts and watches processes.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from api.commands.cancel import stop_on_interrupt
from executor import launch, lifeline, run_lock

COMMAND_FILE = "command.json"
OUTPUT_FILE = "output.log"
RESULT_FILE = "result.json"
MODULE = "api.jobs.supervise"


REFUSED_RETURNCODE = 2
"""The result's return code of a job that never started its command (its run folder was in use)."""


def write_command(job_dir: Path, argv: list[str], grace_s: float, lock: Path | None = None) -> None:
    """What the supervisor of ``job_dir`` will run (written by the server before it starts the supervisor), and
    the run folder it must hold while it runs, if any."""
    command = {"argv": argv, "grace_s": grace_s, "lock": None if lock is None else str(lock)}
    (job_dir / COMMAND_FILE).write_text(json.dumps(command, indent=2))


def supervisor_argv(job_dir: Path) -> list[str]:
    return [sys.executable, "-m", MODULE, str(job_dir)]


def is_supervisor_of(pid: int, job_dir: Path) -> bool:
    """True if ``pid`` is alive and is the supervisor of ``job_dir`` (not another process that got its pid)."""
    if not launch.pid_alive(pid):
        return False
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return MODULE.encode() in argv and str(job_dir).encode() in argv


def read_result(job_dir: Path) -> dict[str, Any] | None:
    """The supervisor's result, or None while the job runs (or if its supervisor died before writing one)."""
    try:
        return json.loads((job_dir / RESULT_FILE).read_text())
    except (OSError, ValueError):
        return None


def supervise(job_dir: Path) -> int:
    """Run the job's command to its end (or until stopped); write result.json; return the command's status."""
    command = json.loads((job_dir / COMMAND_FILE).read_text())
    lifeline.adopt_orphans()
    cancel = threading.Event()
    with (job_dir / OUTPUT_FILE).open("ab") as output, stop_on_interrupt(cancel):
        try:
            with _run_folder_lock(command.get("lock")) as lock_fds:
                returncode = _run(command, job_dir, output, cancel, lock_fds)
        except run_lock.RunFolderInUse as refused:
            output.write(f"paraplan: {refused}\n".encode())
            _write_result(job_dir, {"returncode": REFUSED_RETURNCODE, "cancelled": False, "refused": str(refused)})
            return REFUSED_RETURNCODE
    _write_result(job_dir, {"returncode": returncode, "cancelled": cancel.is_set()})
    return returncode


@contextlib.contextmanager
def _run_folder_lock(folder: str | None) -> Iterator[tuple[int, ...]]:
    """The descriptors of the run folder's lock to pass on (none for a job without a run folder)."""
    if folder is None:
        yield ()
        return
    with run_lock.hold(Path(folder)) as descriptor:
        yield (descriptor,)


def _run(
    command: dict[str, Any], job_dir: Path, output: IO[bytes], cancel: threading.Event, pass_fds: tuple[int, ...]
) -> int:
    """Start the command, wait for it (stopping it when cancelled), then for every process it left. Its files stay
    in the job's folder: torch's compiler cache too (``executor.launch.torch_cache_env``)."""
    grace_s = float(command["grace_s"])
    process = subprocess.Popen(
        command["argv"],
        cwd=launch.REPO_ROOT,
        env=lifeline.child_env(launch.launch_env(launch.torch_cache_env(job_dir))),
        stdin=subprocess.DEVNULL,
        stdout=output,
        stderr=subprocess.STDOUT,
        pass_fds=pass_fds,
        start_new_session=True,  # one group to signal, without signalling this supervisor
    )
    returncode = _wait(process, cancel, grace_s)
    launch.end_leftovers(launch.ProcessTree(os.getpid()), grace_s)  # orphans are this process's children now
    return returncode


def _wait(process: subprocess.Popen[bytes], cancel: threading.Event, grace_s: float) -> int:
    while True:
        try:
            return process.wait(timeout=0.2)
        except subprocess.TimeoutExpired:
            if cancel.is_set():
                return launch.stop(process, grace_s)  # type: ignore[arg-type]


def _write_result(job_dir: Path, result: dict[str, Any]) -> None:
    partial = job_dir / (RESULT_FILE + ".partial")
    partial.write_text(json.dumps(result))
    os.replace(partial, job_dir / RESULT_FILE)


if __name__ == "__main__":
    sys.exit(0 if supervise(Path(sys.argv[1])) == 0 else 1)
