"""The web page's side of the service, in-process: the page and its files at `/` and `/static`, `/docs` on the
vendored Swagger UI (nothing from a CDN), the package data that ships them, and the two routes the page uses
beside the contract's: `POST /v1/scaling` (the GPU-count sweep with its Pareto front) and `POST /v1/models/resolve`
(a pasted config -> ModelSpec). The page itself runs in a browser in tests/browser."""

from __future__ import annotations

import re
import tomllib
from fnmatch import fnmatch
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from api.routes.pages import WEB_DIR
from api.routes.scaling import mark_pareto_front, node_counts
from planner.specs.base import MAX_GPUS

REPO_ROOT = Path(__file__).resolve().parents[2]
# TinyLlama 1.1B's published config.json (the fields the reader takes).
HF_CONFIG = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 2048,
             "intermediate_size": 5632, "num_attention_heads": 32, "num_hidden_layers": 22, "num_key_value_heads": 4,
             "vocab_size": 32000, "tie_word_embeddings": False}  # fmt: skip


def assert_error(response: Any, status: int, field: str | None = None) -> dict[str, Any]:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    if field is not None:
        assert field in [f["field"] for f in error.get("fields", [])], error
    return error


def search_body(tiny_request: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in tiny_request.items() if key != "plan"} | {"search": {"top_k": 2}}


# ================================================================================================ the page


def test_the_page_and_every_file_it_names_are_served(idle_client: TestClient) -> None:
    page = idle_client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html"), page.headers
    named = re.findall(r'(?:src|href)="(/[^"]*)"', page.text)
    assert "/static/app.js" in named and "/static/style.css" in named and "/docs" in named, named
    for path in named:
        assert idle_client.get(path).status_code == 200, path
    # The page's modules import each other by relative paths: each one resolves to a served file.
    for script in WEB_DIR.glob("*.js"):
        for module in re.findall(r'from "\./([^"]+)"', script.read_text()):
            assert idle_client.get(f"/static/{module}").status_code == 200, (script.name, module)
    assert not re.search(r'(?:src|href)="https?://', page.text), "the page must load nothing from another host"


def test_an_unknown_static_file_is_a_404_in_the_common_shape(idle_client: TestClient) -> None:
    assert_error(idle_client.get("/static/no-such-file.js"), 404)
    assert_error(idle_client.get("/static/../api/app.py"), 404)


def test_the_docs_load_swagger_ui_from_this_server(idle_client: TestClient) -> None:
    docs = idle_client.get("/docs")
    assert docs.status_code == 200, docs.text
    urls = re.findall(r"""(?:src|href|url)\s*[:=]\s*['"]([^'"]+)['"]""", docs.text)
    assert "/static/vendor/swagger-ui/swagger-ui-bundle.js" in urls and "/openapi.json" in urls, urls
    assert all(url.startswith("/") for url in urls), urls
    for url in urls:
        assert idle_client.get(url).status_code == 200, url
    assert "cdn." not in docs.text
    assert_error(idle_client.get("/redoc"), 404)


def test_the_package_data_ships_every_web_file() -> None:
    """Every file of api/web matches a glob of pyproject's package-data for `api`, so the wheel has the page."""
    globs = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["api"]
    files = [path.relative_to(WEB_DIR.parent).as_posix() for path in WEB_DIR.rglob("*") if path.is_file()]
    assert "web/vendor/swagger-ui/LICENSE" in files
    missing = [name for name in files if not any(fnmatch(name, pattern) and name.count("/") == pattern.count("/")
                                                 for pattern in globs)]  # fmt: skip
    assert missing == [], f"not in [tool.setuptools.package-data] api: {missing}"


# ============================================================================================ the sweep


def test_the_sweep_answers_the_best_plan_at_each_node_count(idle_client: TestClient, tiny_request: dict) -> None:
    body = search_body(tiny_request)
    answer = idle_client.post("/v1/scaling", json=body | {"nodes": [4, 1, 2, 2]})
    assert answer.status_code == 200, answer.text
    points = answer.json()["points"]
    assert [p["num_nodes"] for p in points] == [1, 2, 4] and [p["num_gpus"] for p in points] == [2, 4, 8]
    for point in points:  # each is the best plan the search itself ranks first there
        cluster = body["cluster"] | {"num_nodes": point["num_nodes"]}
        searched = idle_client.post("/v1/plans", json=body | {"cluster": cluster}).json()["result"]["plans"]
        assert point["found"] == len(searched) and point["best"]["plan"] == searched[0]["plan"], point
        assert point["best"]["step_time_s"] == searched[0]["estimate"]["step_time_s"]
    assert points[0]["pareto"]  # the fewest GPUs is never beaten on GPU count


