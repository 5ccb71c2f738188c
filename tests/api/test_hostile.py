"""Hostile and careless input (issue 31): numbers that do not fit, text that does not encode, jobs that ask too
much, stored searches without end, a redirect to the Host header, a blank token. Each is refused at the edge
(422 naming the field, or a clear message at start), never a 500."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from planner.presets import gpu_preset
from tests.api.test_routes import PROFILE_BODY, error_of, job_folders, named_fields, search_of
from tests.api.test_validations import SMALL as SMALL_VALIDATION


def post_raw(client: TestClient, path: str, text: str, headers: dict[str, str] | None = None) -> Any:
    """POST `text` as the JSON body, byte for byte (`Infinity` and lone surrogate escapes are not what a JSON
    encoder of the client would write)."""
    return client.post(path, content=text.encode(), headers={"Content-Type": "application/json", **(headers or {})})


@pytest.fixture
def hostile_client(app_factory: Callable[..., Any]) -> TestClient:
    """A client that answers a server error as a 500 (instead of raising it in the test), job runner not started."""
    return TestClient(app_factory(), raise_server_exceptions=False)


# ================================================================================ numbers that do not fit

OVERFLOWING = ["Infinity", "-Infinity", "1e999", "NaN"]
INTEGER_FIELDS = [("cluster", "num_nodes"), ("cluster", "gpus_per_node"), ("plan", "tp"), ("plan", "pp"),
                  ("plan", "cp")]  # fmt: skip


def _with_raw(request: dict[str, Any], section: str, name: str, raw: str) -> str:
    """The request as JSON text with `section.name` set to the raw JSON `raw` (and no `plan.dp`, so that the
    edge infers it from the sizes, where the overflow was)."""
    request = request | {"plan": {k: v for k, v in request["plan"].items() if k != "dp"}}
    request[section] = request[section] | {name: "__RAW__"}
    return json.dumps(request).replace('"__RAW__"', raw)


@pytest.mark.parametrize("raw", OVERFLOWING)
@pytest.mark.parametrize(("section", "name"), INTEGER_FIELDS)
def test_a_number_that_does_not_fit_is_a_422_naming_the_field(
    hostile_client: TestClient, tiny_request: dict[str, Any], auth_headers: dict[str, str], data_dir: Path,
    section: str, name: str, raw: str,
) -> None:  # fmt: skip
    text = _with_raw(tiny_request, section, name, raw)
    error = error_of(post_raw(hostile_client, "/v1/estimates", text), 422, "invalid_request")
    assert f"{section}.{name}" in named_fields(error)
    job = text[:-1] + ', "steps": 1}'
    error = error_of(post_raw(hostile_client, "/v1/jobs", job, auth_headers), 422, "invalid_request")
    assert f"{section}.{name}" in named_fields(error)
    assert job_folders(data_dir) == []


@pytest.mark.parametrize("value", [True, False, 8.0, "8", 2.5])
@pytest.mark.parametrize(("section", "name"), [("model", "num_layers"), ("plan", "dp"), ("plan", "zero_stage"),
                                              ("training", "seq_len"), ("cluster", "gpus_per_node")])  # fmt: skip
def test_an_integer_field_takes_only_an_integer(
    hostile_client: TestClient, tiny_request: dict[str, Any], section: str, name: str, value: Any
) -> None:
    tiny_request[section][name] = value
    error = error_of(hostile_client.post("/v1/estimates", json=tiny_request), 422, "invalid_request")
    assert f"{section}.{name}" in named_fields(error)


@pytest.mark.parametrize("raw", [*OVERFLOWING, "true", '"0.5"'])
@pytest.mark.parametrize(
    ("path", "section", "name"),
    [
        ("/v1/estimates", "cluster", "intra_node_GBps"),
        ("/v1/estimates", "cluster", "inter_node_GBps"),
        ("/v1/estimates", "model", "dropout"),
        ("/v1/plans", "search", "max_memory_fraction"),
    ],
)
def test_a_float_field_takes_only_a_finite_number(
    hostile_client: TestClient, tiny_request: dict[str, Any], path: str, section: str, name: str, raw: str
) -> None:
    body = search_of(tiny_request) if path == "/v1/plans" else tiny_request
    body[section] = body[section] | {name: "__RAW__"}
    text = json.dumps(body).replace('"__RAW__"', raw)
    error = error_of(post_raw(hostile_client, path, text), 422, "invalid_request")
    assert f"{section}.{name}" in named_fields(error)


def test_a_custom_gpu_takes_only_finite_numbers(hostile_client: TestClient, tiny_request: dict[str, Any]) -> None:
    gpu = gpu_preset("a100-80gb").model_dump(mode="json")
    tiny_request["cluster"]["gpu"] = gpu | {"hbm_GBps": "__RAW__"}
    text = json.dumps(tiny_request).replace('"__RAW__"', "Infinity")
    error = error_of(post_raw(hostile_client, "/v1/estimates", text), 422, "invalid_request")
    assert "cluster.gpu.hbm_GBps" in named_fields(error)


@pytest.mark.parametrize(
    ("path", "body", "field"),
    [
        ("/v1/jobs", {"steps": True}, "steps"),
        ("/v1/jobs", {"steps": 1, "lr": "__INF__"}, "lr"),
        ("/v1/jobs", {"steps": 1, "seed": 1.0}, "seed"),
        ("/v1/profiles", PROFILE_BODY | {"repeats": True}, "repeats"),
        ("/v1/profiles", PROFILE_BODY | {"seq_len": ["__INF__"]}, "seq_len.0"),
        ("/v1/validations", SMALL_VALIDATION | {"nproc": 2.0}, "nproc"),
        ("/v1/validations", SMALL_VALIDATION | {"zero": [True]}, "zero.0"),
    ],
)
def test_job_bodies_take_only_integers_and_finite_numbers(
    hostile_client: TestClient, tiny_request: dict[str, Any], auth_headers: dict[str, str], data_dir: Path,
    path: str, body: dict[str, Any], field: str,
) -> None:  # fmt: skip
    body = (tiny_request | body) if path == "/v1/jobs" else body
    text = json.dumps(body).replace('"__INF__"', "Infinity")
    error = error_of(post_raw(hostile_client, path, text, auth_headers), 422, "invalid_request")
    assert field in named_fields(error)
    assert job_folders(data_dir) == []


# ============================================================================== text that does not encode

SURROGATE, NUL = "\ud800", "\x00"


def _custom_model(request: dict[str, Any], name: str) -> dict[str, Any]:
    """The request's model in full (no preset), named `name`."""
    model = {"name": name, "num_layers": 4, "hidden_size": 128, "num_attention_heads": 4, "num_kv_heads": 2,
             "ffn_hidden_size": 352, "vocab_size": 256, "mlp": "swiglu", "norm": "rmsnorm"}  # fmt: skip
    return request | {"model": model}


