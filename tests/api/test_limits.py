"""The service's bounds under careless and hostile use (issue 31 items 5-7): one job runner per data folder, stored
searches kept to a byte budget (the database migrated in place to hold each one's size), validation jobs bounded in
wall time, and a cancelled validation stopped within seconds. Real SQLite databases and real job processes."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import create_engine, text

from api.jobs import folder_lock
from api.settings import MAX_STORED_PLAN_BYTES_ENV, MAX_VALIDATION_S_ENV, Settings, SettingsError
from api.store import ApiStore, PlanRow
from profiler.store import DATABASE_SCHEMA_VERSION
from tests.api.test_routes import error_of, search_of, wait_for, wait_for_end
from tests.api.test_validations import SMALL as SMALL_VALIDATION
from tests.api.test_validations import stored_fixture_profile

REPO_ROOT = Path(__file__).resolve().parents[2]


def _search(client: TestClient, request: dict[str, Any]) -> str:
    response = client.post("/v1/plans", json=search_of(request, 1))
    assert response.status_code == 201, response.text
    return response.json()["id"]


def _stored_bytes(client: TestClient, plan_id: str) -> int:
    row = client.app.state.service.store.get_plan(plan_id)  # type: ignore[attr-defined]
    assert row is not None
    return row.stored_bytes


# ============================================================================ stored searches, by bytes


def test_stored_searches_are_kept_to_a_byte_budget_oldest_first(
    app_factory: Callable[..., Any], tiny_request: dict[str, Any], auth_headers: dict[str, str]
) -> None:
    client = TestClient(app_factory(max_stored_plan_bytes=10**9))  # job runner not started: the job stays QUEUED
    run = _search(client, tiny_request)
    assert client.post("/v1/jobs", json={"plan_id": run, "steps": 1}, headers=auth_headers).status_code == 202
    size = _stored_bytes(client, run)
    row = client.app.state.service.store.get_plan(run)  # type: ignore[attr-defined]
    assert size == len(row.request.encode()) + len(row.result.encode()) > 0

    budget = int(2.5 * size)  # room for two searches of this size, not three
    client = TestClient(app_factory(max_stored_plan_bytes=budget))
    ids = [_search(client, tiny_request) for _ in range(4)]
    listed = {plan["id"] for plan in client.get("/v1/plans").json()["plans"]}
    assert listed == {run, *ids[-2:]}  # the one a job runs is kept, and counts toward neither bound
    for dropped in ids[:2]:
        error_of(client.get(f"/v1/plans/{dropped}"), 404, "not_found")


def test_the_newest_search_is_kept_even_over_the_byte_budget(
    app_factory: Callable[..., Any], tiny_request: dict[str, Any]
) -> None:
    client = TestClient(app_factory(max_stored_plan_bytes=1))
    first, newest = _search(client, tiny_request), _search(client, tiny_request)
    assert {plan["id"] for plan in client.get("/v1/plans").json()["plans"]} == {newest}
    error_of(client.get(f"/v1/plans/{first}"), 404, "not_found")


@pytest.mark.parametrize(
    ("name", "value", "attribute", "expected"),
    [(MAX_STORED_PLAN_BYTES_ENV, "4096", "max_stored_plan_bytes", 4096),
     (MAX_VALIDATION_S_ENV, "90.5", "max_validation_s", 90.5)],
)  # fmt: skip
def test_the_new_bounds_are_settings(
    monkeypatch: pytest.MonkeyPatch, data_dir: Path, name: str, value: str, attribute: str, expected: float
) -> None:
    monkeypatch.setenv(name, value)
    assert getattr(Settings.from_env(), attribute) == expected
    for bad in ("0", "-1", "many"):
        monkeypatch.setenv(name, bad)
        with pytest.raises(SettingsError, match=name):
            Settings.from_env()


# ============================================================================ schemas 3 -> 4 -> 5, in place


def _as_schema_4(database: Path) -> None:
    """Turn a database this paraplan made into the one schema 4 made: jobs without launcher, nodes and Slurm's id
    and state."""
    engine = create_engine(f"sqlite:///{database}")
    with engine.begin() as connection:
        for column in ("launcher", "nodes", "slurm_job_id", "slurm_state"):
            connection.execute(text(f"ALTER TABLE jobs DROP COLUMN {column}"))
        connection.execute(text("UPDATE paraplan_meta SET value = '4' WHERE key = 'schema_version'"))
    engine.dispose()


def _as_schema_3(database: Path) -> None:
    """Turn a database this paraplan made into the one the schema 3 made: schema 4's, without plans.stored_bytes."""
    _as_schema_4(database)
    engine = create_engine(f"sqlite:///{database}")
    with engine.begin() as connection:
        connection.execute(text("ALTER TABLE plans DROP COLUMN stored_bytes"))
        connection.execute(text("UPDATE paraplan_meta SET value = '3' WHERE key = 'schema_version'"))
    engine.dispose()


