"""Build, run and supervise ``torchrun``; write and submit Slurm batch scripts.

This module is imported by the CLI and the REST service, so it must not import torch: it only builds command
lines, starts subprocesses and reads the files torch's elastic agent leaves behind.

What torch 2.13's ``torchrun`` leaves in ``--log-dir`` (see ``DefaultLogsSpecs.reify``)::

    <log_dir>/<rdzv_run_id>_<random>/attempt_<restart>/<local_rank>/{stdout.log, stderr.log, error.json}

The agent points each worker's ``TORCHELASTIC_ERROR_FILE`` at its ``error.json``; a worker whose entry point is
decorated with ``torch.distributed.elastic.multiprocessing.errors.record`` writes
``{"message": {"message": "<Type>: <text>", "extraInfo": {"py_callstack": ..., "timestamp": ...}}}`` there when it
raises. When a worker fails, the agent stops the others (with ``--max-restarts=0`` it does not retry) and
``torchrun`` raises ``ChildFailedError``, whose text lists every failed rank (``rank : R (local_rank: L)``,
``exitcode : C (pid: P)``, ``error_file: ...``) and marks the first one as ``Root Cause``. :func:`run` reads both.

A local launch runs torchrun under ``executor.lifeline`` (:func:`watched_torchrun_command`): the agent and its
workers stop when the process that started them is killed, and :func:`run` returns only once every process it
started is gone (:class:`ProcessTree`, :func:`end_leftovers`). Everything a launch writes goes to its ``log_dir``.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import IO, Any

from executor import lifeline

REPO_ROOT = Path(__file__).resolve().parents[1]
LAUNCHER_LOG = "launcher.log"
SLURM_RDZV_PORT = 29500
"""First port of the c10d rendezvous store on a Slurm job's first node (torchrun's default master port); a job uses
this plus its Slurm job id modulo SLURM_RDZV_PORTS, so jobs sharing a node do not take each other's port."""
SLURM_RDZV_PORTS = 1000

_SUBMITTED = re.compile(r"Submitted batch job (\d+)")
_RDZV_ID = re.compile(r"[\w.-]+")
"""Safe as a word in a shell line and in a folder name (torchrun prefixes its per-run log folder with it)."""


class LaunchError(ValueError):
    """A launch that cannot be built or started: a bad spec, or a missing tool."""


# --------------------------------------------------------------------------------------------------------- spec


@dataclass(frozen=True)
class LaunchSpec:
    """What to launch under torchrun, and where.

    ``node_rank`` only matters for multi-node launches (``None`` lets c10d rendezvous assign it); ``log_dir`` turns
    on torchrun's per-rank logs and error files; ``module`` is run with ``python -m`` in every worker.
    """

    nproc_per_node: int
    nnodes: int = 1
    node_rank: int | None = None
    rdzv_endpoint: str | None = None
    rdzv_id: str = "paraplan"
    module: str = "executor.train"
    args: tuple[str, ...] = ()
    log_dir: Path | None = None
    max_restarts: int = 0

    def __post_init__(self) -> None:
        # Callers pass lists and str paths; normalise so the spec stays hashable and comparable.
        object.__setattr__(self, "args", tuple(str(arg) for arg in self.args))
        if self.log_dir is not None:
            object.__setattr__(self, "log_dir", Path(self.log_dir))
        _validate(self)

    @property
    def world_size(self) -> int:
        """Number of worker processes over all nodes."""
        return self.nnodes * self.nproc_per_node


