"""The REST service's routes, in-process (TestClient) over a real SQLite database in a temporary data folder.

Every answer is checked by status and body; every error by the common shape `{"error": {"kind", "message",
...}}` and the field it names. Three tests run real jobs (a training run, a cancelled run, a compute profile)
and are marked slow; the others start nothing, or accept jobs on a server whose job runner is not started.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from httpx import Response

from executor.config import RunDir

FINAL_STATES = {"SUCCEEDED", "FAILED", "CANCELLED"}
UNKNOWN_ID = "0123456789abcdef0123456789abcdef"
TINY_PROFILE_MODEL = {"name": "llama3-8b", "num_layers": 2, "hidden_size": 64, "num_attention_heads": 2,
                      "num_kv_heads": 2, "ffn_hidden_size": 128, "vocab_size": 256}  # fmt: skip
PROFILE_BODY = {"what": "compute", "name": "tiny-cpu", "model": TINY_PROFILE_MODEL, "seq_len": [32], "mbs": [1],
                "recompute": ["none"], "repeats": 2, "warmup": 1, "threads": 1}  # fmt: skip


# ================================================================================================ helpers


def error_of(response: Response, status: int, kind: str) -> dict[str, Any]:
    """The error of an answer that must be `status` with the common error body of `kind`."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert list(body) == ["error"], body
    error = body["error"]
    assert error["kind"] == kind, error
    assert isinstance(error["message"], str) and error["message"], error
    return error


def named_fields(error: dict[str, Any]) -> set[str]:
    """The fields an error names, in `fields` or in `violations`."""
    return {entry["field"] for entry in error.get("fields", []) + error.get("violations", [])}


def job_folders(data_dir: Path) -> list[str]:
    folder = data_dir / "jobs"
    return sorted(path.name for path in folder.iterdir()) if folder.is_dir() else []


def search_of(request: dict[str, Any], top_k: int = 3) -> dict[str, Any]:
    """The plan search for a contract request's model, training and cluster."""
    return {key: request[key] for key in ("model", "training", "cluster")} | {"search": {"top_k": top_k}}


def wait_for(
    client: TestClient, path: str, done: Callable[[dict[str, Any]], bool], timeout_s: float, what: str
) -> dict[str, Any]:
    """Poll GET `path` until `done(view)`; fail after `timeout_s`, or if the job ends before."""
    deadline = time.monotonic() + timeout_s
    while True:
        response = client.get(path)
        assert response.status_code == 200, response.text
        view = response.json()
        if done(view):
            return view
        assert view["state"] not in FINAL_STATES, f"{path} ended before {what}: {view}"
        assert time.monotonic() < deadline, f"{path}: not {what} after {timeout_s} s: {view}"
        time.sleep(0.25)


def wait_for_end(client: TestClient, path: str, timeout_s: float) -> dict[str, Any]:
    return wait_for(client, path, lambda view: view["state"] in FINAL_STATES, timeout_s, "ended")


def sse_events(text: str) -> list[dict[str, str]]:
    """Server-sent events as {field: value} (each event here has one line per field); comment lines (the keep-alive
    pings) are skipped, as the SSE spec tells clients to."""
    events = []
    for block in text.split("\n\n"):
        fields = [line.partition(": ")[::2] for line in block.split("\n") if line and not line.startswith(":")]
        if fields:
            events.append(dict(fields))
    return events


def post_job(client: TestClient, body: dict[str, Any], headers: dict[str, str]) -> dict[str, Any]:
    response = client.post("/v1/jobs", json=body, headers=headers)
    assert response.status_code == 202, response.text
    job = response.json()
    assert response.headers["Location"] == f"/v1/jobs/{job['id']}"
    return job


@pytest.fixture
def strict_limits_client(app_factory: Callable[..., Any]) -> Iterator[TestClient]:
    """A server that allows 8 processes per job, whatever this machine's core count."""
    with TestClient(app_factory(max_job_processes=8)) as started:
        yield started


# ========================================================================================= health, catalog


def test_health_and_readiness(client: TestClient) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200
    assert ready.json() == {"status": "ready"}


def test_readiness_needs_the_job_runner(idle_client: TestClient) -> None:
    """Without its lifespan the server's job runner never started: not ready (503), in the common shape."""
    error_of(idle_client.get("/readyz"), 503, "not_ready")


def test_catalog_lists_the_presets(client: TestClient) -> None:
    models = client.get("/v1/catalog/models")
    assert models.status_code == 200
    by_name = {model["name"]: model for model in models.json()}
    assert {"llama3-8b", "gpt3-175b", "mistral-7b"} <= set(by_name)
    assert 7e9 < by_name["llama3-8b"]["params"] < 9e9
    assert by_name["llama3-8b"]["spec"]["num_layers"] == 32

    gpus = client.get("/v1/catalog/gpus")
    assert gpus.status_code == 200
    gpu_specs = {gpu["name"]: gpu["spec"] for gpu in gpus.json()}
    assert {"h100-sxm", "a100-80gb", "cpu"} <= set(gpu_specs)
    assert gpu_specs["h100-sxm"]["memory_bytes"] >= 80e9


# ============================================================================================== estimates


def test_an_estimate_of_a_valid_request(client: TestClient, tiny_request: dict[str, Any]) -> None:
    response = client.post("/v1/estimates", json=tiny_request)
    assert response.status_code == 200, response.text
    estimate = response.json()
    assert estimate["step_time_s"] > 0
    assert estimate["fits"] is True
    assert estimate["memory"]["peak_bytes"] > 0
    assert len(estimate["memory"]["by_stage"]) == 1  # pp 1
    breakdown = estimate["breakdown"]
    terms = {"compute_s", "tp_comm_s", "cp_comm_s", "pp_comm_s", "dp_comm_s", "bubble_s", "optimizer_s"}
    assert terms <= set(breakdown)
    assert math.isclose(sum(breakdown.values()), estimate["step_time_s"], rel_tol=1e-9)