def _schema_version(database: Path) -> str:
    with create_engine(f"sqlite:///{database}").connect() as connection:
        return connection.execute(text("SELECT value FROM paraplan_meta WHERE key = 'schema_version'")).scalar()


def test_a_schema_3_database_is_migrated_in_place_keeping_its_rows(
    app_factory: Callable[..., Any], tiny_request: dict[str, Any], data_dir: Path
) -> None:
    client = TestClient(app_factory())
    ids = [_search(client, tiny_request | {"training": tiny_request["training"] | {"seq_len": n}}) for n in (64, 128)]
    answers = {plan_id: client.get(f"/v1/plans/{plan_id}").json() for plan_id in ids}
    client.app.state.service.store.close()  # type: ignore[attr-defined]
    database = data_dir / "paraplan.db"
    _as_schema_3(database)

    store = ApiStore(f"sqlite:///{database}")  # opening migrates
    try:
        rows = [store.get_plan(plan_id) for plan_id in ids]
        assert all(row is not None for row in rows)
        for row in rows:
            assert row is not None and row.stored_bytes == PlanRow.size_of(row.request, row.result) > 0
    finally:
        store.close()
    assert _schema_version(database) == str(DATABASE_SCHEMA_VERSION) == "5"
    client = TestClient(app_factory())
    assert {plan_id: client.get(f"/v1/plans/{plan_id}").json() for plan_id in ids} == answers


def test_a_schema_4_database_is_migrated_in_place_its_jobs_local(
    app_factory: Callable[..., Any], tiny_request: dict[str, Any], auth_headers: dict[str, str], data_dir: Path
) -> None:
    """Schema 5 adds where a job runs: the jobs a schema 4 database holds ran locally, on one node."""
    client = TestClient(app_factory())  # its runner is not started: the job stays QUEUED
    accepted = client.post("/v1/jobs", json=tiny_request | {"steps": 1}, headers=auth_headers)
    assert accepted.status_code == 202, accepted.text
    job_id = accepted.json()["id"]
    client.app.state.service.store.close()  # type: ignore[attr-defined]
    database = data_dir / "paraplan.db"
    _as_schema_4(database)

    store = ApiStore(f"sqlite:///{database}")  # opening migrates
    try:
        row = store.get_job(job_id)
        assert row is not None and (row.launcher, row.nodes, row.slurm_job_id, row.slurm_state) == (
            "local",
            1,
            None,
            None,
        )
        assert row.state == "QUEUED" and row.nproc == 2
        assert [job.id for job in store.jobs(launcher="local")] == [job_id] and store.jobs(launcher="slurm") == []
    finally:
        store.close()
    assert _schema_version(database) == "5"
    job = TestClient(app_factory()).get(f"/v1/jobs/{job_id}").json()
    assert (job["launcher"], job["nodes"], job["slurm_job_id"], job["state"]) == ("local", 1, None, "QUEUED"), job


def test_a_schema_3_database_without_the_service_tables_is_migrated_too(tmp_path: Path) -> None:
    """A database only the profiler wrote (no plans table yet) is stamped 5; the table comes with its size column."""
    from planner.profiles import load_profile_json
    from tests.api.test_validations import FIXTURE_PROFILE

    database = tmp_path / "profiles-only.db"
    store = ApiStore(f"sqlite:///{database}")
    profile_id = store.profiles.add(load_profile_json(FIXTURE_PROFILE))
    store.close()
    engine = create_engine(f"sqlite:///{database}")
    with engine.begin() as connection:
        for table in ("measured_runs", "jobs", "plans"):
            connection.execute(text(f"DROP TABLE {table}"))
        connection.execute(text("UPDATE paraplan_meta SET value = '3' WHERE key = 'schema_version'"))
    engine.dispose()

    store = ApiStore(f"sqlite:///{database}")
    try:
        assert store.profiles.get(profile_id) is not None
        row = PlanRow(id="a" * 32, created="2026-12-07T00:00:00.000+00:00", model_name="m", num_gpus=1, found=0,
                      best_step_time_s=None, request="{}", result="{}", stored_bytes=4)  # fmt: skip
        store.add_plan(row)
        assert store.get_plan(row.id).stored_bytes == 4  # type: ignore[union-attr]
    finally:
        store.close()


# ======================================================================================== one data folder

HOLD_THE_LOCK = """
import sys, time
from pathlib import Path
from api.jobs import folder_lock
folder_lock.acquire(Path(sys.argv[1]))
print("held", flush=True)
time.sleep(120)
"""


@pytest.fixture
def lock_held_elsewhere(data_dir: Path) -> Iterator[subprocess.Popen[str]]:
    """Another process that holds the data folder's lock (as a server's job runner does)."""
    holder = subprocess.Popen([sys.executable, "-c", HOLD_THE_LOCK, str(data_dir)], cwd=REPO_ROOT, text=True,
                              stdout=subprocess.PIPE)  # fmt: skip
    assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
    yield holder
    holder.kill()
    holder.wait(timeout=10)