def _require_int(name: str, value: object, minimum: int) -> None:
    """Raise LaunchError naming ``name`` unless ``value`` is an int >= ``minimum`` (bool is not a count)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise LaunchError(f"{name} must be an integer >= {minimum}, got {value!r}")


def _validate(spec: LaunchSpec) -> None:
    """Reject a spec torchrun would refuse or misread, naming the offending field."""
    _require_int("nproc_per_node", spec.nproc_per_node, 1)
    _require_int("nnodes", spec.nnodes, 1)
    _require_int("max_restarts", spec.max_restarts, 0)
    if spec.node_rank is not None:
        _require_int("node_rank", spec.node_rank, 0)
        if spec.node_rank >= spec.nnodes:
            raise LaunchError(f"node_rank must be in [0, nnodes={spec.nnodes}), got {spec.node_rank}")
    if spec.rdzv_endpoint is not None:
        _validate_endpoint(spec.rdzv_endpoint)
    if not _RDZV_ID.fullmatch(spec.rdzv_id):
        raise LaunchError(f"rdzv_id must be letters, digits, '_', '.' or '-', got {spec.rdzv_id!r}")
    if not spec.module or any(ch.isspace() for ch in spec.module):
        raise LaunchError(f"module must be a dotted module name, got {spec.module!r}")


def _validate_endpoint(endpoint: str) -> None:
    """Check ``host:port`` (``[v6addr]:port`` included, hence rpartition)."""
    host, sep, port = endpoint.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise LaunchError(f"rdzv_endpoint must look like host:port, got {endpoint!r}")


# ------------------------------------------------------------------------------------------------ command lines


class _ShellExpr(str):
    """A command-line token to be expanded by the shell, so it is written unquoted (e.g. ``"$SLURM_NODEID"``)."""


def _shell_join(tokens: Iterable[str]) -> str:
    """shlex.join, except that _ShellExpr tokens are left for the shell to expand."""
    return " ".join(token if isinstance(token, _ShellExpr) else shlex.quote(token) for token in tokens)


def _rendezvous_flags(spec: LaunchSpec) -> list[str]:
    """``--standalone`` for a local job without an endpoint, else c10d rendezvous at ``rdzv_endpoint``."""
    if spec.nnodes == 1 and spec.rdzv_endpoint is None:
        return ["--standalone", "--nnodes=1"]
    if spec.rdzv_endpoint is None:  # a Slurm script finds its first node by itself (sbatch_script)
        raise LaunchError(f"rdzv_endpoint (host:port) is required when nnodes={spec.nnodes} > 1")
    flags = [f"--nnodes={spec.nnodes}"]
    if spec.node_rank is not None:
        flags.append(f"--node-rank={spec.node_rank}")
    return [*flags, "--rdzv-backend=c10d", f"--rdzv-endpoint={spec.rdzv_endpoint}", f"--rdzv-id={spec.rdzv_id}"]


def _worker_flags(spec: LaunchSpec) -> list[str]:
    """Flags shared by every way of launching: worker count, restarts, logs, and the module to run."""
    flags = [f"--nproc-per-node={spec.nproc_per_node}", f"--max-restarts={spec.max_restarts}"]
    if spec.log_dir is not None:
        # --tee=3 writes each rank's stdout+stderr to its own file *and* to torchrun's console (which run()
        # streams); --redirects=3 would hide them from the console.
        flags += [f"--log-dir={spec.log_dir}", "--tee=3"]
    return [*flags, "-m", spec.module, *spec.args]


def torchrun_command(spec: LaunchSpec, python: str = sys.executable) -> list[str]:
    """The argv that launches ``spec`` on this node (``python -m torch.distributed.run`` is torchrun)."""
    return [python, "-m", "torch.distributed.run", *_rendezvous_flags(spec), *_worker_flags(spec)]


def watched_torchrun_command(spec: LaunchSpec, python: str = sys.executable) -> list[str]:
    """:func:`torchrun_command` run under ``executor.lifeline``: the agent stops (and stops its workers) when the
    process that started it dies, and names itself to its workers, which watch it in turn. What this machine's
    launches run; the lines printed for other nodes stay plain torchrun."""
    return [python, "-m", "executor.lifeline", *torchrun_command(spec, python)[2:]]


def per_node_commands(spec: LaunchSpec, python: str = sys.executable) -> list[str]:
    """One shell line per node (node_rank 0..nnodes-1), shell-quoted: what ``paraplan launch-script`` prints."""
    if spec.nnodes == 1:
        return [shlex.join(torchrun_command(spec, python))]
    return [shlex.join(torchrun_command(replace(spec, node_rank=rank), python)) for rank in range(spec.nnodes)]


# ----------------------------------------------------------------------------------------------------- Slurm


def _sbatch_directives(
    spec: LaunchSpec,
    job_name: str,
    time_limit: str,
    partition: str | None,
    extra_sbatch: Sequence[str],
    cpu_only: bool = False,
) -> list[str]:
    """The ``#SBATCH`` header: one task per node (torchrun starts the per-GPU workers itself), with a GPU per worker,
    or with ``cpu_only`` a CPU core per worker."""
    _require_word("job_name", job_name)
    _require_word("time_limit", time_limit)
    if partition is not None:
        _require_word("partition", partition)
    for option in extra_sbatch:
        if "\n" in option or "\r" in option:
            raise LaunchError(f"extra_sbatch entries must be single lines, got {option!r}")
    options = [
        f"--job-name={job_name}",
        f"--nodes={spec.nnodes}",
        "--ntasks-per-node=1",
        f"--cpus-per-task={spec.nproc_per_node}" if cpu_only else f"--gpus-per-node={spec.nproc_per_node}",
        f"--time={time_limit}",
    ]
    if partition:
        options.append(f"--partition={partition}")
    return [f"#SBATCH {option}" for option in (*options, *extra_sbatch)]


def _slurm_torchrun_line(spec: LaunchSpec, python: str) -> str:
    """The command each Slurm task runs, with node facts taken from Slurm's environment on that node. torchrun as
    `python -m torch.distributed.run` of the environment paraplan runs in: a bare `torchrun` would be whichever
    one the node's PATH finds first, outside that environment."""
    rendezvous = [
        _ShellExpr('--nnodes="$SLURM_NNODES"'),
        _ShellExpr('--node-rank="$SLURM_NODEID"'),
        "--rdzv-backend=c10d",
        _ShellExpr('--rdzv-endpoint="$head_node:$rdzv_port"'),
        _ShellExpr(f'--rdzv-id="{spec.rdzv_id}-$SLURM_JOB_ID"'),
    ]
    inner = _shell_join(["exec", python, "-m", "torch.distributed.run", *rendezvous, *_worker_flags(spec)])
    # SLURM_NODEID differs per node, so it must be expanded by each task's shell, not by the batch script
    # (which runs on the first node only): hence srun bash -c '<single-quoted command>'.
    return f"srun bash -c {shlex.quote(inner)}"