def test_an_estimate_carries_its_error_band(idle_client: TestClient, tiny_request: dict[str, Any]) -> None:
    """A Megatron-LM plan on many nodes has validated runs, hence a band around its step time; the executor on CPUs
    has none, and the answer says so instead of making one up."""
    megatron = {"model": {"name": "gpt3-175b"},
                "training": {"seq_len": 2048, "global_batch_size": 1536, "framework": "megatron"},
                "cluster": {"gpu": "a100-80gb", "num_nodes": 128}, "plan": {"tp": 8, "pp": 8}}  # fmt: skip
    estimate = idle_client.post("/v1/estimates", json=megatron).json()
    band = estimate["uncertainty"]
    assert (band["regime"], band["scale"], band["coverage"]) == ("megatron", "several nodes", 0.9)
    assert math.isclose(band["step_time_low_s"], estimate["step_time_s"] * band["step_time_low_ratio"])
    assert math.isclose(band["step_time_high_s"], estimate["step_time_s"] * band["step_time_high_ratio"])
    assert band["step_time_runs"] >= 5 and band["peak_bytes_high"] is None

    cpu = idle_client.post("/v1/estimates", json=tiny_request).json()["uncertainty"]
    assert cpu["step_time_low_s"] is None and cpu["step_time_runs"] == 0
    assert cpu["step_time_basis"] == "no validated runs for regime paraplan-cpu on one node yet"


def test_an_estimate_of_an_invalid_plan_names_the_plan_field(client: TestClient, tiny_request: dict[str, Any]) -> None:
    tiny_request["plan"] |= {"dp": 1, "tp": 3}  # 3 divides neither the 4 heads nor the cluster's 2 GPUs
    error = error_of(client.post("/v1/estimates", json=tiny_request), 422, "invalid_plan")
    assert "plan.tp" in named_fields(error)
    assert all(violation["message"] for violation in error["violations"])


def test_an_offload_over_the_node_ram_is_a_422_naming_the_field_and_the_bytes(
    client: TestClient, tiny_request: dict[str, Any]
) -> None:
    tiny_request["cluster"] = {"gpu": "h100-sxm", "gpus_per_node": 2, "host_memory_per_node_bytes": 1000}
    tiny_request["plan"] = {"dp": 2, "zero_stage": 3, "offload": "optimizer_and_params"}
    tiny_request["training"].pop("precision", None)
    error = error_of(client.post("/v1/estimates", json=tiny_request), 422, "invalid_plan")
    (violation,) = error["violations"]
    assert violation["field"] == "cluster.host_memory_per_node_bytes" and violation["code"] == "host_memory_exceeded"
    assert "over by" in violation["message"]


@pytest.mark.parametrize(
    ("section", "name", "value", "field"),
    [
        ("training", "seq_len", 0, "training.seq_len"),
        ("training", "seq_len", "long", "training.seq_len"),
        ("training", "precision", "fp8", "training.precision"),
        ("plan", "recompute", "sometimes", "plan.recompute"),
        ("cluster", "gpus_per_node", -1, "cluster.gpus_per_node"),
        ("model", "hidden_size", 0, "model.hidden_size"),
    ],
)
def test_a_schema_error_names_the_field(
    client: TestClient, tiny_request: dict[str, Any], section: str, name: str, value: Any, field: str
) -> None:
    tiny_request[section][name] = value
    error = error_of(client.post("/v1/estimates", json=tiny_request), 422, "invalid_request")
    assert field in named_fields(error)


def test_bf16_on_a_gpu_without_bf16_is_a_422_naming_the_precision(
    client: TestClient, tiny_request: dict[str, Any]
) -> None:
    tiny_request["cluster"]["gpu"] = "v100-sxm2-32gb"
    tiny_request["training"]["precision"] = "bf16"
    error = error_of(client.post("/v1/estimates", json=tiny_request), 422, "invalid_request")
    assert error["fields"] == [
        {"field": "training.precision",
         "message": "bf16 is not supported by v100-sxm2-32gb, which has no bf16 tensor cores: use fp16"}
    ]  # fmt: skip
    error = error_of(client.post("/v1/plans", json=search_of(tiny_request)), 422, "invalid_request")
    assert named_fields(error) == {"training.precision"}
    del tiny_request["training"]["precision"]  # left out: a V100 trains fp16
    response = client.post("/v1/estimates", json=tiny_request)
    assert response.status_code == 200, response.text
    assert any("no bf16 tensor cores" in note for note in response.json()["assumptions"])


def test_an_estimate_on_a_custom_gpu_object(client: TestClient, tiny_request: dict[str, Any]) -> None:
    """`cluster.gpu` may be a full GPU object instead of a preset name (docs/contract.md); its faults are named."""
    gpu = client.get("/v1/catalog/gpus").json()[0]["spec"] | {"name": "my-gpu"}
    tiny_request["cluster"]["gpu"] = gpu
    response = client.post("/v1/estimates", json=tiny_request)
    assert response.status_code == 200, response.text
    assert response.json()["memory"]["capacity_bytes"] == gpu["memory_bytes"]
    tiny_request["cluster"]["gpu"] = gpu | {"peak_tflops": {"bf16": 1.0}}
    error = error_of(client.post("/v1/estimates", json=tiny_request), 422, "invalid_request")
    assert "cluster.gpu.peak_tflops" in named_fields(error)


def test_a_missing_section_is_named(client: TestClient, tiny_request: dict[str, Any]) -> None:
    del tiny_request["training"]
    error = error_of(client.post("/v1/estimates", json=tiny_request), 422, "invalid_request")
    assert named_fields(error) == {"training"}


@pytest.mark.parametrize(
    ("section", "value", "closest"),
    [("model", {"name": "llama9-8b"}, "llama3-8b"), ("model", "llama3-8bb", "llama3-8b")],
)
def test_an_unknown_model_preset(
    client: TestClient, tiny_request: dict[str, Any], section: str, value: Any, closest: str
) -> None:
    tiny_request[section] = value
    error = error_of(client.post("/v1/estimates", json=tiny_request), 422, "unknown_preset")
    assert closest in error["closest"]


def test_an_unknown_gpu_preset(client: TestClient, tiny_request: dict[str, Any]) -> None:
    tiny_request["cluster"]["gpu"] = "h100-sxn"
    error = error_of(client.post("/v1/estimates", json=tiny_request), 422, "unknown_preset")
    assert "h100-sxm" in error["closest"]