@pytest.mark.parametrize("bad", [SURROGATE, NUL, f"gpt{SURROGATE}x"])
def test_a_model_name_that_does_not_encode_is_a_422_naming_it(
    hostile_client: TestClient, tiny_request: dict[str, Any], auth_headers: dict[str, str], data_dir: Path, bad: str
) -> None:
    request = _custom_model(tiny_request, bad)
    for path, body, headers in [
        ("/v1/estimates", request, None),
        ("/v1/plans", search_of(request), None),
        ("/v1/jobs", request | {"steps": 1}, auth_headers),
    ]:
        error = error_of(post_raw(hostile_client, path, json.dumps(body), headers), 422, "invalid_request")
        assert "model.name" in named_fields(error), path
    assert hostile_client.get("/v1/plans").json()["plans"] == []
    assert job_folders(data_dir) == []


@pytest.mark.parametrize(
    ("path", "body", "field"),
    [
        ("/v1/jobs", {"steps": 1, "data": f"corpus{NUL}.txt"}, "data"),
        ("/v1/jobs", {"steps": 1, "data": SURROGATE}, "data"),
        ("/v1/jobs", {"steps": 1, "plan_id": f"{NUL}"}, "plan_id"),
        ("/v1/profiles", PROFILE_BODY | {"name": SURROGATE}, "name"),
        ("/v1/profiles", PROFILE_BODY | {"model": f"llama{NUL}"}, "model"),
        ("/v1/validations", SMALL_VALIDATION | {"gpu": f"h100{NUL}"}, "gpu"),
        ("/v1/validations", SMALL_VALIDATION | {"profile": SURROGATE}, "profile"),
    ],
)
def test_job_text_that_does_not_encode_is_a_422_naming_it(
    hostile_client: TestClient, tiny_request: dict[str, Any], auth_headers: dict[str, str], data_dir: Path,
    path: str, body: dict[str, Any], field: str,
) -> None:  # fmt: skip
    if path == "/v1/jobs":
        body = (tiny_request if "plan_id" not in body else {}) | body
    error = error_of(post_raw(hostile_client, path, json.dumps(body), auth_headers), 422, "invalid_request")
    assert field in named_fields(error)
    assert job_folders(data_dir) == []