def _require_word(name: str, value: str) -> None:
    """Slurm reads ``#SBATCH --opt=value`` up to the first blank, and a newline would start a new script line."""
    if not value or any(ch.isspace() for ch in value):
        raise LaunchError(f"{name} must be non-empty without spaces, got {value!r}")


def sbatch_script(
    spec: LaunchSpec,
    job_name: str,
    time_limit: str = "01:00:00",
    partition: str | None = None,
    extra_sbatch: Sequence[str] = (),
    python: str = sys.executable,
    cpu_only: bool = False,
) -> str:
    """A Slurm batch script that runs ``spec`` on ``spec.nnodes`` nodes, rendezvousing on the first node, with
    ``python`` (this interpreter: the nodes share its file system and so its environment) running torchrun.
    ``cpu_only``: the workers train on CPUs (a core each) and ask for no GPU."""
    lines = [
        "#!/bin/bash",
        *_sbatch_directives(spec, job_name, time_limit, partition, extra_sbatch, cpu_only),
        "set -euo pipefail",
        "# The first node of the allocation hosts the c10d rendezvous store, on a port of this job's own.",
        'head_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)',
        f"rdzv_port=$(( {SLURM_RDZV_PORT} + SLURM_JOB_ID % {SLURM_RDZV_PORTS} ))",
        "export head_node rdzv_port",
        _slurm_torchrun_line(spec, python),
    ]
    return "\n".join(lines) + "\n"