@pytest.mark.parametrize(
    "raw",
    [b"{not json", b"[1, 2]", b'"a string"', b"42", b"null", b"", b"\xff\xfe{}", b"[" * 100_000],
    ids=["malformed", "array", "string", "number", "null", "empty", "not-utf8", "too-deep"],
)
def test_a_body_that_is_not_a_json_object_names_the_body(client: TestClient, raw: bytes) -> None:
    for path in ("/v1/estimates", "/v1/plans"):
        response = client.post(path, content=raw, headers={"Content-Type": "application/json"})
        error = error_of(response, 422, "invalid_request")
        assert named_fields(error) == {"body"}


@pytest.mark.parametrize(
    "reference",
    ["/etc/passwd", "../paraplan.db", "~/.bashrc", "executor/examples/tiny-llama-2cpu.json", "paraplan.db", "file"],
)
def test_a_profile_named_by_path_is_never_read(
    client: TestClient, tiny_request: dict[str, Any], tmp_path: Path, reference: str
) -> None:
    """`cluster.profile` takes stored ids only: the service reads no file a request names, whether it exists
    (a file in the working directory, one the test wrote) or not."""
    if reference == "file":
        written = tmp_path / "profile.json"
        written.write_text("{}")
        reference = str(written)
    tiny_request["cluster"]["profile"] = reference
    error = error_of(client.post("/v1/estimates", json=tiny_request), 422, "bad_profile")
    assert named_fields(error) == {"cluster.profile"}


def test_an_unknown_profile_id_is_refused(client: TestClient, tiny_request: dict[str, Any]) -> None:
    tiny_request["cluster"]["profile"] = UNKNOWN_ID
    error = error_of(client.post("/v1/estimates", json=tiny_request), 422, "bad_profile")
    assert named_fields(error) == {"cluster.profile"}
    search = search_of(tiny_request)
    error = error_of(client.post("/v1/plans", json=search), 422, "bad_profile")
    assert named_fields(error) == {"cluster.profile"}


# ================================================================================================== plans


def test_a_plan_search_is_stored_listed_and_shown(client: TestClient, tiny_request: dict[str, Any]) -> None:
    search = search_of(tiny_request, top_k=3)
    created = client.post("/v1/plans", json=search)
    assert created.status_code == 201, created.text
    stored = created.json()
    assert created.headers["Location"] == f"/v1/plans/{stored['id']}"
    assert stored["links"]["self"] == created.headers["Location"]
    assert stored["request"] == search
    ranked = stored["result"]["plans"]
    assert 1 <= len(ranked) <= 3
    assert stored["found"] == len(ranked)
    times = [entry["estimate"]["step_time_s"] for entry in ranked]
    assert times == sorted(times)  # fastest first
    assert stored["best_step_time_s"] == times[0]
    for entry in ranked:
        plan = entry["plan"]
        assert plan["dp"] * plan["tp"] * plan["pp"] * plan["cp"] == 2
        assert entry["estimate"]["fits"] is True

    listed = client.get("/v1/plans")
    assert listed.status_code == 200
    summaries = listed.json()["plans"]
    assert [summary["id"] for summary in summaries] == [stored["id"]]
    assert summaries[0]["found"] == len(ranked) and summaries[0]["num_gpus"] == 2

    shown = client.get(f"/v1/plans/{stored['id']}")
    assert shown.status_code == 200
    assert shown.json() == stored


@pytest.mark.parametrize("plan_id", [UNKNOWN_ID, "nope"])
def test_an_unknown_plan_search_is_not_found(client: TestClient, plan_id: str) -> None:
    error_of(client.get(f"/v1/plans/{plan_id}"), 404, "not_found")


def test_the_same_search_twice_gets_two_ids_and_one_answer(client: TestClient, tiny_request: dict[str, Any]) -> None:
    first = client.post("/v1/plans", json=search_of(tiny_request)).json()
    second = client.post("/v1/plans", json=search_of(tiny_request)).json()
    assert first["id"] != second["id"]
    assert first["result"] == second["result"]
    assert {plan["id"] for plan in client.get("/v1/plans").json()["plans"]} == {first["id"], second["id"]}


def test_plan_listing_pages(client: TestClient, tiny_request: dict[str, Any]) -> None:
    ids = []
    for top_k in (1, 2):
        ids.append(client.post("/v1/plans", json=search_of(tiny_request, top_k)).json()["id"])
        time.sleep(0.01)  # distinct creation times: newest first is then one order
    assert [plan["id"] for plan in client.get("/v1/plans", params={"limit": 1}).json()["plans"]] == [ids[1]]
    page = client.get("/v1/plans", params={"limit": 1, "offset": 1}).json()["plans"]
    assert [plan["id"] for plan in page] == [ids[0]]


def test_a_search_with_a_plan_is_refused(client: TestClient, tiny_request: dict[str, Any]) -> None:
    error_of(client.post("/v1/plans", json=tiny_request | {"search": {"top_k": 1}}), 422, "invalid_request")


def test_a_job_cannot_run_a_search_that_found_nothing_or_a_rank_it_lacks(
    client: TestClient, tiny_request: dict[str, Any], auth_headers: dict[str, str], data_dir: Path
) -> None:
    hopeless = search_of(tiny_request) | {"model": {"name": "llama3-405b"}}  # 405B on two CPU "GPUs"
    nothing = client.post("/v1/plans", json=hopeless)
    assert nothing.status_code == 201, nothing.text
    assert nothing.json()["found"] == 0 and nothing.json()["result"]["plans"] == []
    response = client.post("/v1/jobs", json={"plan_id": nothing.json()["id"], "steps": 1}, headers=auth_headers)
    assert named_fields(error_of(response, 422, "bad_input")) == {"plan_id"}

    found = client.post("/v1/plans", json=search_of(tiny_request, top_k=1)).json()
    body = {"plan_id": found["id"], "plan_rank": 2, "steps": 1}
    response = client.post("/v1/jobs", json=body, headers=auth_headers)
    assert named_fields(error_of(response, 422, "bad_input")) == {"plan_rank"}
    assert job_folders(data_dir) == []