def test_the_cluster_profile_reference_must_encode(hostile_client: TestClient, tiny_request: dict[str, Any]) -> None:
    tiny_request["cluster"]["profile"] = f"abc{SURROGATE}"
    error = error_of(post_raw(hostile_client, "/v1/estimates", json.dumps(tiny_request)), 422, "invalid_request")
    assert "cluster.profile" in named_fields(error)


# ======================================================================================================== limits


@pytest.mark.parametrize(
    ("sizes", "fields"),
    [
        ({"seq_len": [10**12]}, {"seq_len"}),
        ({"mbs": [10**9]}, {"mbs"}),
        ({"seq_len": [2**17], "mbs": [1, 16]}, {"seq_len", "mbs"}),  # each fits alone, not their product
    ],
    ids=["seq_len", "mbs", "product"],
)
def test_a_profile_too_large_to_allocate_is_refused_before_it_is_accepted(
    hostile_client: TestClient, auth_headers: dict[str, str], data_dir: Path, sizes: dict[str, Any], fields: set[str]
) -> None:
    response = hostile_client.post("/v1/profiles", json=PROFILE_BODY | sizes, headers=auth_headers)
    error = error_of(response, 422, "bad_input")
    assert named_fields(error) == fields
    assert "1048576" in error["message"] and "allocat" in error["message"]
    assert job_folders(data_dir) == []


def test_a_profile_at_the_token_bound_is_accepted(
    hostile_client: TestClient, auth_headers: dict[str, str], data_dir: Path
) -> None:
    body = PROFILE_BODY | {"seq_len": [2**18], "mbs": [4]}
    assert hostile_client.post("/v1/profiles", json=body, headers=auth_headers).status_code == 202


@pytest.mark.parametrize(
    ("sizes", "fields"),
    [
        ({"seq_len": 2**20, "mbs": [2]}, {"seq_len", "mbs"}),
        ({"seq_len": 2**19, "global_batch": 8, "mbs": None}, {"seq_len", "global_batch"}),  # the search: mbs to 8
        ({"mbs": [2**21]}, {"mbs"}),
    ],
    ids=["mbs", "global_batch", "mbs-alone"],
)
def test_a_validation_too_large_to_allocate_is_refused_before_it_is_accepted(
    hostile_client: TestClient, auth_headers: dict[str, str], data_dir: Path, sizes: dict[str, Any], fields: set[str]
) -> None:
    body = SMALL_VALIDATION | sizes
    error = error_of(hostile_client.post("/v1/validations", json=body, headers=auth_headers), 422, "bad_input")
    assert named_fields(error) == fields
    assert job_folders(data_dir) == []


