"""Plan searches in worker processes (api/search_pool.py), through the real app: real spawned workers, a real
SQLite database, real signals. Overlap is judged by the workers' own start and end stamps (one monotonic clock for
every process), never by a time limit."""

from __future__ import annotations

import json
import os
import pickle
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from pydantic import ValidationError
from typer.testing import CliRunner

from api.cli import app as cli
from api.cli.app import EXIT_BAD_INPUT
from api.commands import estimate as commands
from api.errors import InputError
from api.search_pool import Run, SearchPool, SearchUnavailable, search_answer
from api.settings import SEARCH_WORKERS_ENV, Settings, SettingsError
from planner.errors import InfeasiblePlanError, UnknownPresetError
from planner.presets import model_preset
from planner.profiles import ProfileError, load_profile_json
from planner.request import PlanRequest

WAIT_S = 120.0  # for workers to start and searches to end on a loaded 2-core machine; a hang fails, not a slowness


def search(global_batch_size: int = 1024) -> dict[str, Any]:
    """A real search of about half a second (Llama-3 70B on 512 H100); distinct batches are distinct searches."""
    return {
        "model": {"name": "llama3-70b"},
        "training": {"seq_len": 4096, "global_batch_size": global_batch_size},
        "cluster": {"gpu": "h100-sxm", "num_nodes": 64, "gpus_per_node": 8},
    }


def pool_of(app: FastAPI) -> SearchPool:
    return app.state.service.searches.pool


