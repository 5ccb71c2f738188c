"""Nothing of a run outlives it, and nothing is written outside its folders (issue 31, items 3 and 4).

Real processes throughout: `paraplan train` (the CLI, as a user starts it) on 2 CPU ranks with gloo, killed the
hard way — SIGKILL to torchrun's agent, SIGKILL to the launcher's process group, SIGHUP as when its terminal
closes — and the REST service (uvicorn) running profiling jobs. Every check is by pid: each process of the run is
listed while it runs (with its start time, so a reused pid is not mistaken for it) and must be gone within
`GONE_S` of the blow.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("torch")

from executor import launch, run_lock  # noqa: E402
from executor.config import RunDir  # noqa: E402
from tests.train_requests import tiny_train_request  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
GONE_S = 10.0
"""How long the processes of a run may take to go after the blow: a step, a checkpoint of a tiny model and
torchrun's own stop (about 3 s on a loaded 2-core machine), with room for the machine's noise."""
START_LIMIT_S = 120.0
"""Until the run has done its first steps (two ranks importing torch on 2 shared cores)."""


# ================================================================================================ helpers


class Tree:
    """The processes of a run, listed while it runs: pid -> start time (field 22 of /proc/PID/stat)."""

    def __init__(self, root: int):
        self.processes = {pid: _start_time(pid) for pid in (root, *launch.descendant_pids(root))}

    def pid_of(self, marker: str) -> int:
        """The pid of the one process whose command line holds `marker`."""
        found = [pid for pid in self.processes if marker.encode() in _cmdline(pid)]
        assert len(found) == 1, {pid: _cmdline(pid) for pid in self.processes}
        return found[0]

    def alive(self) -> dict[int, bytes]:
        """The processes listed that still run (the same processes: not a later one with a reused pid)."""
        return {
            pid: _cmdline(pid)
            for pid, started in self.processes.items()
            if _start_time(pid) == started and launch.pid_alive(pid)
        }

    def assert_gone_within(self, limit_s: float = GONE_S) -> float:
        """Wait until none runs; fail naming those left after `limit_s`. The seconds it took."""
        started = time.monotonic()
        while self.alive() and time.monotonic() - started < limit_s:
            time.sleep(0.05)
        assert self.alive() == {}, f"left running {limit_s} s after the blow: {self.alive()}"
        return time.monotonic() - started


def _start_time(pid: int) -> str | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[19]
    except (OSError, IndexError):
        return None


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
    except OSError:
        return b""


def cli_train(tmp_path: Path, out: Path, *flags: str, steps: int = 100_000) -> list[str]:
    request = tmp_path / "request.json"
    request.write_text(json.dumps(tiny_train_request({"dp": 2, "zero_stage": 1})))
    return [sys.executable, "-m", "api.cli", "train", str(request), "--steps", str(steps), "--out", str(out), *flags]


@pytest.fixture
def start_training(tmp_path: Path) -> Iterator[Callable[[Path], subprocess.Popen[str]]]:
    """`start_training(out)`: `paraplan train` into `out`, in a process group of its own (as a shell's job),
    returned once rank 0 has written two steps. Whatever a test leaves running is killed afterwards."""
    started: list[subprocess.Popen[str]] = []
    trees: list[Tree] = []

    def start(out: Path) -> subprocess.Popen[str]:
        log = (tmp_path / f"launcher-{len(started)}.log").open("w")
        process = subprocess.Popen(cli_train(tmp_path, out), cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, text=True, start_new_session=True)  # fmt: skip
        started.append(process)
        _wait_for_steps(RunDir(out), 2, process)
        trees.append(Tree(process.pid))
        return process

    yield start
    for process in started:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    for tree in trees:
        for pid in tree.alive():
            os.kill(pid, signal.SIGKILL)


def _wait_for_steps(run_dir: RunDir, steps: int, process: subprocess.Popen[str]) -> None:
    deadline = time.monotonic() + START_LIMIT_S
    while not (run_dir.metrics_file.is_file() and len(run_dir.read_metrics()) >= steps):
        assert process.poll() is None, f"the launcher exited with {process.returncode} before step {steps}"
        assert time.monotonic() < deadline, f"no step {steps} after {START_LIMIT_S} s"
        time.sleep(0.1)


def launcher_output(tmp_path: Path, index: int = 0) -> str:
    return (tmp_path / f"launcher-{index}.log").read_text(errors="replace")


# ========================================================================================= paraplan train


def test_killing_the_agent_ends_its_workers_and_the_launcher_reports_it(tmp_path, start_training):
    """kill -9 of torchrun's agent: its workers stop (their lifeline: a step, a checkpoint) instead of training on,
    and `paraplan train` reports a failed run once they are gone."""
    out = tmp_path / "run"
    launcher = start_training(out)
    tree = Tree(launcher.pid)
    agent = tree.pid_of("torch.distributed.run")
    assert len(launch.descendant_pids(agent)) == 2  # its two ranks

    os.kill(agent, signal.SIGKILL)
    tree.assert_gone_within()
    assert launcher.wait(timeout=5) == 3, launcher_output(tmp_path)  # a run that failed
    assert "training failed: torchrun exited with -9" in launcher_output(tmp_path)


def test_killing_the_launchers_group_ends_the_run_and_frees_its_folder(tmp_path, start_training):
    """kill -9 of the process group of `paraplan train` (torchrun runs in a session of its own, so the kill does
    not reach it): the agent notices its launcher is gone and stops its workers; the run folder is free after."""
    out = tmp_path / "run"
    launcher = start_training(out)
    tree = Tree(launcher.pid)

    os.killpg(launcher.pid, signal.SIGKILL)
    tree.assert_gone_within()
    with run_lock.hold(out):  # flock is released with the last process that held it
        pass
    latest = RunDir(out).latest_checkpoint()
    assert latest is not None and latest[0] == RunDir(out).read_metrics()[-1]["step"]  # stopped after a step


def test_a_hang_up_stops_the_run_after_a_step_with_a_checkpoint(tmp_path, start_training):
    """SIGHUP to `paraplan train` (its terminal closed) is a stop like Ctrl-C: the ranks finish the step in flight,
    save a checkpoint and exit; the launcher exits 130 and nothing is left."""
    out = tmp_path / "run"
    launcher = start_training(out)
    tree = Tree(launcher.pid)

    launcher.send_signal(signal.SIGHUP)
    tree.assert_gone_within()
    assert launcher.wait(timeout=5) == 130, launcher_output(tmp_path)
    run_dir = RunDir(out)
    last_step = run_dir.read_metrics()[-1]["step"]
    assert run_dir.latest_checkpoint() == (last_step, run_dir.checkpoint_dir(last_step))
    assert f"checkpoint at step {last_step}" in launcher_output(tmp_path)


def test_a_second_run_into_a_held_folder_is_refused_naming_the_holder(tmp_path, start_training):
    """While a run holds its folder, `paraplan train` and `--resume` into it exit 2 naming the holder's pid and
    touch nothing; once the holder is gone (kill -9 of the whole run here), the folder takes a run again."""
    out = tmp_path / "run"
    holder = start_training(out)
    run_file = RunDir(out).run_file.read_bytes()
    for flags in ((), ("--resume",)):
        second = subprocess.run(cli_train(tmp_path, out, *flags, steps=3), cwd=REPO, capture_output=True, text=True,
                                timeout=60)  # fmt: skip
        assert second.returncode == 2, second.stdout + second.stderr
        assert f"run folder {out} is in use by pid {holder.pid}" in second.stderr, second.stderr
        assert "Traceback" not in second.stderr
    assert RunDir(out).run_file.read_bytes() == run_file

    tree = Tree(holder.pid)
    for pid in tree.processes:
        os.kill(pid, signal.SIGKILL)
    tree.assert_gone_within()
    with run_lock.hold(out) as descriptor:
        assert os.pread(descriptor, 32, 0) == f"{os.getpid()}\n".encode()


def test_the_lock_names_its_holder_and_is_freed_by_its_death(tmp_path):
    """The lock alone, between two processes: held, it refuses naming the holder; after kill -9, it is free."""
    folder = tmp_path / "run"
    code = ("import sys, time; from pathlib import Path; from executor import run_lock\n"
            f"with run_lock.hold(Path({str(folder)!r})):\n    print('held', flush=True); time.sleep(600)")  # fmt: skip
    holder = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "held\n"
        with (
            pytest.raises(run_lock.RunFolderInUse, match=f"in use by pid {holder.pid}") as refused,
            run_lock.hold(folder),
        ):
            pass
        assert refused.value.holder == holder.pid
    finally:
        holder.kill()
        holder.wait(timeout=10)
    assert (folder / run_lock.LOCK_FILE).read_text() == f"{holder.pid}\n"  # a holder killed outright leaves it
    with run_lock.hold(folder):
        assert (folder / run_lock.LOCK_FILE).read_text() == f"{os.getpid()}\n"
    assert not (folder / run_lock.LOCK_FILE).exists()  # released in order: removed


# =========================================================================================== the service


@pytest.fixture
def service(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """`paraplan serve` over a fresh data folder, with the system's temporary folder (TMPDIR) pointed at an
    empty folder of this test, inherited by every process the server starts."""
    from tests.api.test_server import Server, kill_processes_in

    system_tmp = tmp_path / "system-tmp"
    system_tmp.mkdir()
    monkeypatch.setenv("TMPDIR", str(system_tmp))
    server = Server(tmp_path / "data", tmp_path / "server.log")
    server.wait_ready()
    yield server
    server.stop()
    kill_processes_in(tmp_path / "data")


TINY_PROFILE_MODEL = {"num_layers": 2, "hidden_size": 64, "num_attention_heads": 2, "num_kv_heads": 2,
                      "ffn_hidden_size": 128, "vocab_size": 256}  # fmt: skip


def post_profile(server: Any, body: dict[str, Any]) -> str:
    from tests.api.test_server import AUTH

    response = server.http.post("/v1/profiles", json=body, headers=AUTH)
    assert response.status_code == 202, response.text
    return response.json()["id"]


def profile_job(server: Any, job_id: str) -> dict[str, Any]:
    response = server.http.get(f"/v1/profiles/{job_id}")
    assert response.status_code == 200, response.text
    return response.json()


def wait_for_end(server: Any, job_id: str, timeout_s: float) -> dict[str, Any]:
    from tests.api.test_server import FINAL, wait_for

    return wait_for(lambda: (job := profile_job(server, job_id))["state"] in FINAL and job or None, timeout_s,
                    f"profiling job {job_id}", lambda: server.logs(job_id))  # fmt: skip


def test_a_profiling_job_on_ranks_writes_nothing_outside_the_data_folder(tmp_path, service):
    """A profile of layers on 2 tp ranks, on 2 loaded ranks, and of the collectives: three torchrun launches,
    whose inputs, results and logs stay in the job's folder and go when each launch succeeds."""
    body = {"what": "all", "model": TINY_PROFILE_MODEL, "seq_len": [32], "mbs": [1], "tp": [1, 2],
            "recompute": ["none"], "warmup": 1, "repeats": 2, "threads": 1, "nproc": 2, "max_bytes": 2**24}  # fmt: skip
    job_id = post_profile(service, body)
    job = wait_for_end(service, job_id, timeout_s=300)
    assert job["state"] == "SUCCEEDED", service.logs(job_id)
    assert sorted(os.listdir(tmp_path / "system-tmp")) == []
    job_dir = tmp_path / "data" / "jobs" / job_id
    assert [path.name for path in job_dir.glob("*-launch-*")] == []  # every launch's folder removed


def test_killing_a_profiling_jobs_agent_fails_the_job_only_once_its_workers_are_gone(tmp_path, service):
    """kill -9 of a collective sweep's torchrun agent: the job is FAILED, and by then none of its processes runs;
    nothing was written to the system's temporary folder."""
    from tests.api.test_server import processes_in, wait_for

    body = {"what": "comm", "nproc": 2, "warmup": 1, "repeats": 10_000, "max_bytes": 2**24}
    job_id = post_profile(service, body)
    job_dir = tmp_path / "data" / "jobs" / job_id

    def agent_with_two_workers() -> int | None:
        agents = [pid for pid, argv in processes_in(job_dir).items() if "torch.distributed.run" in argv]
        return agents[0] if agents and len(launch.descendant_pids(agents[0])) == 2 else None

    agent = wait_for(agent_with_two_workers, START_LIMIT_S, "the sweep's workers", lambda: str(processes_in(job_dir)))
    os.kill(agent, signal.SIGKILL)

    job = wait_for_end(service, job_id, timeout_s=60)
    left = processes_in(job_dir)
    assert job["state"] == "FAILED", job
    assert left == {}, f"the job was {job['state']} while these still ran: {left}"
    assert sorted(os.listdir(tmp_path / "system-tmp")) == []
