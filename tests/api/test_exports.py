"""`GET /v1/plans/{id}/export`, in-process (TestClient) over a real SQLite database: a stored search's ranked plan
exported to each stack, estimated under that stack's regime, and the errors (unknown target 422 naming `to`,
unknown id 404, a rank the search has not 422 naming `rank`, a plan the stack cannot run 422 naming its fields)."""

from __future__ import annotations

import json
from typing import Any

import pytest
from fastapi.testclient import TestClient

from tests.api.test_routes import UNKNOWN_ID, error_of, named_fields, search_of


def stored_search(client: TestClient, request: dict[str, Any], **search: Any) -> dict[str, Any]:
    body = search_of(request) | {"search": {"top_k": 3, **search}}
    created = client.post("/v1/plans", json=body)
    assert created.status_code == 201, created.text
    return created.json()


def estimate_numbers(estimate: dict[str, Any]) -> dict[str, Any]:
    """An estimate less its `assumptions` text (which says whether training.framework was given or defaulted)."""
    return {key: value for key, value in estimate.items() if key != "assumptions"}


def test_a_stored_plan_exports_to_a_request_that_estimates_the_same(
    client: TestClient, tiny_request: dict[str, Any]
) -> None:
    search = stored_search(client, tiny_request)
    answer = client.get(f"/v1/plans/{search['id']}/export", params={"to": "request"})
    assert answer.status_code == 200, answer.text
    exported = answer.json()
    assert (exported["to"], exported["framework"], exported["filename"]) == ("request", "paraplan", "request.json")
    request = json.loads(exported["content"])
    assert request["plan"] == search["result"]["plans"][0]["plan"]  # rank 1 by default
    again = client.post("/v1/estimates", json=request)
    assert again.status_code == 200, again.text
    assert estimate_numbers(again.json()) == estimate_numbers(exported["estimate"])
    ranked_estimate = search["result"]["plans"][0]["estimate"]
    assert exported["estimate"]["step_time_s"] == pytest.approx(ranked_estimate["step_time_s"])


def test_a_ranked_plan_exports_to_deepspeed_estimated_under_its_regime(
    client: TestClient, tiny_request: dict[str, Any]
) -> None:
    search = stored_search(client, tiny_request)
    ranked = search["result"]["plans"]
    rank = len(ranked)
    answer = client.get(f"/v1/plans/{search['id']}/export", params={"to": "deepspeed", "rank": rank})
    assert answer.status_code == 200, answer.text
    exported = answer.json()
    assert exported["framework"] == "deepspeed" and exported["request"]["training"]["framework"] == "deepspeed"
    assert exported["request"]["plan"] == ranked[rank - 1]["plan"]
    config = json.loads(exported["content"])
    plan = ranked[rank - 1]["plan"]
    assert config["zero_optimization"]["stage"] == plan["zero_stage"]
    assert config["train_batch_size"] == tiny_request["training"]["global_batch_size"]
    under_deepspeed = client.post("/v1/estimates", json=exported["request"]).json()
    assert estimate_numbers(under_deepspeed) == estimate_numbers(exported["estimate"])


def test_raw_answers_the_file_itself(client: TestClient, tiny_request: dict[str, Any]) -> None:
    search = stored_search(client, tiny_request)
    path = f"/v1/plans/{search['id']}/export"
    record = client.get(path, params={"to": "megatron"}).json()
    raw = client.get(path, params={"to": "megatron", "raw": "true"})
    assert raw.status_code == 200
    assert raw.headers["content-type"].startswith("text/plain")
    assert raw.headers["content-disposition"] == 'attachment; filename="pretrain_gpt_args.txt"'
    assert raw.text == record["content"] and "--micro-batch-size" in raw.text


def test_an_unknown_target_is_refused_naming_to(client: TestClient, tiny_request: dict[str, Any]) -> None:
    search = stored_search(client, tiny_request)
    error = error_of(client.get(f"/v1/plans/{search['id']}/export", params={"to": "nemo"}), 422, "bad_input")
    assert named_fields(error) == {"to"}
    assert "megatron" in error["message"]
    missing = error_of(client.get(f"/v1/plans/{search['id']}/export"), 422, "invalid_request")
    assert any("to" in field for field in named_fields(missing))


@pytest.mark.parametrize("plan_id", [UNKNOWN_ID, "nope"])
def test_an_unknown_plan_search_is_not_found(client: TestClient, plan_id: str) -> None:
    error_of(client.get(f"/v1/plans/{plan_id}/export", params={"to": "request"}), 404, "not_found")


def test_a_rank_the_search_has_not_is_refused_naming_rank(client: TestClient, tiny_request: dict[str, Any]) -> None:
    search = stored_search(client, tiny_request)
    path = f"/v1/plans/{search['id']}/export"
    error = error_of(client.get(path, params={"to": "request", "rank": 99}), 422, "bad_input")
    assert named_fields(error) == {"rank"}
    zero = error_of(client.get(path, params={"to": "request", "rank": 0}), 422, "invalid_request")
    assert any("rank" in field for field in named_fields(zero))


def test_a_plan_the_stack_cannot_run_is_refused_naming_its_fields(
    client: TestClient, tiny_request: dict[str, Any]
) -> None:
    """torchtitan (PyTorch FSDP2) has no ZeRO-1; the search is held to ZeRO-1, so its best plan cannot go there."""
    search = stored_search(client, tiny_request, fixed={"zero_stage": 1})
    answer = client.get(f"/v1/plans/{search['id']}/export", params={"to": "torchtitan"})
    error = error_of(answer, 422, "invalid_plan")
    assert error["reason"] == "not_expressible"
    assert named_fields(error) == {"plan.zero_stage"}
    assert "torchtitan" in error["violations"][0]["message"]
