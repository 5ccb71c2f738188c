"""Slurm as the service's job backend, for real: `paraplan serve` (uvicorn, as tests/api/test_server.py runs it)
submitting training jobs to the single-node Slurm that `.ci/slurm-up` starts (munge, slurmctld, slurmd on this
host), driven over HTTP.

- a 2-process CPU training job with `launcher: slurm`, followed to SUCCEEDED (its loss recorded as a local job's,
  its output streamed as server-sent events), Slurm's own record saying COMPLETED;
- another cancelled (scancel): CANCELLED here and in Slurm, nothing of it left running;
- the server restarted while a Slurm job runs: the next server re-attaches to it by its Slurm job id and records
  how it ended.

Without Slurm (no `sinfo` on PATH) these tests skip, except under CI (CI set), where `.ci/test` runs
`.ci/slurm-up` first, so a missing Slurm is a failure.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from api.jobs import slurm
from api.store import utc_now
from tests.api.test_server import AUTH, Server, kill_processes_in, processes_in, sse_events, tiny_job, wait_for

pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True)
def slurm_running() -> None:
    if shutil.which("sinfo") is None:
        if os.environ.get("CI"):
            pytest.fail("CI must run the Slurm tests, but sinfo is not on PATH: .ci/slurm-up installs and starts Slurm")
        pytest.skip("no Slurm here (sinfo is not on PATH); run .ci/slurm-up as root to install and start one")
    ping = subprocess.run(["scontrol", "ping"], capture_output=True, text=True, timeout=30)
    assert "is UP" in ping.stdout, f"Slurm is installed but its controller does not answer (.ci/slurm-up):\n{ping}"


@pytest.fixture
def servers(tmp_path: Path) -> Iterator[Callable[[], Server]]:
    """`servers()` starts a server over this test's data folder and waits until it is ready. Afterwards every
    server still running is stopped, every Slurm job of the folder cancelled, and every process of it killed."""
    data_dir = tmp_path / "data"
    started: list[Server] = []

    def start() -> Server:
        server = Server(data_dir, tmp_path / f"server-{len(started)}.log")
        started.append(server)
        server.wait_ready()
        return server

    yield start
    for server in started:
        server.stop()
    for slurm_job_id in slurm_jobs_of(data_dir):
        subprocess.run(["scancel", slurm_job_id], capture_output=True, timeout=30)
        wait_for(lambda job=slurm_job_id: slurm_state(job) not in ("PENDING", "RUNNING", "COMPLETING") or None,
                 60, f"Slurm job {slurm_job_id} to end")  # fmt: skip
    kill_processes_in(data_dir)


def slurm_jobs_of(data_dir: Path) -> list[str]:
    """The Slurm job ids of the jobs under `data_dir` that Slurm still lists (named paraplan-<job id>)."""
    listed = subprocess.run(["squeue", "--noheader", "--format=%i %j"], capture_output=True, text=True, timeout=30)
    ours = {f"paraplan-{folder.name}" for folder in (data_dir / "jobs").glob("*")}
    return [line.split()[0] for line in listed.stdout.splitlines() if line.split()[1] in ours]


def slurm_state(slurm_job_id: str) -> str:
    """The job's state as Slurm's controller reports it (JobState=...)."""
    shown = subprocess.run(["scontrol", "show", "job", "--oneliner", slurm_job_id], capture_output=True, text=True,
                           timeout=30)  # fmt: skip
    assert shown.returncode == 0, shown.stderr
    return next(word for word in shown.stdout.split() if word.startswith("JobState=")).partition("=")[2]


def slurm_job(steps: int) -> dict[str, Any]:
    """The tiny 2-process CPU training job (tests/api/test_server.py) as a Slurm job."""
    return tiny_job(steps) | {"launcher": "slurm"}


# ================================================================================================= tests


def test_a_slurm_job_is_trained_and_followed_to_its_end(servers: Callable[[], Server], tmp_path: Path) -> None:
    server = servers()
    uneven = server.http.post("/v1/jobs", json=slurm_job(6) | {"nodes": 3}, headers=AUTH)  # 2 processes, 3 nodes
    assert uneven.status_code == 422, uneven.text
    assert [entry["field"] for entry in uneven.json()["error"]["fields"]] == ["nodes"], uneven.text
    assert "do not split evenly over 3 nodes" in uneven.text and list((tmp_path / "data" / "jobs").glob("*")) == []

    job = server.submit(slurm_job(6))
    job_id = job["id"]
    assert job["launcher"] == "slurm" and job["nodes"] == 1 and job["nproc"] == 2, job
    script = (tmp_path / "data" / "jobs" / job_id / "job.sbatch").read_text()
    # srun starts torchrun with this server's own Python (its environment), a CPU core per rank, no GPU asked
    assert f"exec {sys.executable} -m torch.distributed.run" in script and "srun bash -c" in script, script
    assert "#SBATCH --cpus-per-task=2" in script and "--gpus" not in script, script

    with ThreadPoolExecutor(1) as pool:
        url = f"{server.url}/v1/jobs/{job_id}/logs"
        followed = pool.submit(lambda: httpx.get(url, params={"follow": "true"}, timeout=180).text)
        job = server.wait_for_job(job_id, lambda job: job["state"] == "SUCCEEDED", timeout_s=180)
        events = sse_events(followed.result(timeout=60))

    assert job["slurm_job_id"] and slurm_state(job["slurm_job_id"]) == job["slurm_state"] == "COMPLETED", job
    assert job["returncode"] == 0 and job["failure_reason"] is None and job["steps_done"] == 6, job
    measured = job["measured_run"]
    assert measured is not None and measured["steps"] == 6 and measured["measured_step_time_s"] > 0, job
    metrics = server.http.get(f"/v1/jobs/{job_id}/metrics").json()
    assert [record["step"] for record in metrics["steps"]] == list(range(1, 7)), metrics
    assert all(math.isfinite(record["loss"]) and record["loss"] > 0 for record in metrics["steps"]), metrics

    *lines, end = events
    assert end.get("event") == "end" and json.loads(end["data"]) == {"state": "SUCCEEDED"}, end
    assert sum("paraplan.step" in line["data"] for line in lines) == 6, lines
    assert server.http.get(f"/v1/jobs/{job_id}/logs").text.count("paraplan.step") == 6


def test_a_cancelled_slurm_job_is_scancelled(servers: Callable[[], Server], tmp_path: Path) -> None:
    server = servers()
    job_id = server.submit(slurm_job(10_000))["id"]
    job_dir = tmp_path / "data" / "jobs" / job_id
    job = server.wait_for_job(job_id, lambda job: job["steps_done"] >= 1, timeout_s=120)

    response = server.http.post(f"/v1/jobs/{job_id}/cancel", headers=AUTH)
    assert response.status_code == 200 and response.json()["cancel_requested"], response.text
    job = wait_for(lambda: (j := server.job(job_id))["state"] != "RUNNING" and j or None, 120, "the cancel")
    assert job["state"] == "CANCELLED" and job["failure_reason"] is None and job["steps_done"] < 10_000, job
    assert slurm_state(job["slurm_job_id"]) == job["slurm_state"] == "CANCELLED", job
    assert processes_in(job_dir) == {}
    # scancel's SIGTERM reached the ranks, which saved a checkpoint before they stopped
    assert "paraplan: checkpoint saved at step" in server.http.get(f"/v1/jobs/{job_id}/logs").text


def test_a_slurm_job_outlives_its_server_and_the_next_one_reattaches(
    servers: Callable[[], Server], tmp_path: Path
) -> None:
    steps = 40  # ~0.1-0.4 s a step; a few are done by the time the next server is up (it must find it running)
    server_a = servers()
    job_id = server_a.submit(slurm_job(steps))["id"]
    job = server_a.wait_for_job(job_id, lambda job: job["steps_done"] >= 1, timeout_s=120)
    slurm_job_id = job["slurm_job_id"]

    assert server_a.stop() in (0, -signal.SIGTERM), server_a.output()
    assert slurm_state(slurm_job_id) == "RUNNING", "the Slurm job stopped with the server"

    server_b = servers()
    job = server_b.job(job_id)
    assert job["state"] == "RUNNING" and job["steps_done"] < steps, f"raise `steps`: the job ended too soon: {job}"
    assert job["slurm_state"] == "RUNNING", job
    job = server_b.wait_for_job(job_id, lambda job: job["state"] == "SUCCEEDED", timeout_s=150)
    assert job["returncode"] == 0 and job["steps_done"] == steps and job["slurm_job_id"] == slurm_job_id, job
    assert job["measured_run"] is not None and job["measured_run"]["steps"] == steps, job
    assert f"re-attached to Slurm job {slurm_job_id}" in server_b.output(tail=10**7), server_b.output()


def test_a_job_whose_slurm_id_was_lost_is_failed_and_its_slurm_job_cancelled(
    app_factory: Callable[..., Any], tiny_request: dict[str, Any], auth_headers: dict[str, str], data_dir: Path
) -> None:
    """A server that stopped between marking a job RUNNING and storing the id sbatch answered: the next server
    cannot follow the job, so it fails it ("server restarted") and cancels the Slurm job by its name."""
    idle = TestClient(app_factory())  # no lifespan: the job is prepared (job.sbatch written) and stays QUEUED
    accepted = idle.post("/v1/jobs", json=tiny_request | {"steps": 10_000, "launcher": "slurm"}, headers=auth_headers)
    assert accepted.status_code == 202, accepted.text
    job_id = accepted.json()["id"]
    store = idle.app.state.service.store  # type: ignore[attr-defined]
    assert store.update_job(job_id, state="RUNNING", started=utc_now())
    lost_id = slurm.submit(data_dir / "jobs" / job_id)  # what the stopped server's sbatch did
    store.close()

    with TestClient(app_factory()) as client:  # starting reconciles
        job = client.get(f"/v1/jobs/{job_id}").json()
    assert job["state"] == "FAILED" and job["failure_reason"] == "server restarted", job
    wait_for(lambda: slurm_state(lost_id) == "CANCELLED" or None, 60, f"Slurm job {lost_id} to be cancelled")


def test_a_job_slurm_does_not_know_has_no_state() -> None:
    """Neither the controller nor accounting (none here: sacct refuses) knows the job: None, not an error."""
    assert slurm.job_state("987654321") is None