def test_a_job_runner_on_a_folder_another_process_holds_is_refused(
    app_factory: Callable[..., Any], lock_held_elsewhere: subprocess.Popen[str], data_dir: Path
) -> None:
    refusal = rf"in use by another paraplan server \(pid {lock_held_elsewhere.pid}\)"
    with pytest.raises(folder_lock.FolderInUse, match=refusal), TestClient(app_factory()):
        pass
    lock_held_elsewhere.kill()  # the kernel releases a dead holder's lock
    lock_held_elsewhere.wait(timeout=10)
    with TestClient(app_factory()) as client:
        assert client.get("/readyz").status_code == 200


def test_runners_of_one_process_share_the_folder_and_release_it(app_factory: Callable[..., Any], data_dir: Path):
    """An app's lifespan can run again, and two apps of one process count their holds: the lock is the process's."""
    first, second = TestClient(app_factory()), TestClient(app_factory())
    with first, second:
        assert first.get("/readyz").status_code == 200 and second.get("/readyz").status_code == 200
    holder = subprocess.run([sys.executable, "-c", HOLD_THE_LOCK.replace("time.sleep(120)", ""), str(data_dir)],
                            cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)  # fmt: skip
    assert holder.returncode == 0 and holder.stdout.strip() == "held", holder.stderr


# ============================================================================ validations: time and cancel


def _started_validation(
    client: TestClient, auth_headers: dict[str, str], data_dir: Path, phase: str = "profiling"
) -> str:
    """A validation, once it is in `phase`: "profiling" (it measures its own profile: the compute sweep runs in the
    job's own process) or "running plans" (from a stored profile: a plan trains under torchrun)."""
    # Long enough that neither phase ends by itself while the test waits: 200 steps a plan, and a profile whose
    # compute sweep (of 4x the default tokens) takes tens of seconds a pass on a 2-core machine.
    body = SMALL_VALIDATION | {"steps": 200, "warm_steps": 1}
    if phase == "running plans":
        body |= {"profile": stored_fixture_profile(client)}
    else:
        body |= {"seq_len": 512}
    accepted = client.post("/v1/validations", json=body, headers=auth_headers)
    assert accepted.status_code == 202, accepted.text
    job_id = accepted.json()["id"]
    output, runs = data_dir / "jobs" / job_id / "output.log", data_dir / "jobs" / job_id / "validation" / "runs"

    def in_phase(view: dict[str, Any]) -> bool:
        if phase == "running plans":
            return any(runs.glob("*/metrics*"))  # a plan's ranks are training
        return output.is_file() and "validating" in output.read_text()

    wait_for(client, f"/v1/validations/{job_id}", lambda view: view["state"] == "RUNNING" and in_phase(view),
             timeout_s=180, what=phase)  # fmt: skip
    return job_id


@pytest.mark.parametrize("phase", ["profiling", "running plans"])
def test_a_cancelled_validation_stops_within_seconds(
    client: TestClient,
    auth_headers: dict[str, str],
    data_dir: Path,
    processes_in_folder: Callable[[Path], list[int]],
    phase: str,
) -> None:
    job_id = _started_validation(client, auth_headers, data_dir, phase)
    time.sleep(2)
    asked = time.monotonic()
    assert client.post(f"/v1/jobs/{job_id}/cancel", headers=auth_headers).status_code == 200
    view = wait_for_end(client, f"/v1/validations/{job_id}", timeout_s=60)
    took_s = time.monotonic() - asked
    assert view["state"] == "CANCELLED", view
    assert took_s < 10, f"the validation took {took_s:.1f} s to stop"
    assert processes_in_folder(data_dir / "jobs" / job_id) == []


def test_a_validation_past_its_time_limit_is_failed_naming_the_bound(
    app_factory: Callable[..., Any],
    auth_headers: dict[str, str],
    data_dir: Path,
    processes_in_folder: Callable[[Path], list[int]],
) -> None:
    with TestClient(app_factory(max_validation_s=4.0)) as client:
        job_id = _started_validation(client, auth_headers, data_dir)
        view = wait_for_end(client, f"/v1/validations/{job_id}", timeout_s=60)
    assert view["state"] == "FAILED", view
    assert view["failure_reason"] == (
        f"ran past the time limit of validate jobs (4 s, {MAX_VALIDATION_S_ENV}) and was stopped"
    ), view
    started, finished = (view[name] for name in ("started", "finished"))
    from datetime import datetime

    assert (datetime.fromisoformat(finished) - datetime.fromisoformat(started)).total_seconds() < 4 + 10, view
    assert processes_in_folder(data_dir / "jobs" / job_id) == []
