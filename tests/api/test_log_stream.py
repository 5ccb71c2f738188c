"""A job's output as server-sent events (sse-starlette) over a real uvicorn on 127.0.0.1, in this process so the
ping interval can be shortened: a quiet job gets keep-alive pings, a new line arrives as an event, a client that
goes away ends the stream on the server, and a reconnect with Last-Event-ID resumes after the last line it saw.

The job is a row of the server's real SQLite store and a real output file, written by the test as a job's
supervisor would: what is tested is the stream, not the training."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn

import api.routes.jobs as job_routes
from api.app import create_app
from api.jobs.supervise import OUTPUT_FILE
from api.routes.common import Service
from api.settings import Settings
from api.store import JobRow, new_id, utc_now
from tests.api.test_routes import sse_events

PING_S = 0.2


@dataclass
class Served:
    server: uvicorn.Server
    service: Service

    @property
    def url(self) -> str:
        host, port = self.server.servers[0].sockets[0].getsockname()[:2]
        return f"http://{host}:{port}"


@pytest.fixture
def served(data_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Served]:
    """uvicorn serving a fresh app on a free port, in a thread; stopped (its lifespan closed) afterwards."""
    monkeypatch.setattr(job_routes, "SSE_PING_S", PING_S)
    app = create_app(Settings.from_env(data_dir=data_dir, search_workers=0))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait_until(lambda: server.started, "the server started")
    yield Served(server, app.state.service)
    server.should_exit = True
    thread.join(timeout=10)
    assert not thread.is_alive(), "the server did not stop"


def wait_until(check: Callable[[], Any], what: str, timeout_s: float = 10) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting until {what}")
        time.sleep(0.02)


def running_job(service: Service, first_lines: bytes) -> tuple[str, Path]:
    """A RUNNING job with `first_lines` of output: its id and its output file."""
    job_id = new_id()
    service.store.add_job(JobRow(id=job_id, kind="train", state="RUNNING", created=utc_now(), nproc=1, body="{}",
                                 body_hash="h"))  # fmt: skip
    output = service.runner.job_dir(job_id) / OUTPUT_FILE
    output.parent.mkdir(parents=True)
    output.write_bytes(first_lines)
    return job_id, output


def read_until_data(lines: Iterator[str], limit: int = 100) -> tuple[list[dict[str, str]], int]:
    """The next event that carries data (an output line) of a stream, and how many pings came before it."""
    pings, block = 0, []
    for _ in range(limit):
        line = next(lines)
        if line.startswith(": ping"):
            pings += 1
        elif line:
            block.append(line)
        elif block:
            return sse_events("\n".join(block)), pings
    raise AssertionError(f"no data in {limit} lines")


def test_a_followed_job_is_pinged_while_quiet_and_resumed_after_a_disconnect(served: Served) -> None:
    job_id, output = running_job(served.service, b"step 1\n")
    url = f"{served.url}/v1/jobs/{job_id}/logs"
    with httpx.Client(timeout=10) as client, client.stream("GET", url, params={"follow": "true"}) as stream:
        assert stream.status_code == 200 and stream.headers["content-type"].startswith("text/event-stream")
        lines = stream.iter_lines()
        assert read_until_data(lines)[0] == [{"id": "7", "data": "step 1"}]
        time.sleep(3 * PING_S)  # the job is quiet
        with output.open("ab") as appending:
            appending.write(b"step 2\n")
        event, pings = read_until_data(lines)
        assert event == [{"id": "14", "data": "step 2"}] and pings >= 2

    # The client went away: the server ends the stream (its request task returns) instead of polling on.
    wait_until(lambda: not served.server.server_state.tasks, "the stream's task ended")

    with output.open("ab") as appending:
        appending.write(b"step 3\n")
    served.service.store.update_job(job_id, state="SUCCEEDED")
    resumed = httpx.get(url, params={"follow": "true"}, headers={"Last-Event-ID": "14"}, timeout=10)
    *lines_after, end = sse_events(resumed.text)
    assert lines_after == [{"id": "21", "data": "step 3"}]
    assert end["event"] == "end" and json.loads(end["data"]) == {"state": "SUCCEEDED"}
