"""The service's parts below HTTP: settings, the supervisor of one job, the store's compare-and-set, the
memoized search, `paraplan serve` refusing bad settings. Real processes and a real SQLite file throughout."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from api.cli import app
from api.jobs.supervise import read_result, supervisor_argv, write_command
from api.service import PlanSearches
from api.settings import JOB_GRACE_S_ENV, MAX_JOBS_ENV, SEARCH_WORKERS_ENV, Settings, SettingsError, env_name
from api.store import ApiStore, JobRow, utc_now
from profiler.store import DATA_DIR_ENV, DATABASE_URL_ENV

TINY_SEARCH = Path(__file__).parents[2] / "executor" / "examples" / "tiny-llama-2cpu-search.json"


# ---------------------------------------------------------------------------------------------- settings


def test_settings_follow_the_environment_and_the_database_follows_the_data_dir(tmp_path, monkeypatch):
    monkeypatch.delenv("PARAPLAN_DATABASE_URL", raising=False)
    monkeypatch.setenv("PARAPLAN_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("PARAPLAN_MAX_JOBS", "3")
    settings = Settings.from_env()
    assert settings.data_dir == (tmp_path / "data").resolve()
    assert settings.database_url == f"sqlite:///{(tmp_path / 'data').resolve() / 'paraplan.db'}"
    assert settings.max_concurrent_jobs == 3 and settings.api_token is None
    moved = Settings.from_env(data_dir=tmp_path / "other")
    assert moved.database_url.endswith(f"{tmp_path / 'other'}/paraplan.db")


@pytest.mark.parametrize(
    ("variable", "value"),
    [("PARAPLAN_API_TOKEN", "short"), ("PARAPLAN_MAX_JOBS", "many"), ("PARAPLAN_MAX_JOBS", "0"),
     ("PARAPLAN_MAX_REQUEST_BYTES", "10"), ("PARAPLAN_MAX_JOB_PROCESSES", "0")],
)  # fmt: skip
def test_bad_settings_name_their_variable(tmp_path, monkeypatch, variable, value):
    monkeypatch.setenv("PARAPLAN_DATA_DIR", str(tmp_path))
    monkeypatch.setenv(variable, value)
    with pytest.raises(SettingsError, match=variable):
        Settings.from_env()


def test_every_setting_is_read_from_its_variable_and_an_empty_one_is_unset(tmp_path, monkeypatch):
    assert [env_name(name) for name in ("data_dir", "database_url", "max_concurrent_jobs")] == [
        DATA_DIR_ENV, DATABASE_URL_ENV, MAX_JOBS_ENV]  # fmt: skip
    monkeypatch.setenv(DATA_DIR_ENV, str(tmp_path))
    monkeypatch.setenv(JOB_GRACE_S_ENV, "2.5")
    monkeypatch.setenv(MAX_JOBS_ENV, "")
    monkeypatch.setenv(DATABASE_URL_ENV, "sqlite:///" + str(tmp_path / "elsewhere.db"))
    settings = Settings.from_env()
    assert settings.job_grace_s == 2.5 and settings.max_concurrent_jobs == 1
    assert settings.database_url.endswith("elsewhere.db")
    assert Settings.from_env(job_grace_s=9.0).job_grace_s == 9.0  # what the caller passes wins


def test_every_bad_setting_is_reported_at_once_and_a_bad_token_is_not_echoed(tmp_path, monkeypatch):
    monkeypatch.setenv(DATA_DIR_ENV, str(tmp_path))
    monkeypatch.setenv(MAX_JOBS_ENV, "two")
    monkeypatch.setenv(SEARCH_WORKERS_ENV, "-1")
    monkeypatch.setenv(JOB_GRACE_S_ENV, "nan")
    monkeypatch.setenv("PARAPLAN_API_TOKEN", "secret")
    with pytest.raises(SettingsError) as refused:
        Settings.from_env()
    message = str(refused.value)
    for variable, value in ((MAX_JOBS_ENV, "'two'"), (SEARCH_WORKERS_ENV, "'-1'"), (JOB_GRACE_S_ENV, "'nan'")):
        assert f"{variable}: " in message and value in message, message
    assert "PARAPLAN_API_TOKEN: use a token of at least 16 characters" in message and "secret" not in message


def test_serve_refuses_bad_settings_before_listening(tmp_path, monkeypatch):
    monkeypatch.setenv("PARAPLAN_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("PARAPLAN_API_TOKEN", "short")
    result = CliRunner().invoke(app, ["serve", "--port", "1"])
    assert result.exit_code == 1
    assert "PARAPLAN_API_TOKEN" in result.output and "Traceback" not in result.output


def test_serve_refuses_a_database_of_another_schema_version(tmp_path, monkeypatch):
    database = tmp_path / "paraplan.db"
    ApiStore(f"sqlite:///{database}").close()
    import sqlite3

    with sqlite3.connect(database) as connection:
        connection.execute("UPDATE paraplan_meta SET value = '999' WHERE key = 'schema_version'")
    monkeypatch.setenv("PARAPLAN_DATA_DIR", str(tmp_path))
    monkeypatch.delenv("PARAPLAN_DATABASE_URL", raising=False)
    result = CliRunner().invoke(app, ["serve", "--port", "1"])
    assert result.exit_code == 1
    assert "schema version 999" in result.output


# ------------------------------------------------------------------------------------------- supervisor


def _supervise(job_dir: Path, argv: list[str], grace_s: float = 5.0) -> subprocess.Popen[bytes]:
    job_dir.mkdir(parents=True, exist_ok=True)
    write_command(job_dir, argv, grace_s)
    return subprocess.Popen(supervisor_argv(job_dir), start_new_session=True)


def test_the_supervisor_records_the_output_and_the_exit_status(tmp_path):
    job_dir = tmp_path / "job"
    code = "import sys; print('hello from the job'); sys.exit(3)"
    assert _supervise(job_dir, [sys.executable, "-c", code]).wait(timeout=60) == 1
    assert read_result(job_dir) == {"returncode": 3, "cancelled": False}
    assert "hello from the job" in (job_dir / "output.log").read_text()


def test_sigterm_stops_the_command_and_everything_it_started(tmp_path):
    """The command starts a grandchild that ignores SIGTERM: after the grace period it is killed too."""
    job_dir = tmp_path / "job"
    code = (
        "import subprocess, sys, time;"
        "child = subprocess.Popen([sys.executable, '-c', "
        '\'import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print("ready", flush=True); '
        "time.sleep(600)']);"
        "time.sleep(600)"
    )
    supervisor = _supervise(job_dir, [sys.executable, "-c", code], grace_s=1.0)
    _wait_for(lambda: "ready" in (job_dir / "output.log").read_text(), 60)
    started = _pids_mentioning("time.sleep(600)")
    assert len(started) == 2
    supervisor.send_signal(signal.SIGTERM)
    supervisor.wait(timeout=60)
    assert read_result(job_dir)["cancelled"] is True
    _wait_for(lambda: not _pids_mentioning("time.sleep(600)"), 10)


def _pids_mentioning(text: str) -> list[int]:
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if text.encode() in cmdline.read_bytes() and int(cmdline.parent.name) != os.getpid():
                found.append(int(cmdline.parent.name))
        except OSError:
            continue
    return found


def _wait_for(condition, limit_s: float) -> None:
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        try:
            if condition():
                return
        except OSError:
            pass
        time.sleep(0.05)
    raise AssertionError("condition not reached in time")


# ------------------------------------------------------------------------------------------------ store


def _job(job_id: str, key: str | None = None) -> JobRow:
    return JobRow(id=job_id, kind="train", state="QUEUED", created=utc_now(), nproc=1, body="{}", body_hash="h",
                  idempotency_key=key)  # fmt: skip


def test_a_state_change_happens_only_from_the_states_given(tmp_path):
    store = ApiStore(f"sqlite:///{tmp_path / 'db.sqlite'}")
    store.add_job(_job("a" * 32))
    assert store.update_job("a" * 32, only_if_state=["QUEUED"], state="RUNNING")
    assert not store.update_job("a" * 32, only_if_state=["QUEUED"], state="CANCELLED")
    assert store.get_job("a" * 32).state == "RUNNING"
    store.close()


def test_an_idempotency_key_is_held_by_one_job(tmp_path):
    store = ApiStore(f"sqlite:///{tmp_path / 'db.sqlite'}")
    first, created = store.add_job(_job("a" * 32, key="retry-1"))
    again, created_again = store.add_job(_job("b" * 32, key="retry-1"))
    assert created and not created_again and again.id == first.id
    assert store.get_job("b" * 32) is None
    store.close()


# ----------------------------------------------------------------------------------------------- search


def test_concurrent_identical_searches_are_computed_once(tmp_path):
    store = ApiStore(f"sqlite:///{tmp_path / 'db.sqlite'}")
    searches = PlanSearches(store)  # no pool given: searches run in the calling thread, each run recorded
    body = json.loads(TINY_SEARCH.read_text())
    answers: list = []
    threads = [threading.Thread(target=lambda: answers.append(searches.search(body)[1])) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(searches.pool.recent_runs) == 1 and len(set(answers)) == 1 and len(answers) == 6
    other = {**body, "training": {**body["training"], "global_batch_size": 16}}
    searches.search(other)
    assert len(searches.pool.recent_runs) == 2
    store.close()


# ------------------------------------------------------------------------------------------ a failing job


@pytest.mark.slow
def test_a_job_whose_ranks_fail_is_failed_with_the_first_ranks_error(tmp_path):
    """run.json is broken after the job was accepted: every rank fails reading it, and the job's failure
    reason is torchrun's root cause (rank and message), not just an exit code."""
    from api.jobs.profile import ProfileJobs
    from api.jobs.runner import JobRunner
    from api.jobs.train import RUN_FOLDER, TrainJobs, prepare_train_job

    settings = Settings.from_env(data_dir=tmp_path, api_token=None)
    store = ApiStore(settings.database_url)
    body = json.loads((TINY_SEARCH.parent / "tiny-llama-2cpu.json").read_text()) | {"steps": 2}
    row = prepare_train_job(body, "f" * 32, store, settings)
    row.body, row.body_hash = json.dumps(body), "h"
    store.add_job(row)
    (settings.jobs_dir / row.id / RUN_FOLDER / "run.json").write_text('{"request": {}}')
    runner = JobRunner(store, settings, {"train": TrainJobs(store), "profile": ProfileJobs(store)})
    runner.start()
    try:
        _wait_for(lambda: store.get_job(row.id).state == "FAILED", 180)
    finally:
        runner.close()
    reason = store.get_job(row.id).failure_reason
    assert reason.startswith("training failed: rank ") and "ValidationError" in reason, reason
    assert store.measured_runs(job_id=row.id) == []
    store.close()