# =================================================================================================== auth


def _process_starting_calls(tiny_request: dict[str, Any]) -> list[tuple[str, dict[str, Any] | None]]:
    return [
        ("/v1/jobs", tiny_request | {"steps": 2}),
        ("/v1/profiles", PROFILE_BODY),
        (f"/v1/jobs/{UNKNOWN_ID}/cancel", None),
    ]


def test_endpoints_that_start_processes_need_the_token(
    client: TestClient, tiny_request: dict[str, Any], token: str, data_dir: Path
) -> None:
    for path, body in _process_starting_calls(tiny_request):
        error_of(client.post(path, json=body), 401, "unauthorized")
        for wrong in (f"Bearer {token}x", f"Bearer {token[:-1]}", f"Basic {token}", token, "Bearer "):
            error_of(client.post(path, json=body, headers={"Authorization": wrong}), 403, "forbidden")
    assert job_folders(data_dir) == []
    assert client.get("/v1/jobs").json()["jobs"] == []
    # With the token, the same calls get past the check (the cancel then finds no such job).
    response = client.post(f"/v1/jobs/{UNKNOWN_ID}/cancel", headers={"Authorization": f"bearer  {token} "})
    error_of(response, 404, "not_found")


def test_without_a_configured_token_those_endpoints_are_disabled(
    app_factory: Callable[..., Any], tiny_request: dict[str, Any], auth_headers: dict[str, str], data_dir: Path
) -> None:
    with TestClient(app_factory(api_token=None)) as client:
        for path, body in _process_starting_calls(tiny_request):
            error_of(client.post(path, json=body), 403, "disabled")
            error_of(client.post(path, json=body, headers=auth_headers), 403, "disabled")
        assert client.post("/v1/estimates", json=tiny_request).status_code == 200
        assert client.get("/v1/jobs").status_code == 200
    assert job_folders(data_dir) == []


def test_reading_needs_no_token(client: TestClient, tiny_request: dict[str, Any]) -> None:
    for path in ("/v1/jobs", "/v1/profiles", "/v1/plans", "/v1/catalog/models", "/v1/catalog/gpus", "/readyz"):
        assert client.get(path).status_code == 200, path
    assert client.post("/v1/estimates", json=tiny_request).status_code == 200
    assert client.post("/v1/plans", json=search_of(tiny_request, 1)).status_code == 201


# ============================================================================================= body size

LIMIT = 1024


@pytest.fixture
def small_limit_client(app_factory: Callable[..., Any]) -> Iterator[TestClient]:
    with TestClient(app_factory(max_request_bytes=LIMIT)) as started:
        yield started


def _padded(request: dict[str, Any], size: int) -> bytes:
    """`request` as JSON padded with trailing spaces to `size` bytes."""
    text = json.dumps(request).encode()
    assert len(text) <= size
    return text + b" " * (size - len(text))


@pytest.mark.parametrize("path", ["/v1/estimates", "/v1/plans", "/v1/jobs", "/v1/profiles"])
def test_a_body_over_the_limit_is_refused_by_its_length(
    small_limit_client: TestClient, tiny_request: dict[str, Any], auth_headers: dict[str, str], path: str
) -> None:
    headers = auth_headers | {"Content-Type": "application/json"}
    response = small_limit_client.post(path, content=_padded(tiny_request, LIMIT + 1), headers=headers)
    error_of(response, 413, "too_large")


def test_a_body_at_the_limit_is_read(small_limit_client: TestClient, tiny_request: dict[str, Any]) -> None:
    headers = {"Content-Type": "application/json"}
    response = small_limit_client.post("/v1/estimates", content=_padded(tiny_request, LIMIT), headers=headers)
    assert response.status_code == 200, response.text


@pytest.mark.parametrize("path", ["/v1/estimates", "/v1/jobs"])
def test_a_streamed_body_over_the_limit_is_refused_as_it_arrives(
    small_limit_client: TestClient, tiny_request: dict[str, Any], auth_headers: dict[str, str], path: str
) -> None:
    """Chunked, without a Content-Length: the server counts what arrives."""
    sent = _padded(tiny_request, 4 * LIMIT)

    def chunks() -> Iterator[bytes]:
        for start in range(0, len(sent), 256):
            yield sent[start : start + 256]

    headers = auth_headers | {"Content-Type": "application/json"}
    error_of(small_limit_client.post(path, content=chunks(), headers=headers), 413, "too_large")


