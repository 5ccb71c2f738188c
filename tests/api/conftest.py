"""Fixtures the REST service's tests share: a server over a temporary data folder (its real SQLite database,
no fakes), a client, the token, and the tiny CPU training request of executor/examples.

Every job a test starts runs as real processes under the data folder; whatever is still running when the test
ends is killed, so no test leaves training ranks behind.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from api.app import create_app
from api.settings import (
    API_TOKEN_ENV,
    MAX_JOB_PROCESSES_ENV,
    MAX_JOBS_ENV,
    MAX_REQUEST_BYTES_ENV,
    MAX_STORED_PLANS_ENV,
    Settings,
)
from profiler.store import DATA_DIR_ENV, DATABASE_URL_ENV

REPO_ROOT = Path(__file__).resolve().parents[2]
TINY_EXAMPLE = REPO_ROOT / "executor" / "examples" / "tiny-llama-2cpu.json"
TOKEN = "paraplan-test-token-0123456789"
_SETTINGS_ENV = (API_TOKEN_ENV, MAX_JOBS_ENV, MAX_REQUEST_BYTES_ENV, MAX_JOB_PROCESSES_ENV, MAX_STORED_PLANS_ENV,
                 DATABASE_URL_ENV)  # fmt: skip


def processes_in(folder: Path) -> list[int]:
    """Pids of the live processes whose command line names `folder`: a job's supervisor, torchrun, its ranks."""
    marker = str(folder).encode()
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if marker in cmdline.read_bytes() and int(cmdline.parent.name) != os.getpid():
                found.append(int(cmdline.parent.name))
        except (OSError, ValueError):
            continue  # gone meanwhile
    return found


def kill_processes_in(folder: Path, limit_s: float = 10.0) -> None:
    """SIGKILL what still runs in `folder` (again, for what starts meanwhile) until nothing does."""
    deadline = time.monotonic() + limit_s
    while (pids := processes_in(folder)) and time.monotonic() < deadline:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):  # gone meanwhile
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.1)


@pytest.fixture
def token() -> str:
    """The server's API token (at least 16 characters, as Settings requires)."""
    return TOKEN


@pytest.fixture
def auth_headers(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture
def data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The server's data folder. The PARAPLAN_* settings variables are cleared, so the test's settings are what
    it passes; PARAPLAN_DATA_DIR points here, so no job process writes outside it."""
    for name in _SETTINGS_ENV:
        monkeypatch.delenv(name, raising=False)
    folder = tmp_path / "data"
    monkeypatch.setenv(DATA_DIR_ENV, str(folder))
    return folder


@pytest.fixture
def app_factory(data_dir: Path, token: str) -> Iterator[Callable[..., FastAPI]]:
    """`app_factory(**settings)`: a server over `data_dir` with the test token unless told otherwise
    (`api_token=None`: no token configured). After the test, every process of its jobs is killed."""
    folders: set[Path] = set()

    def make(**overrides: Any) -> FastAPI:
        options = {"data_dir": data_dir, "api_token": token} | overrides
        folders.add(Path(options["data_dir"]).resolve())
        return create_app(Settings.from_env(**options))

    yield make
    for folder in folders:
        kill_processes_in(folder)


@pytest.fixture
def client(app_factory: Callable[..., FastAPI]) -> Iterator[TestClient]:
    """A client of a server with default settings, its job runner started (jobs really run)."""
    with TestClient(app_factory()) as started:
        yield started


@pytest.fixture
def idle_client(app_factory: Callable[..., FastAPI]) -> TestClient:
    """A client of a server whose job runner is not started (no lifespan): jobs are accepted and stay QUEUED,
    so a test can look at accepted jobs without training anything."""
    return TestClient(app_factory())


@pytest.fixture
def tiny_request() -> dict[str, Any]:
    """The contract request of executor/examples/tiny-llama-2cpu.json: a 4-layer Llama on 2 CPU ranks, DP2 ZeRO-1
    (a fresh copy for each test)."""
    return copy.deepcopy(_TINY)


@pytest.fixture
def processes_in_folder() -> Callable[[Path], list[int]]:
    """`processes_in_folder(folder)`: pids of live processes whose command line names `folder`."""
    return processes_in


_TINY: dict[str, Any] = json.loads(TINY_EXAMPLE.read_text())