@pytest.mark.parametrize("field", ["profile", "gpu"])
def test_an_empty_validation_reference_is_refused_not_read_as_none(
    hostile_client: TestClient, auth_headers: dict[str, str], data_dir: Path, field: str
) -> None:
    body = SMALL_VALIDATION | {field: ""}
    error = error_of(hostile_client.post("/v1/validations", json=body, headers=auth_headers), 422, "invalid_request")
    assert field in named_fields(error)
    assert job_folders(data_dir) == []


def _search(client: TestClient, request: dict[str, Any]) -> str:
    response = client.post("/v1/plans", json=search_of(request, 1))
    assert response.status_code == 201, response.text
    return response.json()["id"]


def test_stored_searches_keep_the_newest_and_those_jobs_run(
    app_factory: Callable[..., Any], tiny_request: dict[str, Any], auth_headers: dict[str, str]
) -> None:
    client = TestClient(app_factory(max_stored_plans=2))  # job runner not started: the job stays QUEUED
    run = _search(client, tiny_request)
    job = client.post("/v1/jobs", json={"plan_id": run, "steps": 1}, headers=auth_headers)
    assert job.status_code == 202, job.text
    ids = [_search(client, tiny_request) for _ in range(4)]
    listed = {plan["id"] for plan in client.get("/v1/plans").json()["plans"]}
    assert listed == {run, *ids[-2:]}
    for dropped in ids[:2]:
        error_of(client.get(f"/v1/plans/{dropped}"), 404, "not_found")
    assert client.get(f"/v1/plans/{run}").status_code == 200


def test_the_stored_search_limit_is_a_setting(monkeypatch: pytest.MonkeyPatch, data_dir: Path) -> None:
    from api.settings import MAX_STORED_PLANS_ENV, Settings, SettingsError

    monkeypatch.setenv(MAX_STORED_PLANS_ENV, "7")
    assert Settings.from_env().max_stored_plans == 7
    monkeypatch.setenv(MAX_STORED_PLANS_ENV, "0")
    with pytest.raises(SettingsError, match=MAX_STORED_PLANS_ENV):
        Settings.from_env()


# ========================================================================================= redirect, token


@pytest.mark.parametrize("method", ["GET", "POST"])
@pytest.mark.parametrize("path", ["/v1/jobs/", "/v1/plans/", "/v1/estimates/", "/healthz/"])
def test_a_trailing_slash_is_not_redirected_to_the_host_header(
    hostile_client: TestClient, auth_headers: dict[str, str], method: str, path: str
) -> None:
    headers = auth_headers | {"Host": "attacker.example"}
    response = hostile_client.request(method, path, json={}, headers=headers, follow_redirects=False)
    error_of(response, 404, "not_found")
    assert "location" not in response.headers


@pytest.mark.parametrize("token", [" " * 16, "\t" * 20, " " * 8 + "\n" * 8])
def test_a_blank_token_is_refused_at_start(data_dir: Path, monkeypatch: pytest.MonkeyPatch, token: str) -> None:
    from typer.testing import CliRunner

    from api.cli.app import app as cli
    from api.settings import API_TOKEN_ENV, Settings, SettingsError

    with pytest.raises(SettingsError, match="blank"):
        Settings.from_env(api_token=token)
    monkeypatch.setenv(API_TOKEN_ENV, token)
    result = CliRunner().invoke(cli, ["serve", "--port", "1"])
    assert result.exit_code == 1
    assert API_TOKEN_ENV in result.output and "blank" in result.output and "Traceback" not in result.output


def test_a_token_with_whitespace_at_its_ends_is_refused(data_dir: Path) -> None:
    from api.settings import API_TOKEN_ENV, Settings, SettingsError

    with pytest.raises(SettingsError, match=API_TOKEN_ENV):
        Settings.from_env(api_token=" paraplan-test-token-0123456789 ")