def test_the_default_sweep_is_around_the_requested_node_count() -> None:
    assert node_counts(None, 8, 8) == [2, 4, 8, 16, 32]
    assert node_counts(None, 1, 8) == [1, 2, 4]
    assert node_counts(None, MAX_GPUS // 8, 8) == [MAX_GPUS // 32, MAX_GPUS // 16, MAX_GPUS // 8]


def test_the_pareto_front_keeps_only_what_more_gpus_buy() -> None:
    def point(gpus: int, step_s: float | None) -> dict[str, Any]:
        return {"num_gpus": gpus, "best": None if step_s is None else {"step_time_s": step_s}}

    points = [point(8, 10.0), point(16, 6.0), point(32, 6.5), point(64, None), point(128, 2.0), point(256, 2.0)]
    assert [p["pareto"] for p in mark_pareto_front(points)] == [True, True, False, False, True, False]


@pytest.mark.parametrize(
    ("nodes", "field"),
    [([1, "2"], "nodes[1]"), ([0], "nodes[0]"), ([True], "nodes[0]"), ([1, 10**9], "nodes[1]"), (4, "nodes"),
     ([], "nodes"), (list(range(1, 10)), "nodes")],
)  # fmt: skip
def test_bad_node_counts_are_named(idle_client: TestClient, tiny_request: dict, nodes: Any, field: str) -> None:
    error = assert_error(idle_client.post("/v1/scaling", json=search_body(tiny_request) | {"nodes": nodes}), 422, field)
    assert field in error["message"]


def test_a_bad_request_is_named_before_any_search(idle_client: TestClient, tiny_request: dict) -> None:
    body = search_body(tiny_request)
    body["training"] = body["training"] | {"seq_len": 2.5}
    assert_error(idle_client.post("/v1/scaling", json=body), 422, "training.seq_len")
    assert idle_client.get("/v1/plans").json()["plans"] == []  # the sweep stores nothing either way


# ====================================================================================== pasted models


def test_a_hugging_face_config_resolves_to_its_model_spec(idle_client: TestClient) -> None:
    answer = idle_client.post("/v1/models/resolve", json=HF_CONFIG)
    assert answer.status_code == 200, answer.text
    spec = answer.json()["spec"]
    shape = (spec["num_layers"], spec["hidden_size"], spec["num_kv_heads"], spec["ffn_hidden_size"])
    assert shape == (22, 2048, 4, 5632), spec
    assert answer.json()["params"] == pytest.approx(1.1e9, rel=0.01)  # TinyLlama's 1.1 B
    again = idle_client.post("/v1/models/resolve", json=spec)  # a ModelSpec resolves to itself
    assert again.status_code == 200 and again.json() == answer.json(), again.text


def test_a_preset_with_overrides_resolves(idle_client: TestClient) -> None:
    answer = idle_client.post("/v1/models/resolve", json={"name": "llama3-8b", "num_layers": 2})
    assert answer.status_code == 200 and answer.json()["spec"]["num_layers"] == 2, answer.text


@pytest.mark.parametrize(
    ("body", "field"),
    [({**HF_CONFIG, "model_type": "nosuchmodel"}, None), ({"num_layers": "x", "hidden_size": 64}, "num_layers"),
     ({"name": "no-such-preset"}, None)],
)  # fmt: skip
def test_a_model_that_cannot_be_read_is_a_422(idle_client: TestClient, body: dict, field: str | None) -> None:
    assert_error(idle_client.post("/v1/models/resolve", json=body), 422, field)


def test_a_model_body_must_be_a_json_object(idle_client: TestClient) -> None:
    assert_error(idle_client.post("/v1/models/resolve", json=[1, 2]), 422, "body")
