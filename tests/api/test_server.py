"""The service for real: `paraplan serve` (uvicorn on 127.0.0.1, a free port) in a process of its own, over a
temporary data folder, driven over HTTP with httpx.

- a plan search, then a training job of its best plan on 2 CPU ranks, followed to its end (state, metrics, logs
  as text and as server-sent events), with the token checks in front of it;
- restarts: a job outlives the server that started it and the next server re-attaches to it and records how it
  ended; a job whose processes died with the server is FAILED ("server restarted") by the next one.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest

pytestmark = pytest.mark.slow

REPO_ROOT = Path(__file__).resolve().parents[2]
TINY = json.loads((REPO_ROOT / "executor" / "examples" / "tiny-llama-2cpu.json").read_text())
TOKEN = "server-test-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
FINAL = {"SUCCEEDED", "FAILED", "CANCELLED"}
T = TypeVar("T")


# ================================================================================================ helpers


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Server:
    """`python -m api.cli serve` on a free port of 127.0.0.1 over `data_dir` (settings from the environment, as
    a fresh machine would have them: only PARAPLAN_DATA_DIR and PARAPLAN_API_TOKEN); its output goes to `log`."""

    def __init__(self, data_dir: Path, log: Path):
        self.log = log
        self.port = free_port()
        env = {name: value for name, value in os.environ.items() if not name.startswith("PARAPLAN_")}
        env |= {"PARAPLAN_DATA_DIR": str(data_dir), "PARAPLAN_API_TOKEN": TOKEN}
        command = [sys.executable, "-m", "api.cli", "serve", "--host", "127.0.0.1", "--port", str(self.port)]
        with log.open("ab") as output:
            self.process = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdin=subprocess.DEVNULL,
                                            stdout=output, stderr=subprocess.STDOUT)  # fmt: skip
        self.url = f"http://127.0.0.1:{self.port}"
        self.http = httpx.Client(base_url=self.url, timeout=60)

    def wait_ready(self, timeout_s: float = 60) -> None:
        """Until GET /readyz answers 200 (the database answers and the job runner runs)."""
        deadline = time.monotonic() + timeout_s
        while True:
            if self.process.poll() is not None:
                raise AssertionError(f"the server exited with {self.process.returncode}:\n{self.output()}")
            with contextlib.suppress(httpx.TransportError):
                if self.http.get("/readyz").status_code == 200:
                    return
            if time.monotonic() > deadline:
                raise AssertionError(f"the server was not ready in {timeout_s} s:\n{self.output()}")
            time.sleep(0.1)

    @property
    def running(self) -> bool:
        return self.process.poll() is None

    def stop(self, timeout_s: float = 20) -> int | None:
        """SIGTERM (uvicorn's graceful shutdown); SIGKILL if it has not exited in `timeout_s`. Its exit status,
        or None if it had to be killed."""
        self.http.close()
        if not self.running:
            return self.process.returncode
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.kill()
            return None

    def kill(self) -> None:
        self.http.close()
        self.process.kill()
        self.process.wait(timeout=10)

    def output(self, tail: int = 6000) -> str:
        return self.log.read_text(errors="replace")[-tail:]

    # ------------------------------------------------------------------------------------------- the API

    def job(self, job_id: str) -> dict[str, Any]:
        response = self.http.get(f"/v1/jobs/{job_id}")
        assert response.status_code == 200, response.text
        return response.json()

    def submit(self, body: dict[str, Any]) -> dict[str, Any]:
        response = self.http.post("/v1/jobs", json=body, headers=AUTH)
        assert response.status_code == 202, response.text
        return response.json()

    def wait_for_job(self, job_id: str, until: Callable[[dict[str, Any]], bool], timeout_s: float) -> dict[str, Any]:
        """Poll the job until `until(job)`; fail at once if it ends otherwise (with its reason and output)."""

        def check() -> dict[str, Any] | None:
            job = self.job(job_id)
            if until(job):
                return job
            assert job["state"] not in FINAL, f"job ended {job['state']}: {job['failure_reason']}\n{self.logs(job_id)}"
            return None

        return wait_for(check, timeout_s, f"job {job_id}", lambda: f"{self.job(job_id)}\n{self.logs(job_id)}")

    def logs(self, job_id: str) -> str:
        return self.http.get(f"/v1/jobs/{job_id}/logs").text[-4000:]


def wait_for(check: Callable[[], T | None], timeout_s: float, what: str, details: Callable[[], str] = str) -> T:
    deadline = time.monotonic() + timeout_s
    while (found := check()) is None:
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: gave up after {timeout_s} s\n{details()}")
        time.sleep(0.25)
    return found


def processes_in(folder: Path) -> dict[int, str]:
    """pid -> command line of the live processes whose command line names `folder` (a job's supervisor,
    torchrun, its ranks). A zombie has an empty command line: it has exited."""
    marker = str(folder).encode()
    found = {}
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        with contextlib.suppress(OSError, ValueError):  # gone meanwhile
            argv = cmdline.read_bytes()
            if marker in argv and int(cmdline.parent.name) != os.getpid():
                found[int(cmdline.parent.name)] = argv.replace(b"\0", b" ").decode(errors="replace")
    return found


def kill_processes_in(folder: Path, limit_s: float = 10) -> None:
    """SIGKILL every process of `folder`, again for any started meanwhile, until none is left."""
    deadline = time.monotonic() + limit_s
    while (pids := processes_in(folder)) and time.monotonic() < deadline:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.1)
    assert not processes_in(folder), processes_in(folder)


def supervisor_of(job_dir: Path) -> int | None:
    return next((pid for pid, argv in processes_in(job_dir).items() if "api.jobs.supervise" in argv), None)


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] != "Z"
    except OSError:
        return False


def sse_events(text: str) -> list[dict[str, str]]:
    """The events of a text/event-stream body: one {field: value} per event (data lines joined); comment lines (the
    keep-alive pings) are skipped, as the SSE spec tells clients to."""
    events = []
    for block in text.split("\n\n"):
        event: dict[str, str] = {}
        for line in block.splitlines():
            if line.startswith(":"):
                continue
            field, _, value = line.partition(": ")
            event[field] = f"{event[field]}\n{value}" if field in event else value
        if event:
            events.append(event)
    return events


@pytest.fixture
def servers(tmp_path: Path) -> Iterator[Callable[[], Server]]:
    """`servers()` starts a server over this test's data folder and waits until it is ready. Afterwards every
    server still running is stopped and every process of the folder's jobs is killed."""
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
    kill_processes_in(data_dir)


def tiny_job(steps: int) -> dict[str, Any]:
    """executor/examples/tiny-llama-2cpu.json (a 4-layer Llama, DP2 on 2 CPU ranks) as a training job."""
    return copy.deepcopy(TINY) | {"steps": steps}


# ================================================================================================= tests


def test_a_searched_plan_is_trained_and_followed_to_its_end(servers: Callable[[], Server], tmp_path: Path) -> None:
    server = servers()
    search = {key: value for key, value in TINY.items() if key != "plan"} | {"search": {"top_k": 3}}
    response = server.http.post("/v1/plans", json=search)
    assert response.status_code == 201, response.text
    plan = response.json()
    assert plan["found"] >= 1 and plan["result"]["plans"], plan
    assert response.headers["Location"] == f"/v1/plans/{plan['id']}"
    body = {"plan_id": plan["id"], "steps": 8}

    # Starting processes takes the token: none is 401, a wrong one 403, and neither leaves a job behind.
    missing = server.http.post("/v1/jobs", json=body)
    assert missing.status_code == 401 and missing.json()["error"]["kind"] == "unauthorized", missing.text
    wrong = server.http.post("/v1/jobs", json=body, headers={"Authorization": "Bearer " + "x" * len(TOKEN)})
    assert wrong.status_code == 403 and wrong.json()["error"]["kind"] == "forbidden", wrong.text
    assert server.http.get("/v1/jobs").json()["jobs"] == []

    response = server.http.post("/v1/jobs", json=body, headers=AUTH)
    assert response.status_code == 202, response.text
    job_id = response.json()["id"]
    assert response.headers["Location"] == f"/v1/jobs/{job_id}"
    assert [job["id"] for job in server.http.get("/v1/jobs").json()["jobs"]] == [job_id]
    assert [path.name for path in (tmp_path / "data" / "jobs").iterdir()] == [job_id]

    # Follow the job's output as server-sent events from now until it ends, while polling its state.
    with ThreadPoolExecutor(1) as pool:
        url = f"{server.url}/v1/jobs/{job_id}/logs"
        followed = pool.submit(lambda: httpx.get(url, params={"follow": "true"}, timeout=60).text)
        job = server.wait_for_job(job_id, lambda job: job["state"] == "SUCCEEDED", timeout_s=180)
        events = sse_events(followed.result(timeout=30))

    assert job["returncode"] == 0 and job["plan_id"] == plan["id"] and job["nproc"] == 2, job
    assert job["steps"] == job["steps_done"] == 8, job
    measured = job["measured_run"]
    assert measured is not None and measured["steps"] == 8 and measured["measured_step_time_s"] > 0, job
    assert measured["predicted_step_time_s"] == job["predicted"]["step_time_s"] > 0, job

    metrics = server.http.get(f"/v1/jobs/{job_id}/metrics").json()
    assert [record["step"] for record in metrics["steps"]] == list(range(1, 9)), metrics
    assert all(math.isfinite(record["loss"]) and record["loss"] > 0 for record in metrics["steps"]), metrics
    assert metrics["measured_run"] == measured and metrics["state"] == "SUCCEEDED"
    assert metrics["summary"]["steps"] == 8 and metrics["predicted"] == job["predicted"]

    logs = server.http.get(f"/v1/jobs/{job_id}/logs")
    assert logs.status_code == 200 and logs.headers["content-type"].startswith("text/plain"), logs.headers
    assert logs.text.count("paraplan.step") == 8, logs.text
    size = int(logs.headers["X-Next-Offset"])
    assert size == len(logs.content)

    # The stream of an ended job (Accept: text/event-stream): every line, then the end event.
    replayed = server.http.get(f"/v1/jobs/{job_id}/logs", headers={"Accept": "text/event-stream"})
    assert replayed.headers["content-type"].startswith("text/event-stream"), replayed.headers
    for stream in (events, sse_events(replayed.text)):
        *lines, end = stream
        assert end.get("event") == "end" and json.loads(end["data"]) == {"state": "SUCCEEDED"}, end
        assert sum("paraplan.step" in line["data"] for line in lines) == 8, lines
        assert [int(line["id"]) for line in lines] == sorted(int(line["id"]) for line in lines)
        assert int(lines[-1]["id"]) == size  # each id is the byte offset after its line: the last is the end


def test_a_job_outlives_its_server_and_the_next_one_reattaches(servers: Callable[[], Server], tmp_path: Path) -> None:
    steps = 100  # ~0.1-0.4 s a step; ~20 are done by the time the next server is up (it must find it running)
    server_a = servers()
    job_id = server_a.submit(tiny_job(steps))["id"]
    job_dir = tmp_path / "data" / "jobs" / job_id
    server_a.wait_for_job(job_id, lambda job: job["state"] == "RUNNING" and job["steps_done"] >= 1, timeout_s=120)
    supervisor = supervisor_of(job_dir)
    assert supervisor is not None, processes_in(job_dir)

    # A graceful shutdown (uvicorn exits by the signal it got, once it has shut the application down).
    assert server_a.stop() in (0, -signal.SIGTERM), server_a.output()
    assert "Application shutdown complete" in server_a.output()
    assert alive(supervisor), "the job's supervisor stopped with the server"
    assert not (job_dir / "result.json").exists()

    server_b = servers()
    job = server_b.job(job_id)
    assert job["state"] == "RUNNING" and job["steps_done"] < steps, f"raise `steps`: the job ended too soon: {job}"
    job = server_b.wait_for_job(job_id, lambda job: job["state"] == "SUCCEEDED", timeout_s=150)
    assert job["returncode"] == 0 and job["steps_done"] == steps and job["failure_reason"] is None, job
    assert job["measured_run"] is not None and job["measured_run"]["steps"] == steps, job
    assert f"re-attached to its supervisor (pid {supervisor})" in server_b.output(tail=10**7), server_b.output()
    assert not alive(supervisor) and processes_in(job_dir) == {}


def test_a_job_lost_with_its_server_is_failed_by_the_next_one(servers: Callable[[], Server], tmp_path: Path) -> None:
    server_a = servers()
    job_id = server_a.submit(tiny_job(10_000))["id"]
    job_dir = tmp_path / "data" / "jobs" / job_id
    server_a.wait_for_job(job_id, lambda job: job["state"] == "RUNNING", timeout_s=60)
    # Its supervisor and torchrun have started: there is a process tree to lose.
    wait_for(
        lambda: len(processes_in(job_dir)) >= 2 or None, 60, "the job's processes", lambda: str(processes_in(job_dir))
    )

    server_a.kill()
    kill_processes_in(job_dir)

    server_b = servers()
    job = server_b.wait_for_job(job_id, lambda job: job["state"] in FINAL, timeout_s=10)
    assert job["state"] == "FAILED" and job["failure_reason"] == "server restarted", job
    assert job["finished"] is not None
    assert server_b.http.get("/v1/jobs", params={"state": "RUNNING"}).json()["jobs"] == []
    assert processes_in(job_dir) == {}


def test_one_data_folder_serves_one_server_and_a_killed_one_gives_it_back(
    servers: Callable[[], Server], tmp_path: Path
) -> None:
    """Two servers on one folder would each run --max-jobs jobs and fail each other's running jobs as "server
    restarted": the second is refused at start, naming the first one's pid. SIGKILL releases the folder's lock."""
    first = servers()
    second = Server(tmp_path / "data", tmp_path / "second.log")
    try:
        returncode = second.process.wait(timeout=60)
    finally:
        second.stop()
    assert returncode != 0, second.output()
    assert f"is in use by another paraplan server (pid {first.process.pid})" in second.output(), second.output()
    assert "Traceback" not in second.output(), second.output()
    assert first.http.get("/readyz").status_code == 200

    first.process.send_signal(signal.SIGKILL)
    first.process.wait(timeout=10)
    third = servers()  # ready: it holds the folder now
    assert third.http.get("/readyz").status_code == 200