def test_a_streamed_body_under_the_limit_is_read(small_limit_client: TestClient, tiny_request: dict[str, Any]) -> None:
    sent = json.dumps(tiny_request).encode()
    halves = iter([sent[: len(sent) // 2], sent[len(sent) // 2 :]])
    response = small_limit_client.post("/v1/estimates", content=halves, headers={"Content-Type": "application/json"})
    assert response.status_code == 200, response.text


# ======================================================================================= jobs: refused input


def _sixteen_gpu_request(request: dict[str, Any]) -> dict[str, Any]:
    request["cluster"]["gpus_per_node"] = 16
    request["plan"]["dp"] = 16
    request["training"]["global_batch_size"] = 64
    return request


REFUSED_JOBS: list[Any] = [
    pytest.param(lambda r: r | {"steps": 0}, "invalid_request", "steps", id="steps-0"),
    pytest.param(lambda r: r, "invalid_request", "steps", id="steps-missing"),
    pytest.param(lambda r: r | {"steps": 2, "nproc": 3}, "run_refused", "nproc", id="nproc-differs-from-plan"),
    pytest.param(lambda r: r | {"steps": 2, "nproc": 9}, "bad_input", "nproc", id="nproc-over-limit"),
    pytest.param(lambda r: _sixteen_gpu_request(r) | {"steps": 2}, "bad_input", "nproc", id="plan-over-limit"),
    pytest.param(lambda r: r | {"steps": 2, "data": "../x"}, "bad_input", "data", id="data-parent"),
    pytest.param(lambda r: r | {"steps": 2, "data": "/etc/passwd"}, "bad_input", "data", id="data-absolute"),
    pytest.param(lambda r: r | {"steps": 2, "data": ".hidden"}, "bad_input", "data", id="data-hidden"),
    pytest.param(lambda r: r | {"steps": 2, "data": "sub/corpus.txt"}, "bad_input", "data", id="data-subfolder"),
    pytest.param(lambda r: r | {"steps": 2, "data": "missing.txt"}, "bad_input", "data", id="data-missing"),
    pytest.param(lambda r: r | {"steps": 2, "data": ""}, "bad_input", "data", id="data-empty"),
    pytest.param(lambda r: r | {"steps": 2, "data": "sub"}, "bad_input", "data", id="data-folder"),
    pytest.param(lambda r: r | {"steps": 2, "data": "escape.txt"}, "bad_input", "data", id="data-symlink-out"),
    pytest.param(lambda r: {"steps": 2, "plan_id": UNKNOWN_ID}, "bad_input", "plan_id", id="plan_id-unknown"),
    pytest.param(lambda r: r | {"steps": 2, "plan_id": UNKNOWN_ID}, "bad_input", "plan_id", id="plan_id-and-plan"),
    pytest.param(
        lambda r: {"plan_id": UNKNOWN_ID, "model": r["model"], "steps": 2},
        "bad_input",
        "plan_id",
        id="plan_id-and-model",
    ),
    pytest.param(lambda r: r | {"steps": 2, "bogus": 1}, "invalid_request", "bogus", id="unknown-field"),
    pytest.param(lambda r: r | {"steps": 2, "device": "tpu"}, "invalid_request", "device", id="device"),
    pytest.param(lambda r: r | {"steps": 2, "nodes": 2}, "bad_input", "nodes", id="nodes-without-slurm-launcher"),
    pytest.param(lambda r: r | {"steps": 2, "nodes": 0}, "invalid_request", "nodes", id="nodes-0"),
    pytest.param(lambda r: r | {"steps": 2, "launcher": "pbs"}, "invalid_request", "launcher", id="launcher-unknown"),
    pytest.param(
        lambda r: r | {"steps": 2, "cluster": r["cluster"] | {"profile": "/etc/passwd"}},
        "bad_profile",
        "cluster.profile",
        id="profile-path",
    ),
]


@pytest.mark.parametrize(("make_body", "kind", "field"), REFUSED_JOBS)
def test_a_refused_job_names_the_field_and_leaves_nothing(
    strict_limits_client: TestClient,
    tiny_request: dict[str, Any],
    auth_headers: dict[str, str],
    data_dir: Path,
    make_body: Callable[[dict[str, Any]], dict[str, Any]],
    kind: str,
    field: str,
) -> None:
    datasets = data_dir / "datasets"
    (datasets / "sub").mkdir(parents=True)
    (datasets / "sub" / "corpus.txt").write_text("nested text\n" * 100)
    (datasets / ".hidden").write_text("hidden text\n" * 100)
    (datasets / "escape.txt").symlink_to("/etc/passwd")
    response = strict_limits_client.post("/v1/jobs", json=make_body(tiny_request), headers=auth_headers)
    assert field in named_fields(error_of(response, 422, kind))
    assert job_folders(data_dir) == []
    assert strict_limits_client.get("/v1/jobs").json()["jobs"] == []


def test_a_slurm_job_on_a_server_without_slurm_is_a_422_naming_the_launcher(
    idle_client: TestClient,
    tiny_request: dict[str, Any],
    auth_headers: dict[str, str],
    data_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path / "no-slurm-here"))  # the server's own PATH: no sbatch on it
    body = tiny_request | {"steps": 2, "launcher": "slurm"}
    error = error_of(idle_client.post("/v1/jobs", json=body, headers=auth_headers), 422, "bad_input")
    assert named_fields(error) == {"launcher"}, error
    assert "cannot submit to Slurm: sbatch, scontrol, scancel not on its PATH" in error["message"], error
    assert job_folders(data_dir) == []


@pytest.mark.parametrize("data", ["corpus.txt", "founding"])
def test_a_dataset_of_the_data_folder_or_shipped_is_accepted(
    idle_client: TestClient, tiny_request: dict[str, Any], auth_headers: dict[str, str], data_dir: Path, data: str
) -> None:
    corpus = data_dir / "datasets" / "corpus.txt"
    corpus.parent.mkdir(parents=True)
    corpus.write_text("The quick brown fox jumps over the lazy dog.\n" * 200)
    job = post_job(idle_client, tiny_request | {"steps": 2, "data": data}, auth_headers)
    assert job["state"] == "QUEUED" and job["kind"] == "train" and job["nproc"] == 2 and job["steps"] == 2
    assert job_folders(data_dir) == [job["id"]]
    run = RunDir(data_dir / "jobs" / job["id"] / "run").read_run()
    if data == "corpus.txt":
        assert Path(run.config.data).resolve() == corpus.resolve()
    else:
        assert Path(run.config.data).stem == "founding"
    assert idle_client.get(f"/v1/jobs/{job['id']}").json() == job


def test_an_idempotency_key_replays_the_same_job(
    idle_client: TestClient, tiny_request: dict[str, Any], auth_headers: dict[str, str], data_dir: Path
) -> None:
    body = tiny_request | {"steps": 3}
    keyed = auth_headers | {"Idempotency-Key": "retry-1"}
    first = idle_client.post("/v1/jobs", json=body, headers=keyed)
    assert first.status_code == 202, first.text
    assert "Idempotent-Replayed" not in first.headers
    job_id = first.json()["id"]

    reordered = dict(reversed(list(body.items())))  # the same body, its members in another order
    again = idle_client.post("/v1/jobs", json=reordered, headers=keyed)
    assert again.status_code == 202, again.text
    assert again.json()["id"] == job_id
    assert again.headers["Idempotent-Replayed"] == "true"
    assert again.headers["Location"] == f"/v1/jobs/{job_id}"

    other = idle_client.post("/v1/jobs", json=tiny_request | {"steps": 4}, headers=keyed)
    assert error_of(other, 409, "conflict")["job_id"] == job_id
    assert [job["id"] for job in idle_client.get("/v1/jobs").json()["jobs"]] == [job_id]
    assert job_folders(data_dir) == [job_id]

    fresh = idle_client.post("/v1/jobs", json=body, headers=auth_headers | {"Idempotency-Key": "retry-2"})
    assert fresh.status_code == 202 and fresh.json()["id"] != job_id

    profile = idle_client.post("/v1/profiles", json=PROFILE_BODY, headers=keyed)  # keys are per kind of job
    assert profile.status_code == 202 and profile.json()["kind"] == "profile", profile.text


def test_an_idempotency_key_must_be_printable_and_short(
    idle_client: TestClient, tiny_request: dict[str, Any], auth_headers: dict[str, str], data_dir: Path
) -> None:
    headers = auth_headers | {"Idempotency-Key": "k" * 256}
    response = idle_client.post("/v1/jobs", json=tiny_request | {"steps": 2}, headers=headers)
    assert named_fields(error_of(response, 422, "bad_input")) == {"Idempotency-Key"}
    assert job_folders(data_dir) == []


# ================================================================================== jobs: listing, lookups


def test_jobs_are_listed_by_state_and_a_queued_job_cancels_at_once(
    idle_client: TestClient, tiny_request: dict[str, Any], auth_headers: dict[str, str]
) -> None:
    older = post_job(idle_client, tiny_request | {"steps": 2}, auth_headers)["id"]
    time.sleep(0.01)
    newer = post_job(idle_client, tiny_request | {"steps": 3}, auth_headers)["id"]

    cancelled = idle_client.post(f"/v1/jobs/{older}/cancel", headers=auth_headers)
    assert cancelled.status_code == 200, cancelled.text
    view = cancelled.json()
    assert view["state"] == "CANCELLED" and view["cancel_requested"] is True
    assert view["started"] is None and view["finished"] is not None

    def listed(**params: Any) -> list[str]:
        response = idle_client.get("/v1/jobs", params=params)
        assert response.status_code == 200, response.text
        return [job["id"] for job in response.json()["jobs"]]

    assert listed() == [newer, older]  # newest first
    assert listed(state="QUEUED") == [newer]
    assert listed(state="CANCELLED") == [older]
    assert listed(state="SUCCEEDED") == []
    assert listed(limit=1) == [newer]
    assert listed(limit=1, offset=1) == [older]


@pytest.mark.parametrize(
    ("path", "field"),
    [
        ("/v1/jobs?limit=0", "query.limit"),
        ("/v1/jobs?limit=abc", "query.limit"),
        ("/v1/jobs?limit=1001", "query.limit"),
        ("/v1/jobs?offset=-1", "query.offset"),
        ("/v1/jobs?state=DONE", "query.state"),
        ("/v1/plans?limit=0", "query.limit"),
        ("/v1/profiles?limit=abc", "query.limit"),
        (f"/v1/jobs/{UNKNOWN_ID}/logs?offset=-1", "query.offset"),
        (f"/v1/jobs/{UNKNOWN_ID}/logs?follow=maybe", "query.follow"),
    ],
)
def test_a_bad_query_parameter_is_named(client: TestClient, path: str, field: str) -> None:
    assert named_fields(error_of(client.get(path), 422, "invalid_request")) == {field}


@pytest.mark.parametrize(
    "path",
    [
        "/v1/jobs/{id}",
        "/v1/jobs/{id}/metrics",
        "/v1/jobs/{id}/logs",
        "/v1/jobs/{id}/logs?follow=true",
        "/v1/profiles/{id}",
    ],
)
def test_an_unknown_job_is_not_found(client: TestClient, path: str) -> None:
    error_of(client.get(path.format(id=UNKNOWN_ID)), 404, "not_found")


def test_cancelling_an_unknown_job_is_not_found(client: TestClient, auth_headers: dict[str, str]) -> None:
    error_of(client.post(f"/v1/jobs/{UNKNOWN_ID}/cancel", headers=auth_headers), 404, "not_found")


def test_a_training_job_is_not_a_profile(
    idle_client: TestClient, tiny_request: dict[str, Any], auth_headers: dict[str, str]
) -> None:
    job = post_job(idle_client, tiny_request | {"steps": 2}, auth_headers)
    error_of(idle_client.get(f"/v1/profiles/{job['id']}"), 404, "not_found")


# ============================================================================================== profiles


@pytest.mark.parametrize(
    ("body", "kind", "field"),
    [
        (PROFILE_BODY | {"bogus": 1}, "invalid_request", "bogus"),
        ({"what": "comm", "model": "llama3-8b"}, "bad_input", "model"),
        ({"what": "comm", "nproc": 64}, "bad_input", "nproc"),
        (PROFILE_BODY | {"what": "everything"}, "invalid_request", "what"),
        ({k: v for k, v in PROFILE_BODY.items() if k != "seq_len"}, "bad_input", "seq_len"),
        (PROFILE_BODY | {"seq_len": [0]}, "bad_input", "seq_len"),
        (PROFILE_BODY | {"tp": [3]}, "bad_input", "tp"),
        (PROFILE_BODY | {"model": "/etc/passwd"}, "unknown_preset", None),
        (PROFILE_BODY | {"model": "executor/examples/tiny-llama-2cpu.json"}, "unknown_preset", None),
    ],
    ids=[
        "unknown-field",
        "comm-with-model",
        "nproc-over-limit",
        "what",
        "seq_len-missing",
        "seq_len-0",
        "tp",
        "model-absolute-path",
        "model-relative-path",
    ],
)
def test_a_refused_profile_names_the_field_and_leaves_nothing(
    strict_limits_client: TestClient,
    auth_headers: dict[str, str],
    data_dir: Path,
    body: dict[str, Any],
    kind: str,
    field: str | None,
) -> None:
    error = error_of(strict_limits_client.post("/v1/profiles", json=body, headers=auth_headers), 422, kind)
    if field is not None:
        assert field in named_fields(error)
    assert job_folders(data_dir) == []
    assert strict_limits_client.get("/v1/profiles").json()["profiles"] == []


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"what": "comm", "ops": ["bogus"]}, "ops"),
        ({"what": "comm", "min_bytes": 4096, "max_bytes": 1024}, "min_bytes"),
        (PROFILE_BODY | {"seq_len": [0]}, "seq_len"),
    ],
    ids=["comm-ops", "comm-min-over-max", "compute-seq_len"],
)
def test_a_refused_profile_option_is_named_as_the_body_names_it(
    client: TestClient, auth_headers: dict[str, str], body: dict[str, Any], field: str
) -> None:
    error = error_of(client.post("/v1/profiles", json=body, headers=auth_headers), 422, "bad_input")
    assert named_fields(error) == {field}
    assert all("--" not in entry["message"] for entry in error["fields"]), error


