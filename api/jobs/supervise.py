"""A job's supervisor: ``python -m api.jobs.supervise JOB_DIR`` runs the command in ``JOB_DIR/command.json``.

The REST service starts one per job, in a session of its own and writing only to files, so a job outlives the
server that started it (and any client): a restarted server finds the supervisor by pid and re-attaches, or
reads what it left. The supervisor

- writes the command's output (stdout and stderr, every rank's under torchrun's ``--tee``) to ``output.log``;
- on SIGTERM or SIGINT stops the command with ``executor.launch.stop``: SIGTERM to its process group (a training
  run saves a checkpoint and exits), then SIGKILL to every process below it after the grace period;
- writes ``result.json`` (``returncode``, ``cancelled``) last, atomically: its presence means the job is over.

No torch here: the supervisor only starts and watches processes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

from api.commands.cancel import stop_on_interrupt
from executor import launch

COMMAND_FILE = "command.json"
OUTPUT_FILE = "output.log"
RESULT_FILE = "result.json"
MODULE = "api.jobs.supervise"


def write_command(job_dir: Path, argv: list[str], grace_s: float) -> None:
    """What the supervisor of ``job_dir`` will run (written by the server before it starts the supervisor)."""
    (job_dir / COMMAND_FILE).write_text(json.dumps({"argv": argv, "grace_s": grace_s}, indent=2))


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
    cancel = threading.Event()
    with (job_dir / OUTPUT_FILE).open("ab") as output, stop_on_interrupt(cancel):
        process = subprocess.Popen(
            command["argv"],
            cwd=launch.REPO_ROOT,
            env=launch.launch_env(),
            stdin=subprocess.DEVNULL,
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # one group to signal, without signalling this supervisor
        )
        returncode = _wait(process, cancel, float(command["grace_s"]))
    _write_result(job_dir, {"returncode": returncode, "cancelled": cancel.is_set()})
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
