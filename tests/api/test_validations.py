"""`POST /v1/validations`: `paraplan validate` as a job of the service, checked before it starts, run for real
(torchrun, gloo, 2 ranks), its measured runs and its calibrated profile stored in the service's database."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from planner.profiles import load_profile_json
from tests.api.test_routes import UNKNOWN_ID, error_of, job_folders, named_fields, wait_for_end

FIXTURE_PROFILE = Path(__file__).resolve().parents[1] / "unit" / "fixtures" / "validation" / "cpu-profile.json"
# The default model of `paraplan validate` (the fixture profile's), two of its plans, three steps each.
SMALL = {"nproc": 2, "steps": 3, "warm_steps": 1, "mbs": [4], "recompute": ["none"], "zero": [0],
         "schedule": ["1f1b"], "max_plans": 2, "confirm": 1}  # fmt: skip


def stored_fixture_profile(client: TestClient) -> str:
    return client.app.state.service.store.profiles.add(load_profile_json(FIXTURE_PROFILE), name="fixture")


def test_a_validation_needs_the_token(idle_client: TestClient):
    error_of(idle_client.post("/v1/validations", json=SMALL), 401, "unauthorized")


@pytest.mark.parametrize(
    ("body", "kind", "field"),
    [
        (SMALL | {"warm_steps": 3}, "bad_input", "warm_steps"),
        (SMALL | {"steps": 1}, "invalid_request", "steps"),
        (SMALL | {"profile": UNKNOWN_ID}, "bad_input", "profile"),
        (SMALL | {"nproc": 64}, "bad_input", "nproc"),
        (SMALL | {"recompute": ["sometimes"]}, "invalid_request", "recompute.0"),
        (SMALL | {"model": {"name": "llama3-8b", "num_layers": 0}}, "bad_input", "model.num_layers"),
        (SMALL | {"unknown": 1}, "invalid_request", "unknown"),
        (SMALL | {"paired": True, "passes": 2}, "bad_input", "paired"),
        (SMALL | {"techniques": ["tp"]}, "invalid_request", "techniques.0"),
        (SMALL | {"techniques": ["cp", "cp"]}, "bad_input", "techniques"),
    ],
)
def test_bad_validations_name_the_field_and_start_nothing(
    idle_client: TestClient,
    auth_headers: dict[str, str],
    data_dir: Path,
    body: dict[str, Any],
    kind: str,
    field: str,
):
    error = error_of(idle_client.post("/v1/validations", json=body, headers=auth_headers), 422, kind)
    assert field in named_fields(error), error
    assert job_folders(data_dir) == []


@pytest.mark.parametrize("paired", [True, False])
def test_paired_reaches_the_command_as_its_switch(
    idle_client: TestClient, auth_headers: dict[str, str], data_dir: Path, paired: bool
):
    """The job's options record, read as the job's process reads it, asks for a paired validation or not, and the
    job's command runs that record (the paired validation itself: tests/distributed/test_validate.py)."""
    import json

    from api.commands.run import RECORD_FILE, argv, read_record
    from api.jobs.supervise import COMMAND_FILE

    accepted = idle_client.post("/v1/validations", json=SMALL | {"paired": paired}, headers=auth_headers)
    assert accepted.status_code == 202, accepted.text
    (job_id,) = job_folders(data_dir)
    record = data_dir / "jobs" / job_id / RECORD_FILE
    assert json.loads((data_dir / "jobs" / job_id / COMMAND_FILE).read_text())["argv"] == argv(record)
    command, options = read_record(record)
    assert command == "validate"
    assert options.paired is paired  # type: ignore[attr-defined]


def test_techniques_reach_the_command(idle_client: TestClient, auth_headers: dict[str, str], data_dir: Path):
    """The job's options record asks for the technique entries the body names (run: tests/distributed/
    test_validate.py); without them, none (the default)."""
    from api.commands.run import RECORD_FILE, read_record

    accepted = idle_client.post("/v1/validations", json=SMALL | {"techniques": ["cp", "ep"]}, headers=auth_headers)
    assert accepted.status_code == 202, accepted.text
    (job_id,) = job_folders(data_dir)
    _, options = read_record(data_dir / "jobs" / job_id / RECORD_FILE)
    assert options.techniques == ("cp", "ep")  # type: ignore[attr-defined]


def test_a_space_without_two_runnable_plans_is_refused(idle_client: TestClient, auth_headers: dict[str, str]):
    body = SMALL | {"mbs": [3]}  # divides no per-replica batch of the default global batch (8)
    error = error_of(idle_client.post("/v1/validations", json=body, headers=auth_headers), 422, "bad_input")
    assert "validating needs two" in error["message"]


def test_a_validation_runs_its_plans_and_stores_runs_and_calibrated_profile(
    client: TestClient, auth_headers: dict[str, str]
):
    body = SMALL | {"profile": stored_fixture_profile(client)}
    accepted = client.post("/v1/validations", json=body, headers=auth_headers)
    assert accepted.status_code == 202, accepted.text
    job = accepted.json()
    assert job["kind"] == "validate" and accepted.headers["location"] == f"/v1/validations/{job['id']}"

    view = wait_for_end(client, f"/v1/validations/{job['id']}", timeout_s=300)
    assert view["state"] == "SUCCEEDED", view
    figures = view["figures"]
    assert figures["measured"] == 2 and {"mape", "kendall_tau", "regret", "calibrated"} <= set(figures)
    assert len(view["measured_runs"]) == 2
    assert all(run["measured_step_time_s"] > 0 and run["plan"]["pp"] in (1, 2) for run in view["measured_runs"])
    assert view["calibrated_profile_id"] == job["id"]

    report = client.get(view["links"]["report"])
    assert report.status_code == 200 and report.headers["content-type"].startswith("text/markdown")
    assert "| step-time MAPE |" in report.text and "Finalists (the plans predicted and measured fastest)" in report.text
    plot = client.get(view["links"]["plot"])
    assert plot.status_code == 200 and plot.content[:4] == b"\x89PNG"
    assert [v["id"] for v in client.get("/v1/validations").json()["validations"]] == [job["id"]]

    # The calibrated profile, stored under the job's id, is what an estimate's cluster.profile then takes.
    request = {"model": {"name": "llama3-8b", "num_layers": 4, "hidden_size": 256, "num_attention_heads": 4,
                         "num_kv_heads": 2, "ffn_hidden_size": 704, "vocab_size": 256},
               "training": {"seq_len": 128, "global_batch_size": 8, "precision": "fp32"},
               "cluster": {"gpu": "cpu", "num_nodes": 1, "gpus_per_node": 2, "profile": job["id"]},
               "plan": {"dp": 2, "micro_batch_size": 4}}  # fmt: skip
    estimate = client.post("/v1/estimates", json=request)
    assert estimate.status_code == 200, estimate.text
    assert estimate.json()["sources"]["compute_s"] == "profile"


def test_results_of_an_unfinished_or_unknown_validation_are_not_found(
    idle_client: TestClient, auth_headers: dict[str, str]
):
    job = idle_client.post("/v1/validations", json=SMALL, headers=auth_headers).json()
    error_of(idle_client.get(f"/v1/validations/{job['id']}/report"), 404, "not_found")
    error_of(idle_client.get(f"/v1/validations/{UNKNOWN_ID}"), 404, "not_found")