# ================================================================================== unknown routes, methods


@pytest.mark.parametrize("path", ["/v1/nope", "/nope", "/v2/estimates", "/v1/plans/x/y"])
def test_an_unknown_route_is_404_in_the_common_shape(client: TestClient, path: str) -> None:
    error_of(client.get(path), 404, "not_found")
    error_of(client.post(path, json={}), 404, "not_found")


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("DELETE", "/v1/plans"),
        ("GET", "/v1/estimates"),
        ("PUT", f"/v1/jobs/{UNKNOWN_ID}/cancel"),
        ("POST", "/healthz"),
        ("DELETE", f"/v1/jobs/{UNKNOWN_ID}"),
    ],
)
def test_a_wrong_method_is_405_in_the_common_shape(client: TestClient, method: str, path: str) -> None:
    response = client.request(method, path)
    error_of(response, 405, "method_not_allowed")
    assert response.headers["Allow"]


def test_a_405_allows_every_method_of_the_path(client: TestClient) -> None:
    response = client.delete("/v1/plans")
    assert response.status_code == 405
    assert {method.strip() for method in response.headers["Allow"].split(",")} >= {"GET", "POST"}


# =========================================================================== inputs the planner overflows on


def test_a_huge_layer_count_is_bad_input_not_a_server_error(
    app_factory: Callable[..., Any], tiny_request: dict[str, Any]
) -> None:
    tiny_request["model"]["num_layers"] = 2**64
    with TestClient(app_factory(), raise_server_exceptions=False) as client:
        error_of(client.post("/v1/estimates", json=tiny_request), 422, "invalid_request")