def submit_sbatch(script_text: str, workdir: Path, script_name: str = "paraplan.sbatch") -> str:
    """Write the script into ``workdir`` and submit it with ``sbatch``; return Slurm's job id."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    script_path = workdir / script_name
    script_path.write_text(script_text)
    return run_sbatch(script_path)


def run_sbatch(script_path: Path, options: Sequence[str] = (), env: Mapping[str, str] | None = None) -> str:
    """Submit a written batch script with ``sbatch`` (``options`` before it, on its command line), from its folder
    (the job's working directory) and with ``env`` (which the job inherits); return Slurm's job id."""
    sbatch = shutil.which("sbatch")
    if sbatch is None:
        raise LaunchError("Slurm's sbatch is not on PATH; write the script with sbatch_script() and submit it by hand")
    done = subprocess.run([sbatch, *options, str(script_path)], cwd=script_path.parent, env=env, capture_output=True,
                          text=True, timeout=120)  # fmt: skip
    match = _SUBMITTED.search(done.stdout)
    if done.returncode != 0 or match is None:
        raise LaunchError(f"sbatch failed (exit {done.returncode}): {(done.stderr or done.stdout).strip()}")
    return match.group(1)


# ------------------------------------------------------------------------------------------------ run results


@dataclass(frozen=True)
class FailedRank:
    """One worker that failed: its global rank, exit code (negative = killed by that signal) and message."""

    rank: int
    exitcode: int
    message: str
    error_file: Path | None = None
    root_cause: bool = False


@dataclass(frozen=True)
class RunResult:
    """How a launch ended. ``run_log_dir`` is torchrun's per-run folder inside ``log_dir`` (None if none)."""

    returncode: int
    failed_ranks: list[FailedRank]
    log_dir: Path
    run_log_dir: Path | None = None
    timed_out: bool = False
    cancelled: bool = False

    @property
    def ok(self) -> bool:
        """True when torchrun and every worker exited cleanly."""
        return self.returncode == 0 and not self.failed_ranks

    @property
    def root_cause(self) -> FailedRank | None:
        """The first failure torchrun observed (the others are usually its consequences)."""
        return next((f for f in self.failed_ranks if f.root_cause), self.failed_ranks[0] if self.failed_ranks else None)

    def rank_log(self, local_rank: int, stream: str = "stdout") -> Path | None:
        """Path of a local rank's ``stdout.log``/``stderr.log`` in the last attempt, if torchrun wrote one."""
        attempt = _last_attempt_dir(self.run_log_dir)
        return None if attempt is None else attempt / str(local_rank) / f"{stream}.log"


def read_error_file(path: Path) -> tuple[str, int | None] | None:
    """(message, timestamp) from an elastic ``error.json``; None if it is missing or unreadable."""
    try:
        data = json.loads(Path(path).read_text())
        message = data["message"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if isinstance(message, str):  # the "new" format: a plain string with a top-level timestamp
        return message, _int_or_none(data.get("timestamp"))
    return str(message.get("message", "")), _int_or_none(message.get("extraInfo", {}).get("timestamp"))


def _int_or_none(value: object) -> int | None:
    """int(value), or None where torch wrote no usable number."""
    try:
        return int(value)  # type: ignore[call-overload]
    except (TypeError, ValueError):
        return None


@dataclass
class _ReportEntry:
    """One rank's block of a ChildFailedError report, filled in as its lines arrive."""

    rank: int
    root_cause: bool = False
    exitcode: int = 1
    error_file: Path | None = None
    first_traceback_line: str = ""

    def to_failed_rank(self) -> FailedRank:
        """The block as a FailedRank; the rank's error file, when it wrote one, has the real message."""
        recorded = read_error_file(self.error_file) if self.error_file else None
        message = recorded[0] if recorded else self.first_traceback_line
        return FailedRank(self.rank, self.exitcode, message, self.error_file, self.root_cause)


class FailureSummaryParser:
    """Reads torchrun's ``ChildFailedError`` report line by line (so output need not be kept in memory).

    The report has one block per failed rank (``rank : R (local_rank: L)``, ``exitcode : C (pid: P)``,
    ``error_file: F``, ``traceback : T``); the block after ``Root Cause`` is the first failure. Worker output is
    prefixed ``[<role><rank>]:`` by ``--tee``, so it cannot match these anchored patterns.
    """

    _RANK = re.compile(r"^\s+rank\s+:\s+(\d+)\s+\(local_rank:\s+(\d+)\)")
    _EXITCODE = re.compile(r"^\s+exitcode\s+:\s+(-?\d+)")
    _ERROR_FILE = re.compile(r"^\s+error_file:\s+(\S+)")
    _TRACEBACK = re.compile(r"^\s+traceback\s+:\s+(.*)")
    _NO_FILE = "<N/A>"  # what torch prints when a rank wrote no error file (e.g. it was killed by a signal)

    def __init__(self) -> None:
        self._entries: dict[int, _ReportEntry] = {}
        self._current: _ReportEntry | None = None
        self._in_root_section = False

    def feed(self, line: str) -> None:
        """Consume one line of torchrun's output."""
        if line.startswith("Root Cause"):
            self._in_root_section = True
        elif match := self._RANK.match(line):
            rank = int(match.group(1))
            self._current = self._entries.setdefault(rank, _ReportEntry(rank))
            self._current.root_cause |= self._in_root_section
        elif self._current is not None:
            self._feed_field(line, self._current)

    def _feed_field(self, line: str, entry: _ReportEntry) -> None:
        """Fill in the current rank's block from one of its field lines."""
        if match := self._EXITCODE.match(line):
            entry.exitcode = int(match.group(1))
        elif (match := self._ERROR_FILE.match(line)) and match.group(1) != self._NO_FILE:
            entry.error_file = Path(match.group(1))
        elif (match := self._TRACEBACK.match(line)) and not entry.first_traceback_line:
            entry.first_traceback_line = match.group(1).strip()

    def failures(self) -> list[FailedRank]:
        """Failed ranks, root cause first, then by rank."""
        found = [entry.to_failed_rank() for entry in self._entries.values()]
        return sorted(found, key=lambda failure: (not failure.root_cause, failure.rank))


def _last_attempt_dir(run_log_dir: Path | None) -> Path | None:
    """``attempt_<n>`` with the highest n (later attempts follow restarts)."""
    if run_log_dir is None:
        return None
    attempts = [p for p in run_log_dir.glob("attempt_*") if p.name.removeprefix("attempt_").isdigit()]
    return max(attempts, key=lambda p: int(p.name.removeprefix("attempt_")), default=None)


def failures_from_error_files(run_log_dir: Path | None, first_global_rank: int = 0) -> list[FailedRank]:
    """Failed ranks from the last attempt's ``error.json`` files alone (when torchrun printed no report).

    Only ranks that recorded an exception appear; their exit code is not in the file, so it is taken as 1 (what
    ``record`` exits with). Global rank = ``first_global_rank`` + local rank, as with static node ranks.
    """
    attempt = _last_attempt_dir(run_log_dir)
    if attempt is None:
        return []
    found: list[tuple[int, FailedRank]] = []
    for error_file in attempt.glob("*/error.json"):
        recorded = read_error_file(error_file)
        if recorded is not None and error_file.parent.name.isdigit():
            rank = first_global_rank + int(error_file.parent.name)
            found.append((recorded[1] or 0, FailedRank(rank, 1, recorded[0], error_file)))
    found.sort(key=lambda item: (item[0], item[1].rank))
    return [replace(failure, root_cause=index == 0) for index, (_, failure) in enumerate(found)]


# --------------------------------------------------------------------------------------------------- processes


def _child_pids() -> dict[int, list[int]]:
    """Parent pid -> child pids, from /proc (Linux). Empty where there is no /proc."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            # The command name (field 2) may contain spaces and parentheses; ppid follows the last ')'.
            ppid = int(stat.read_text().rpartition(")")[2].split()[1])
        except (OSError, ValueError, IndexError):
            continue  # the process exited while we looked
        children.setdefault(ppid, []).append(int(stat.parent.name))
    return children


def descendant_pids(pid: int) -> list[int]:
    """Every live descendant of ``pid`` (children first)."""
    children = _child_pids()
    found: list[int] = []
    frontier = [pid]
    while frontier:
        kids = [kid for parent in frontier for kid in children.get(parent, [])]
        found += kids
        frontier = kids
    return found


def pid_alive(pid: int) -> bool:
    """True if ``pid`` runs: a zombie has exited (it only waits to be reaped), but a process is a zombie only once
    all of its threads are. Its main thread is shown as a zombie as soon as it has exited, while the others may
    still be ending (freeing a rank's memory, closing its files: the run folder's lock is released only then)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    tasks = list(Path(f"/proc/{pid}/task").glob("[0-9]*/stat"))
    if not tasks:
        return True  # no /proc: os.kill said it exists
    return any(_task_state(task) not in ("Z", "X") for task in tasks)


def _task_state(stat: Path) -> str:
    """A thread's state letter from its /proc stat (one that has exited meanwhile reads as dead)."""
    try:
        return stat.read_text().rpartition(")")[2].split()[0]
    except (OSError, IndexError):
        return "X"


def _signal_groups(pids: Iterable[int], sig: signal.Signals) -> None:
    """Send ``sig`` to the process group of each pid (torchrun puts every worker in its own session)."""
    own_group = os.getpgrp()
    for pid in pids:
        try:
            group = os.getpgid(pid)
            if group != own_group:  # never the caller's own group (a stray that stayed in it is left alone)
                os.killpg(group, sig)
        except (ProcessLookupError, PermissionError):
            continue


def stop(process: subprocess.Popen[Any], grace_s: float = 10.0) -> int:
    """Stop a launch and everything it started; return torchrun's exit status.

    SIGTERM goes to torchrun's process group; torchrun forwards it to its workers and waits for them. Whatever
    is still running when ``grace_s`` is up — torchrun, a worker that ignored the signal, or a process orphaned
    when its parent exited — is killed: SIGKILL to its process group. The processes are listed before the
    first signal, because a killed or exited parent can no longer lead to its children.
    """
    if process.poll() is not None:
        return process.returncode
    deadline = time.monotonic() + grace_s
    started = descendant_pids(process.pid)
    _signal_groups([process.pid], signal.SIGTERM)
    try:
        returncode: int | None = process.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        returncode = None
    doomed = [*started, *descendant_pids(process.pid), process.pid]
    _wait_until_gone(doomed, limit_s=max(0.0, deadline - time.monotonic()))
    survivors = [pid for pid in doomed if pid_alive(pid)]
    if survivors:
        _signal_groups(survivors, signal.SIGKILL)
        _wait_until_gone(survivors, limit_s=grace_s)
    return process.wait() if returncode is None else returncode


def _start_time(pid: int) -> str | None:
    """When ``pid`` started (field 22 of /proc/PID/stat, in clock ticks since boot): with the pid, an identity
    that a later process reusing the pid does not share. None once it has exited."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[19]
    except (OSError, IndexError):
        return None


class ProcessTree:
    """The processes below ``root``, as seen while it ran: a process whose parent was killed cannot be found from
    its parent any more, so the tree is listed now and then and remembered, each process by pid and start time."""

    def __init__(self, root: int):
        self.root = root
        self._seen: dict[int, str] = {}

    def look(self) -> None:
        """Add the processes below ``root`` now."""
        for pid in descendant_pids(self.root):
            started = _start_time(pid)
            if started is not None:
                self._seen.setdefault(pid, started)

    def alive(self) -> list[int]:
        """The processes seen that still run (the same processes: a reused pid has another start time)."""
        return [pid for pid, started in self._seen.items() if _start_time(pid) == started and pid_alive(pid)]


def end_leftovers(tree: ProcessTree, grace_s: float) -> None:
    """Wait (up to ``grace_s``) for what a launch left when its root process ended — workers stopping because
    their agent was killed (``executor.lifeline``) — then SIGKILL what remains, and wait for it to be gone."""
    tree.look()
    _wait_until_gone(tree.alive(), grace_s)
    survivors = tree.alive()
    if survivors:
        _signal_groups(survivors, signal.SIGKILL)
        _wait_until_gone(survivors, grace_s)


def _wait_until_gone(pids: Sequence[int], limit_s: float) -> None:
    """Wait (bounded) for killed processes to finish exiting: SIGKILL is delivered, not completed, at once."""
    deadline = time.monotonic() + limit_s
    while any(pid_alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.05)


def visible_gpu_count() -> int:
    """NVIDIA GPUs a local launch can use, without importing torch: the devices the driver lists (in /proc, or
    as /dev/nvidiaN), limited by CUDA_VISIBLE_DEVICES when it is set."""
    listed = max(
        len(list(Path("/proc/driver/nvidia/gpus").glob("*"))),
        len([p for p in Path("/dev").glob("nvidia[0-9]*") if p.name.removeprefix("nvidia").isdigit()]),
    )
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is None:
        return listed
    return min(listed, len([device for device in visible.split(",") if device.strip()]))


TORCH_CACHE_ENV = "TORCHINDUCTOR_CACHE_DIR"
"""Where torch's compiler keeps its cache. Unset, it is ``<system temp>/torchinductor_<user>``, which torch creates
whenever a process imports torch._dynamo (torchrun's logging does, to format a message): a launch would leave
a folder in the system's temporary folder."""
TORCH_CACHE_FOLDER = "torchinductor"
"""The cache's folder inside a launch's log folder (never one of torchrun's per-run folders)."""


def torch_cache_env(folder: Path | None) -> dict[str, str]:
    """``TORCHINDUCTOR_CACHE_DIR`` in ``folder`` (a launch's log folder, a job's folder), unless this process's
    environment already names one, or there is no folder."""
    if folder is None or TORCH_CACHE_ENV in os.environ:
        return {}
    return {TORCH_CACHE_ENV: str(Path(folder) / TORCH_CACHE_FOLDER)}


def launch_env(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """os.environ plus ``env``, with the repo root on PYTHONPATH so ``-m executor.train`` resolves from any cwd."""
    merged = {**os.environ, **(env or {})}
    merged["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), merged.get("PYTHONPATH", "")) if p)
    merged.setdefault("PYTHONUNBUFFERED", "1")  # so lines reach on_line as they are printed
    return merged


def start(
    spec: LaunchSpec, env: Mapping[str, str] | None = None, cwd: Path | None = None, pass_fds: Sequence[int] = ()
) -> subprocess.Popen[str]:
    """Start torchrun for ``spec`` in its own session, stdout and stderr merged into one text pipe; it and its
    workers die with this process (``executor.lifeline``). ``pass_fds`` stay open in torchrun (a run folder's lock,
    so that it is held until torchrun has stopped its workers).

    The caller must keep reading ``process.stdout`` (as :func:`run` does) and end it with :func:`stop`.
    """
    return subprocess.Popen(
        watched_torchrun_command(spec),
        cwd=cwd or REPO_ROOT,
        env=lifeline.child_env(launch_env({**torch_cache_env(spec.log_dir), **(env or {})})),
        pass_fds=tuple(pass_fds),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        errors="replace",
        bufsize=1,
        start_new_session=True,  # one group to signal, and the caller's Ctrl-C does not reach it twice
    )


def _pump(stream: IO[str], log_path: Path, on_line: Callable[[str], None] | None, parser: FailureSummaryParser) -> None:
    """Copy each output line to the launcher log, the summary parser and ``on_line`` (called on this thread)."""
    with log_path.open("a", encoding="utf-8") as log:
        for raw in stream:
            line = raw.rstrip("\n")
            log.write(raw)
            log.flush()
            parser.feed(line)
            if on_line is not None and not _call_safely(on_line, line, log):
                on_line = None


def _call_safely(on_line: Callable[[str], None], line: str, log: IO[str]) -> bool:
    """Call ``on_line``; on error log it and return False.

    A failing callback must not stop the pipe from being drained: torchrun would block on a full pipe and hang.
    """
    try:
        on_line(line)
    except Exception:
        log.write(f"paraplan: on_line callback failed and is no longer called:\n{traceback.format_exc()}")
        return False
    return True


_LOOK_EVERY_S = 1.0
"""How often a running launch's process tree is listed (a scan of /proc: a few milliseconds)."""


def _wait(
    process: subprocess.Popen[str],
    timeout_s: float | None,
    cancel: threading.Event | None,
    grace_s: float,
    tree: ProcessTree,
) -> tuple[bool, bool]:
    """Wait for the launch to end, stopping it on timeout or cancel; return (timed_out, cancelled). ``tree``
    learns torchrun's workers meanwhile."""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    next_look = time.monotonic()
    while True:
        if time.monotonic() >= next_look:
            tree.look()
            next_look = time.monotonic() + _LOOK_EVERY_S
        try:
            process.wait(timeout=0.2)
            return False, False
        except subprocess.TimeoutExpired:
            pass
        if deadline is not None and time.monotonic() >= deadline:
            stop(process, grace_s)
            return True, False
        if cancel is not None and cancel.is_set():
            stop(process, grace_s)
            return False, True


def _new_run_dir(log_dir: Path, before: set[Path]) -> Path | None:
    """The per-run folder torchrun created in ``log_dir`` during this launch (newest, if several); torch's compiler
    cache, which the launch also puts there, is not one."""
    created = [p for p in log_dir.iterdir() if p.is_dir() and p not in before and p.name != TORCH_CACHE_FOLDER]
    return max(created, key=lambda p: p.stat().st_mtime, default=None)


def _collect_result(
    spec: LaunchSpec, parser: FailureSummaryParser, before: set[Path], returncode: int, timed_out: bool, cancelled: bool
) -> RunResult:
    """The RunResult of a finished launch: torchrun's failure report first, its error files as the fallback."""
    assert spec.log_dir is not None
    run_log_dir = _new_run_dir(spec.log_dir, before)
    failures = parser.failures()
    if not failures and returncode != 0:
        first_rank = (spec.node_rank or 0) * spec.nproc_per_node
        failures = failures_from_error_files(run_log_dir, first_rank)
    return RunResult(returncode, blame_past_stopped_ranks(failures), spec.log_dir, run_log_dir, timed_out, cancelled)


def blame_past_stopped_ranks(failures: list[FailedRank]) -> list[FailedRank]:
    """Failures with the root cause moved off a rank that torchrun itself stopped, when another rank died otherwise.

    torchrun names as root cause the failure with the earliest timestamp: an error file's, or for a rank that wrote
    none, the time torchrun noticed it. When a rank is killed outright (SIGKILL, the OOM killer) or crashes, its
    peer can record the broken collective in its error file before torchrun's next poll notices the dead rank;
    the peer is then named, though torchrun goes on to stop it with SIGTERM like every survivor. A rank that
    ended by SIGTERM is therefore not the root cause while another ended by a different signal."""
    named = next((failure for failure in failures if failure.root_cause), None)
    if named is None or named.exitcode != -signal.SIGTERM:
        return failures
    killed = next((f for f in failures if f.exitcode < 0 and f.exitcode != -signal.SIGTERM), None)
    if killed is None:
        return failures
    blamed = [replace(failure, root_cause=failure.rank == killed.rank) for failure in failures]
    return sorted(blamed, key=lambda failure: (not failure.root_cause, failure.rank))


def result_from_output(spec: LaunchSpec, output: Iterable[str], returncode: int, cancelled: bool = False) -> RunResult:
    """The RunResult of a launch whose console output went to a file instead of through :func:`run` (the REST
    service's detached job supervisors): torchrun's failure report in ``output``, its error files as the
    fallback."""
    if spec.log_dir is None:
        raise LaunchError("result_from_output needs the spec's log_dir, where torchrun left its error files")
    parser = FailureSummaryParser()
    for line in output:
        parser.feed(line.rstrip("\n"))
    return _collect_result(spec, parser, set(), returncode, False, cancelled)


def run(
    spec: LaunchSpec,
    env: Mapping[str, str] | None = None,
    timeout_s: float | None = None,
    on_line: Callable[[str], None] | None = None,
    cwd: Path | None = None,
    cancel: threading.Event | None = None,
    grace_s: float = 10.0,
    pass_fds: Sequence[int] = (),
) -> RunResult:
    """Run ``spec`` to completion under torchrun and report which ranks failed, and why.

    Output lines go to ``on_line`` (from a reader thread) and to ``<log_dir>/launcher.log``; ``spec.log_dir`` is
    required, because per-rank error files are what name a failure (and a launch writes nowhere else).
    ``timeout_s`` or setting ``cancel`` stops the launch with :func:`stop` (SIGTERM, then SIGKILL after
    ``grace_s``). It returns once every process of the launch is gone: workers that outlive a killed torchrun
    stop by their lifeline, and are killed if they have not within ``grace_s``. ``pass_fds`` as :func:`start`.
    """
    if spec.log_dir is None:
        raise LaunchError("run needs the spec's log_dir: where torchrun writes each rank's logs and error file")
    spec.log_dir.mkdir(parents=True, exist_ok=True)
    before = set(spec.log_dir.iterdir())
    parser = FailureSummaryParser()
    process = start(spec, env=env, cwd=cwd, pass_fds=pass_fds)
    assert process.stdout is not None
    reader = threading.Thread(
        target=_pump, args=(process.stdout, spec.log_dir / LAUNCHER_LOG, on_line, parser), daemon=True
    )
    reader.start()
    tree = ProcessTree(process.pid)
    try:
        timed_out, cancelled = _wait(process, timeout_s, cancel, grace_s, tree)
    finally:  # whatever ends the wait, nothing of the launch outlives it
        stop(process, grace_s)
        end_leftovers(tree, grace_s)
    # The pipe closes when torchrun exits (workers write to their own files under --tee), so this is quick;
    # the bound only guards against a stray process that inherited the pipe.
    reader.join(timeout=10.0)
    return _collect_result(spec, parser, before, process.returncode, timed_out, cancelled)
