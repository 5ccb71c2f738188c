"""`POST /v1/kernel-checks`: a kernel profile measured on this CPU (profiler/kernels.py, for real) set beside GPU
presets by the service, and bad bodies answered 422 naming the field."""

from __future__ import annotations

import json
from typing import Any

import pytest
from fastapi.testclient import TestClient

from planner.kernel_check import check_profile
from planner.presets import gpu_preset, model_preset
from planner.specs.kernels import KernelProfile
from profiler.kernels import KernelSweep, profile_kernels

TINY_GRID = {"gemm_rows": (32,), "widths": (64,), "attention_heads": (2,), "attention_seq_lens": (32,)}


@pytest.fixture(scope="module")
def cpu_profile() -> dict[str, Any]:
    sweep = KernelSweep(model=model_preset("llama3.2-1b"), head_dim=16, warmup=1, repeats=2, **TINY_GRID)
    return json.loads(profile_kernels(sweep).model_dump_json())


def fields_of(response: Any) -> set[str]:
    return {entry["field"] for entry in response.json()["error"].get("fields", [])}


def test_a_profile_is_set_beside_the_named_preset(idle_client: TestClient, cpu_profile: dict[str, Any]) -> None:
    response = idle_client.post("/v1/kernel-checks", json={"profile": cpu_profile, "gpu": "h100-sxm"})
    assert response.status_code == 200, response.text
    answer = response.json()
    assert (answer["gpu"], answer["dtype"]) == ("h100-sxm", "fp32")
    expected = check_profile(KernelProfile.model_validate(cpu_profile), gpu_preset("h100-sxm"))
    assert [c["kind"] for c in answer["checks"]] == [c.kind for c in expected]
    assert [c["predicted_s"] for c in answer["checks"]] == pytest.approx([c.predicted_s for c in expected])
    for check in answer["checks"]:
        assert check["ratio"] == pytest.approx(check["measured_s"] / check["predicted_s"])
    assert {c["name"] for c in answer["constants"]} >= {"host time per kernel, forward", "fused attention efficiency"}
    floor = [c for c in answer["checks"] if c["kind"].startswith("host floor")]
    assert all(c["kernels"] > 0 and "flops" not in c for c in floor) and len(floor) == 2


def test_a_cpu_profile_defaults_to_the_cpu_preset(idle_client: TestClient, cpu_profile: dict[str, Any]) -> None:
    response = idle_client.post("/v1/kernel-checks", json={"profile": cpu_profile})
    assert response.status_code == 200 and response.json()["gpu"] == "cpu"


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({}, "profile"),
        ({"profile": {"schema_version": 9}}, "profile"),
        ({"profile": "kernels.json"}, "profile"),
        ({"profile": None, "gpu": "h100-sxm"}, "profile"),
        ({"gpu": 3, "profile": {}}, "gpu"),
        ({"profile": {}, "extra": 1}, "extra"),
    ],
)
def test_a_bad_body_is_a_422_naming_the_field(idle_client: TestClient, body: dict[str, Any], field: str) -> None:
    response = idle_client.post("/v1/kernel-checks", json=body)
    assert response.status_code == 422, response.text
    assert field in fields_of(response)


def test_an_unknown_preset_or_device_names_gpu(idle_client: TestClient, cpu_profile: dict[str, Any]) -> None:
    unknown = idle_client.post("/v1/kernel-checks", json={"profile": cpu_profile, "gpu": "h1000"})
    assert unknown.status_code == 422 and fields_of(unknown) == {"gpu"} and "h100" in unknown.text
    anonymous = {**cpu_profile, "device_kind": "cuda", "device_name": "Some Accelerator X"}
    unnamed = idle_client.post("/v1/kernel-checks", json={"profile": anonymous})
    assert unnamed.status_code == 422 and fields_of(unnamed) == {"gpu"}


def test_a_profile_field_at_fault_is_named(idle_client: TestClient, cpu_profile: dict[str, Any]) -> None:
    broken = {**cpu_profile, "gemms": [{**cpu_profile["gemms"][0], "rows": -1}]}
    response = idle_client.post("/v1/kernel-checks", json={"profile": broken})
    assert response.status_code == 422 and "gemms.0.rows" in response.json()["error"]["message"]


def test_an_infinite_time_is_refused_not_answered(idle_client: TestClient, cpu_profile: dict[str, Any]) -> None:
    """JSON has no infinity: Python's parser takes `Infinity`, the profile's timings refuse it."""
    broken = {**cpu_profile, "gemms": [{**cpu_profile["gemms"][0], "time": {"median_s": float("inf"), "spread": 0,
                                                                           "repeats": 1}}]}  # fmt: skip
    response = idle_client.post("/v1/kernel-checks", content=json.dumps({"profile": broken}),
                                headers={"content-type": "application/json"})  # fmt: skip
    assert response.status_code == 422 and "gemms.0.time.median_s" in response.json()["error"]["message"]