def test_a_huge_pipeline_degree_in_a_job_is_refused_not_a_server_error(
    app_factory: Callable[..., Any], tiny_request: dict[str, Any], auth_headers: dict[str, str], data_dir: Path
) -> None:
    tiny_request["plan"]["pp"] = 2**70
    with TestClient(app_factory(), raise_server_exceptions=False) as client:
        response = client.post("/v1/jobs", json=tiny_request | {"steps": 1, "nproc": 2}, headers=auth_headers)
        assert response.status_code == 422, response.text
    assert job_folders(data_dir) == []


# ============================================================================================ real jobs


@pytest.mark.slow
def test_a_training_job_of_a_stored_plan_runs_to_success(
    client: TestClient, tiny_request: dict[str, Any], auth_headers: dict[str, str]
) -> None:
    """The tiny Llama on 2 CPU ranks, run by `plan_id` of a stored search: its state, metrics, measured run
    beside the prediction, and its logs as text and as a server-sent-events stream."""
    steps = 6
    search = client.post("/v1/plans", json=search_of(tiny_request, top_k=3))
    assert search.status_code == 201, search.text
    plan = search.json()
    job = post_job(client, {"plan_id": plan["id"], "steps": steps}, auth_headers)
    assert job["kind"] == "train" and job["state"] in ("QUEUED", "RUNNING")
    assert job["plan_id"] == plan["id"] and job["steps"] == steps and job["nproc"] == 2
    assert job["predicted"]["step_time_s"] == pytest.approx(plan["best_step_time_s"])
    path = f"/v1/jobs/{job['id']}"

    done = wait_for_end(client, path, timeout_s=180)
    assert done["state"] == "SUCCEEDED", done["failure_reason"]
    assert done["returncode"] == 0 and done["failure_reason"] is None and done["finished"] is not None
    assert done["steps_done"] == steps and done["latest_metrics"]["step"] == steps

    metrics = client.get(f"{path}/metrics")
    assert metrics.status_code == 200
    record = metrics.json()
    assert [step["step"] for step in record["steps"]] == list(range(1, steps + 1))
    assert all(math.isfinite(step["loss"]) and step["step_time_s"] > 0 for step in record["steps"])
    assert record["summary"]["steps"] == steps
    measured = record["measured_run"]
    assert measured["steps"] == steps
    assert measured["measured_step_time_s"] > 0 and measured["measured_tokens_per_s"] > 0
    assert measured["predicted_step_time_s"] == pytest.approx(done["predicted"]["step_time_s"])
    assert done["measured_run"] == measured

    logs = client.get(f"{path}/logs")
    assert logs.status_code == 200 and logs.headers["content-type"].startswith("text/plain")
    assert int(logs.headers["X-Next-Offset"]) == len(logs.content)
    assert sum("paraplan.step" in line for line in logs.text.splitlines()) >= steps
    half = len(logs.content) // 2
    assert client.get(f"{path}/logs", params={"offset": half}).content == logs.content[half:]

    stream = client.get(f"{path}/logs", params={"follow": "true"})
    assert stream.status_code == 200 and stream.headers["content-type"].startswith("text/event-stream")
    events = sse_events(stream.text)
    assert events[-1]["event"] == "end" and json.loads(events[-1]["data"]) == {"state": "SUCCEEDED"}
    lines = events[:-1]
    assert sum("paraplan.step" in event["data"] for event in lines) >= steps
    offsets = [int(event["id"]) for event in lines]
    assert offsets == sorted(offsets) and offsets[-1] == len(logs.content)
    resumed = sse_events(client.get(f"{path}/logs?follow=true", headers={"Last-Event-ID": lines[0]["id"]}).text)
    assert resumed == events[1:]

    assert job["id"] in [j["id"] for j in client.get("/v1/jobs", params={"state": "SUCCEEDED"}).json()["jobs"]]
    assert client.get("/v1/jobs", params={"state": "RUNNING"}).json()["jobs"] == []
    again = client.post(f"{path}/cancel", headers=auth_headers)  # an ended job: nothing changes
    assert again.status_code == 200 and again.json()["state"] == "SUCCEEDED"