def children() -> dict[int, str]:
    """This process's live child processes: pid -> command line."""
    found = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parent = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            if parent == os.getpid():
                found[int(stat.parent.name)] = (stat.parent / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except (OSError, ValueError, IndexError):
            continue  # gone meanwhile
    return found


def workers_among(processes: dict[int, str]) -> set[int]:
    """Leaves out Python's resource tracker: one per interpreter, started by the first spawn-context pool and kept
    (and reused) until the interpreter exits; it is multiprocessing's, not a pool's."""
    return {pid for pid, command in processes.items() if "multiprocessing.resource_tracker" not in command}


def post_together(client: TestClient, bodies: list[dict[str, Any]]) -> list[int]:
    """POST every body at once, one thread each; their statuses."""
    statuses: list[int] = [0] * len(bodies)
    start = threading.Barrier(len(bodies))

    def post(index: int) -> None:
        start.wait()
        statuses[index] = client.post("/v1/plans", json=bodies[index]).status_code

    threads = [threading.Thread(target=post, args=(index,)) for index in range(len(bodies))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(WAIT_S)
    return statuses


def wait_for(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def overlap(first: Run, second: Run) -> bool:
    return first.started_s < second.ended_s and second.started_s < first.ended_s


# ============================================================================================== where


def test_a_search_runs_in_a_worker_process_and_an_identical_one_is_answered_from_memory(
    app_factory: Callable[..., FastAPI],
) -> None:
    app = app_factory(search_workers=1)
    pool = pool_of(app)
    with TestClient(app) as client:
        first = client.post("/v1/plans", json=search())
        assert first.status_code == 201
        assert pool.recent_runs[-1].pid != os.getpid()
        assert pool.recent_runs[-1].pid in workers_among(children())

        again = client.post("/v1/plans", json=search())
        assert again.status_code == 201 and len(pool.recent_runs) == 1  # nothing ran for it
        assert first.json()["result"] == again.json()["result"] and first.json()["id"] != again.json()["id"]

        assert post_together(client, [search(2048)] * 4) == [201] * 4
        assert len(pool.recent_runs) == 2  # concurrent identical searches ran once


def test_distinct_searches_run_side_by_side(app_factory: Callable[..., FastAPI]) -> None:
    app = app_factory(search_workers=2)
    pool = pool_of(app)
    with TestClient(app) as client:
        batches = iter(range(520, 4000, 8))
        # Until both workers have answered a search, both have started (a worker takes seconds to start).
        while len({run.pid for run in pool.recent_runs}) < 2:
            assert post_together(client, [search(next(batches)), search(next(batches))]) == [201, 201]
        assert post_together(client, [search(next(batches)), search(next(batches))]) == [201, 201]
        first, second = list(pool.recent_runs)[-2:]
    assert first.pid != second.pid
    assert overlap(first, second), (first, second)


def test_a_scaling_sweeps_node_counts_side_by_side(app_factory: Callable[..., FastAPI]) -> None:
    """POST /v1/scaling submits every node count's search before waiting for any (api/routes/scaling.py)."""
    app = app_factory(search_workers=2)
    pool = pool_of(app)
    with TestClient(app) as client:
        batches = iter(range(520, 4000, 8))
        while len({run.pid for run in pool.recent_runs}) < 2:  # both workers started
            assert post_together(client, [search(next(batches)), search(next(batches))]) == [201, 201]
        answer = client.post("/v1/scaling", json=search(4096) | {"nodes": [32, 64]})
        assert answer.status_code == 200, answer.text
        assert [point["num_nodes"] for point in answer.json()["points"]] == [32, 64]
        first, second = list(pool.recent_runs)[-2:]
    assert first.pid != second.pid
    assert overlap(first, second), (first, second)


def test_with_no_workers_searches_run_in_the_server_process(app_factory: Callable[..., FastAPI]) -> None:
    app = app_factory(search_workers=0)
    with TestClient(app) as client:
        assert client.post("/v1/plans", json=search()).status_code == 201
        assert pool_of(app).recent_runs[-1].pid == os.getpid()
        assert workers_among(children()) == set()


# ============================================================================================ errors


# A search the planner refuses in the worker (the fixed tp contradicts the model), and one refused at parsing.
CONTRADICTORY = search() | {"search": {"fixed": {"tp": 3}}}
UNKNOWN_MODEL = search() | {"model": {"name": "llama3-70bb"}}


@pytest.mark.parametrize(("body", "kind"), [(CONTRADICTORY, "invalid_plan"), (UNKNOWN_MODEL, "unknown_preset")])
def test_a_refused_search_is_the_same_422_as_in_the_server_process(
    app_factory: Callable[..., FastAPI], body: dict[str, Any], kind: str
) -> None:
    answers = []
    for workers in (0, 1):
        with TestClient(app_factory(search_workers=workers)) as client:
            answers.append(client.post("/v1/plans", json=body))
    in_process, in_worker = answers
    assert in_worker.status_code == in_process.status_code == 422
    assert in_worker.json()["error"]["kind"] == kind
    assert in_worker.text == in_process.text


def test_the_planners_errors_survive_pickling() -> None:
    """What a worker raises reaches the server as the same error (an exception whose constructor takes more than
    its message pickles but cannot be unpickled, unless it says how)."""
    infeasible = InfeasiblePlanError("invalid_plan", [])
    try:
        model_preset("llama3-70bb")
    except UnknownPresetError as error:
        unknown = error
    try:
        PlanRequest.model_validate({"model": "llama3-8b"})
    except ValidationError as error:
        invalid = error
    errors = [infeasible, unknown, ProfileError("cluster.profile: no", "cluster.profile"),
              InputError.at("body", "bad", kind="invalid_request"), invalid]  # fmt: skip
    for error in errors:
        copy = pickle.loads(pickle.dumps(error))
        assert type(copy) is type(error) and str(copy) == str(error)
        assert vars(copy) == vars(error) if hasattr(error, "__dict__") else copy.errors() == error.errors()
    assert pickle.loads(pickle.dumps(unknown)).closest == unknown.closest


def test_a_killed_worker_answers_503_and_the_next_search_succeeds(app_factory: Callable[..., FastAPI]) -> None:
    app = app_factory(search_workers=1)
    pool = pool_of(app)
    with TestClient(app) as client:
        assert client.post("/v1/plans", json=search()).status_code == 201
        worker = pool.recent_runs[-1].pid
        # The worker is kept busy, so the search posted next is surely in its hands (queued) when it is killed.
        busy = pool.submit(time.sleep, WAIT_S)
        answers: list[Any] = []
        posting = threading.Thread(target=lambda: answers.append(client.post("/v1/plans", json=search(2048))))
        posting.start()
        wait_for(lambda: pool.in_flight == 2, "the search to reach the worker")
        os.kill(worker, signal.SIGKILL)
        posting.join(WAIT_S)
        with pytest.raises(SearchUnavailable):
            busy.result(WAIT_S)

        lost = answers[0]
        assert lost.status_code == 503, lost.text
        assert lost.headers["Retry-After"] == "1"
        error = lost.json()["error"]
        assert error["kind"] == "unavailable" and "worker process" in error["message"] and "retried" in error["message"]

        retried = client.post("/v1/plans", json=search(2048))  # the failure was not memoized; fresh workers run it
        assert retried.status_code == 201, retried.text
        assert pool.recent_runs[-1].pid != worker


# ========================================================================================= lifespans


def test_no_worker_outlives_the_lifespan_and_a_restarted_one_searches_again(
    app_factory: Callable[..., FastAPI],
) -> None:
    app = app_factory(search_workers=2)
    before = workers_among(children())
    for batch in (1024, 2048):
        with TestClient(app) as client:  # each `with` is a lifespan: startup, then shutdown
            assert client.post("/v1/plans", json=search(batch)).status_code == 201
            started = workers_among(children()) - before
            assert pool_of(app).recent_runs[-1].pid in started
        assert workers_among(children()) == before
        assert not any(Path(f"/proc/{pid}").exists() for pid in started)  # exited and reaped, not zombies


def test_the_worker_count_is_a_setting(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(SEARCH_WORKERS_ENV, "3")
    assert Settings.from_env(data_dir=tmp_path).search_workers == 3
    assert Settings.from_env(data_dir=tmp_path, search_workers=0).search_workers == 0
    monkeypatch.setenv(SEARCH_WORKERS_ENV, "-1")
    with pytest.raises(SettingsError, match=SEARCH_WORKERS_ENV):
        Settings.from_env(data_dir=tmp_path)
    monkeypatch.setenv(SEARCH_WORKERS_ENV, "two")
    with pytest.raises(SettingsError, match=SEARCH_WORKERS_ENV):
        Settings.from_env(data_dir=tmp_path)


def test_serve_refuses_a_negative_worker_count_naming_the_flag(data_dir: Path) -> None:
    result = CliRunner().invoke(cli, ["serve", "--port", "1", "--search-workers", "-1"])
    assert result.exit_code == EXIT_BAD_INPUT
    assert "--search-workers" in result.output and "Traceback" not in result.output


def test_a_search_from_a_measured_profile_gives_the_same_plans_in_a_worker() -> None:
    """The parsed request carries the profile's costs (a private attribute the server resolved): they cross to
    the worker, so its plans are the server process's, not the analytic model's."""
    profile = Path(__file__).parents[1] / "data" / "h200-llama3.2-1b" / "seq1024" / "profile.json"
    body = {"model": {"name": "llama3.2-1b"}, "training": {"seq_len": 1024, "global_batch_size": 8},
            "cluster": {"gpu": "h200", "num_nodes": 1, "gpus_per_node": 8, "profile": str(profile)}}  # fmt: skip
    measured = commands.parse(body, "plan", load_profile_json)
    analytic = commands.parse(body | {"cluster": body["cluster"] | {"profile": None}}, "plan", None)
    pool = SearchPool(workers=1)
    pool.start()
    try:
        in_worker = json.loads(pool.submit(search_answer, measured).result(WAIT_S).json)["plans"]
        assert pool.recent_runs[-1].pid != os.getpid()
    finally:
        pool.close()
    assert in_worker == json.loads(search_answer(measured).json)["plans"]
    assert in_worker != json.loads(search_answer(analytic).json)["plans"]