@pytest.mark.slow
def test_cancelling_stops_every_rank_and_a_cancelled_queued_job_never_starts(
    app_factory: Callable[..., Any],
    tiny_request: dict[str, Any],
    auth_headers: dict[str, str],
    data_dir: Path,
    processes_in_folder: Callable[[Path], list[int]],
) -> None:
    with TestClient(app_factory(max_concurrent_jobs=1)) as client:
        running = post_job(client, tiny_request | {"steps": 100_000}, auth_headers)["id"]
        queued = post_job(client, tiny_request | {"steps": 2}, auth_headers)["id"]
        wait_for(
            client, f"/v1/jobs/{running}", lambda view: view["state"] == "RUNNING" and view["latest_metrics"], 120,
            "running a step",
        )  # fmt: skip
        assert client.get(f"/v1/jobs/{queued}").json()["state"] == "QUEUED"  # one job at a time
        assert processes_in_folder(data_dir / "jobs" / running)  # what the check below must find gone

        response = client.post(f"/v1/jobs/{queued}/cancel", headers=auth_headers)
        assert response.status_code == 200, response.text
        view = response.json()
        assert view["state"] == "CANCELLED" and view["cancel_requested"] is True and view["started"] is None

        response = client.post(f"/v1/jobs/{running}/cancel", headers=auth_headers)
        assert response.status_code == 200, response.text
        assert response.json()["cancel_requested"] is True
        assert response.json()["state"] in ("RUNNING", "CANCELLED")
        ended = wait_for_end(client, f"/v1/jobs/{running}", timeout_s=120)
        assert ended["state"] == "CANCELLED", ended
        assert processes_in_folder(data_dir / "jobs" / running) == []  # every rank stopped
        assert ended["steps_done"] >= 1
        assert "checkpoint saved" in client.get(f"/v1/jobs/{running}/logs").text  # it saved before stopping

        time.sleep(1.5)  # the runner, free again, looks at the queue at least once a second
        view = client.get(f"/v1/jobs/{queued}").json()
        assert view["state"] == "CANCELLED" and view["started"] is None
        assert client.get(f"/v1/jobs/{queued}/logs").text == ""
        assert processes_in_folder(data_dir / "jobs" / queued) == []

        again = client.post(f"/v1/jobs/{running}/cancel", headers=auth_headers)
        assert again.status_code == 200 and again.json()["state"] == "CANCELLED"
        listed = client.get("/v1/jobs", params={"state": "CANCELLED"}).json()["jobs"]
        assert {job["id"] for job in listed} == {running, queued}


@pytest.mark.slow
def test_a_profiling_job_stores_a_profile_that_estimates_use(
    client: TestClient, auth_headers: dict[str, str], data_dir: Path
) -> None:
    posted = client.post("/v1/profiles", json=PROFILE_BODY, headers=auth_headers)
    assert posted.status_code == 202, posted.text
    job = posted.json()
    profile_id = job["id"]
    assert posted.headers["Location"] == f"/v1/profiles/{profile_id}"
    assert job["kind"] == "profile" and job["profile_id"] is None

    done = wait_for_end(client, f"/v1/profiles/{profile_id}", timeout_s=180)
    assert done["state"] == "SUCCEEDED", done["failure_reason"]
    assert done["profile_id"] == profile_id
    assert done["summary"]["name"] == "tiny-cpu" and done["summary"]["device_kind"] == "cpu"
    profile = done["profile"]
    assert profile["device_kind"] == "cpu" and profile["layers"]
    assert profile_id in [entry["id"] for entry in client.get("/v1/profiles").json()["profiles"]]
    assert "profile" in client.get(f"/v1/jobs/{profile_id}/logs").text

    request = {
        "model": TINY_PROFILE_MODEL,
        "training": {"seq_len": 32, "global_batch_size": 2, "precision": "fp32"},
        "cluster": {"gpu": "cpu", "num_nodes": 1, "gpus_per_node": 1, "profile": profile_id},
        "plan": {"dp": 1, "micro_batch_size": 1},
    }
    measured = client.post("/v1/estimates", json=request)
    assert measured.status_code == 200, measured.text
    analytic = client.post("/v1/estimates", json=request | {"cluster": request["cluster"] | {"profile": None}})
    assert analytic.status_code == 200, analytic.text
    assert measured.json()["step_time_s"] > 0
    assert measured.json()["sources"] != analytic.json()["sources"]  # the measurements were used

    # The profile's own file, though it exists and holds this very profile, is not read.
    profile_file = data_dir / "jobs" / profile_id / "profile.json"
    assert profile_file.is_file()
    request["cluster"]["profile"] = str(profile_file)
    error = error_of(client.post("/v1/estimates", json=request), 422, "bad_profile")
    assert named_fields(error) == {"cluster.profile"}


def test_a_timeline_of_a_valid_request_draws_every_task(client: TestClient, tiny_request: dict[str, Any]) -> None:
    tiny_request["plan"] |= {"dp": 1, "pp": 2, "zero_stage": 0}
    response = client.post("/v1/estimates/timeline", json=tiny_request)
    assert response.status_code == 200, response.text
    answer = response.json()
    microbatches = answer["num_microbatches"]
    assert len(answer["tasks"]) == 2 * 2 * microbatches  # 2 stages x forward and backward x micro-batches
    assert {task["device"] for task in answer["tasks"]} == {0, 1}
    assert max(task["end_s"] for task in answer["tasks"]) == pytest.approx(answer["pipeline_time_s"])


def test_a_timeline_too_long_to_draw_names_the_batch(client: TestClient, tiny_request: dict[str, Any]) -> None:
    tiny_request["training"]["global_batch_size"] = 20_000
    tiny_request["plan"] |= {"dp": 1, "pp": 2, "zero_stage": 0, "micro_batch_size": 1}
    error = error_of(client.post("/v1/estimates/timeline", json=tiny_request), 422, "bad_input")
    assert named_fields(error) == {"training.global_batch_size"}, error
