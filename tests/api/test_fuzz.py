"""Schema fuzzing: no request, however malformed, gets a 5xx (api/app.py: "A 500 is a bug"), and every answer is
as the OpenAPI document says: schemathesis's default checks, conformance included (each status a route returns is
declared, with its body's schema and media type; a request the schema says is invalid is refused; one it says is
valid is accepted, or refused only by a rule of the contract that JSON Schema does not state: `JUDGED_BODIES`).

schemathesis generates requests from the service's OpenAPI document (valid and invalid ones, every phase it
runs: examples, coverage, fuzzing) and sends them to the app in-process (ASGI). The contract's bodies are deep
(a model, a training setup, a cluster), so schema-generated bodies rarely get past validation; the last tests
fuzz the contract's *valid* shape around a known-good request, so the planner itself (estimates, plan searches
over random clusters) is fuzzed too.

Bounded for CI: a fixed number of examples per operation, derandomized (the same cases on every run). Cases
that take long are reported at the end of the module (a slow answer to a random request is a service problem
too, not a failure here).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis.config import SchemathesisConfig
from schemathesis.python import asgi

from api.app import create_app
from api.jobs.runner import kill_strays
from api.settings import Settings
from planner.presets import GPU_PRESETS, MODEL_PRESETS
from profiler.store import DATABASE_FILE_NAME

REPO_ROOT = Path(__file__).resolve().parents[2]
TOKEN = "fuzz-token-0123456789abcdef"
SLOW_CASE_S = 5.0
FUZZ = settings(max_examples=20, deadline=None, derandomize=True, database=None,
                suppress_health_check=list(HealthCheck))  # fmt: skip
slow_cases: list[tuple[float, str]] = []


def _openapi_document() -> dict[str, Any]:
    """The service's OpenAPI document, from a throwaway app (its lifespan never runs: nothing starts)."""
    with tempfile.TemporaryDirectory() as folder:
        app = create_app(Settings(data_dir=Path(folder), database_url="sqlite://"))
        try:
            return app.openapi()
        finally:
            app.state.service.store.close()


# The operations whose bodies the contract judges beyond what JSON Schema states: a plan that cannot run on its cluster
# (InfeasiblePlanError), sections that contradict each other (bf16 on a GPU without it, a profile of `what: all`
# without a model), a job larger than the server runs (nproc over its process limit, sequences too long to
# allocate), a kernel profile of a device no GPU preset is named after. A request valid by the schema may get their
# 422 (naming the field or the broken rule), as the contract says; every other check holds for them as for the rest.
JUDGED_BODIES = [
    f"POST /v1/{path}"
    for path in ("estimates", "estimates/timeline", "plans", "jobs", "profiles", "validations", "scaling",
                 "models/resolve", "kernel-checks")
]  # fmt: skip
CHECKS = {
    "operations": [
        {
            "include-name": JUDGED_BODIES,
            "checks": {"positive_data_acceptance": {"expected-statuses": ["2xx", "401", "403", "409", "422"]}},
        }
    ]
}
schema = schemathesis.openapi.from_dict(_openapi_document(), config=SchemathesisConfig.from_dict(CHECKS))


@pytest.fixture
def fuzzed_app(tmp_path: Path) -> Iterator[Any]:
    """A fresh app with a token (and an empty database) for each test."""
    data_dir = tmp_path / "data"
    settings_ = Settings.from_env(data_dir=data_dir, api_token=TOKEN, max_concurrent_jobs=1,
                                  database_url=f"sqlite:///{data_dir / DATABASE_FILE_NAME}")  # fmt: skip
    app = create_app(settings_)
    # A fuzzed job body that passes every check is queued but never started: this fuzzes the HTTP layer, not
    # torchrun (and keeps a 2-core CI machine free for the fuzzing).
    app.state.service.runner._launch = lambda job_id: None
    yield app
    asgi.shutdown_lifespans()
    kill_strays(data_dir)


@pytest.fixture(scope="module", autouse=True)
def report_slow_cases() -> Iterator[None]:
    """A warning (in pytest's summary) listing the cases answered slower than SLOW_CASE_S."""
    yield
    if slow_cases:
        lines = "\n".join(f"{seconds:6.1f} s  {case}" for seconds, case in sorted(slow_cases, reverse=True))
        warnings.warn(f"fuzz cases answered slower than {SLOW_CASE_S} s:\n{lines}", stacklevel=1)


def _call(case: Any, app: Any, **kwargs: Any) -> Any:
    """Send `case` to `app`; fail on a 5xx or an answer the document does not describe; note the case if slow."""
    start = time.perf_counter()
    response = case.call(app=app, **kwargs)
    elapsed = time.perf_counter() - start
    if elapsed > SLOW_CASE_S:
        slow_cases.append((elapsed, case.as_curl_command()))
    case.validate_response(response)  # every default check: no 5xx, and the answer as the document says
    return response


# ================================================================================= from the OpenAPI schema


@schema.parametrize()
@FUZZ
def test_no_server_errors(case: Any, fuzzed_app: Any) -> None:
    """Every operation, with whatever Authorization header the fuzzer makes up (401/403 where one is needed)."""
    _call(case, fuzzed_app)


# `exclude` of the others, not `include`: with per-operation checks configured (CHECKS), schemathesis ORs an include
# with the configuration's own selection of every operation, and would select them all.
@schema.exclude(method_regex="^(?!POST$)").exclude(path_regex=r"^(?!/v1/(jobs|profiles))").parametrize()
@FUZZ
def test_no_server_errors_with_the_token(case: Any, fuzzed_app: Any) -> None:
    """The endpoints that start processes, past the token check, so that their bodies are fuzzed too."""
    _call(case, fuzzed_app, headers={"Authorization": f"Bearer {TOKEN}"})


# ============================================================================ around a valid request

POWERS = st.sampled_from([1, 1, 2, 2, 4, 8, 3, 16, 64])
GPUS = st.sampled_from(sorted(GPU_PRESETS))
VALID = settings(FUZZ, max_examples=25)


@st.composite
def models(draw: st.DrawFn, tp: int = 1, min_layers: int = 1) -> dict[str, Any]:
    """A preset, or a custom model (attention heads divisible by `tp`, at least `min_layers` layers)."""
    if draw(st.booleans()):
        return {"name": draw(st.sampled_from(sorted(MODEL_PRESETS)))}
    heads = tp * draw(st.sampled_from([1, 2, 3, 4, 8, 12, 32, 96]))
    return {
        "num_layers": draw(st.integers(min_layers, max(min_layers, 256))),
        "hidden_size": heads * draw(st.sampled_from([1, 8, 64, 128])),
        "num_attention_heads": heads,
        "num_kv_heads": draw(st.sampled_from([heads, tp])),
        "vocab_size": draw(st.integers(1, 300_000)),
        "mlp": draw(st.sampled_from(["gelu", "swiglu"])),
        "norm": draw(st.sampled_from(["layernorm", "rmsnorm"])),
        "tie_embeddings": draw(st.booleans()),
        **draw(st.sampled_from([{}, {"num_experts": 8, "experts_per_token": 2}, {"num_experts": 64}])),
    }


def trainings(batch: st.SearchStrategy[int]) -> st.SearchStrategy[dict[str, Any]]:
    return st.fixed_dictionaries(
        {"seq_len": st.sampled_from([1, 7, 128, 2048, 8192, 131_072]), "global_batch_size": batch},
        optional={
            "precision": st.sampled_from(["bf16", "fp16", "fp32"]),
            "optimizer": st.sampled_from(["adamw", "sgd"]),
        },
    )


@st.composite
def estimate_bodies(draw: st.DrawFn) -> dict[str, Any]:
    """The contract's request with a plan that mostly passes validation (degrees that multiply to the cluster's
    GPU count, options that go together), so it reaches the cost model, over random models, GPUs and shapes."""
    dp, tp, pp, cp = (draw(POWERS) for _ in range(4))
    world = dp * tp * pp * cp
    per_node = draw(st.sampled_from([d for d in range(1, 17) if world % d == 0]))
    mbs = draw(st.sampled_from([1, 2, 3, 8]))
    schedule = draw(st.sampled_from(["gpipe", "1f1b", *(["interleaved_1f1b"] if pp > 1 else [])]))
    virtual = draw(st.sampled_from([2, 3])) if schedule == "interleaved_1f1b" else 1
    plan = {"dp": dp, "tp": tp, "pp": pp, "cp": cp, "micro_batch_size": mbs, "zero_stage": draw(st.integers(0, 3)),
            "sequence_parallel": tp > 1 and draw(st.booleans()), "schedule": schedule, "virtual_stages": virtual,
            "recompute": draw(st.sampled_from(["none", "selective", "full"]))}  # fmt: skip
    return {
        "model": draw(models(tp, min_layers=pp * virtual)),
        "training": draw(trainings(st.just(dp * mbs * draw(st.integers(1, 64))))),
        "cluster": {"gpu": draw(GPUS), "num_nodes": world // per_node, "gpus_per_node": per_node},
        "plan": plan,
    }


@st.composite
def plan_bodies(draw: st.DrawFn) -> dict[str, Any]:
    """A plan search over a random cluster (up to 4,096 nodes) with random search options."""
    cluster = {"gpu": draw(GPUS), "num_nodes": draw(st.sampled_from([1, 2, 3, 16, 128, 1000, 4096])),
               "gpus_per_node": draw(st.sampled_from([1, 2, 4, 6, 8, 16]))}  # fmt: skip
    search = draw(st.fixed_dictionaries({}, optional={
        "top_k": st.integers(1, 100), "max_memory_fraction": st.floats(0.01, 1.0),
        "zero_stages": st.lists(st.integers(0, 3), min_size=1, max_size=4),
        "micro_batch_sizes": st.lists(st.integers(1, 64), min_size=1, max_size=4),
        "max_tp": st.integers(1, 64), "max_cp": st.integers(1, 64), "max_virtual_stages": st.integers(1, 8),
        "tp_within_node": st.booleans(), "partition": st.booleans(),
    }))  # fmt: skip
    batch = st.sampled_from([1, 8, 1536, 65_536, 1_000_000])
    return {"model": draw(models()), "training": draw(trainings(batch)), "cluster": cluster, "search": search}


@VALID
@given(body=estimate_bodies())
def test_estimates_of_valid_shaped_requests(body: dict[str, Any], fuzzed_app: Any) -> None:
    response = _call(schema["/v1/estimates"]["POST"].Case(body=body, media_type="application/json"), fuzzed_app)
    if response.status_code == 200:
        answer = response.json()
        assert math.isfinite(answer["step_time_s"]) and answer["step_time_s"] > 0, answer
    else:
        assert response.status_code == 422, response.text


@VALID
@given(body=plan_bodies())
def test_plan_searches_of_valid_shaped_requests(body: dict[str, Any], fuzzed_app: Any) -> None:
    response = _call(schema["/v1/plans"]["POST"].Case(body=body, media_type="application/json"), fuzzed_app)
    assert response.status_code in (201, 422), response.text


# ================================================================================ what fuzzing found


def test_an_app_serves_again_after_its_lifespan_restarts(fuzzed_app: Any) -> None:
    for _ in range(2):
        with asgi.get_client(fuzzed_app) as client:
            response = client.get("/readyz")
            assert response.status_code == 200, response.text
        asgi.shutdown_lifespans()


def test_a_search_over_too_many_gpus_names_a_cluster_field(fuzzed_app: Any) -> None:
    body = json.loads((REPO_ROOT / "executor" / "examples" / "tiny-llama-2cpu.json").read_text())
    del body["plan"]
    body["cluster"] |= {"num_nodes": 129, "gpus_per_node": 1024}
    response = _call(schema["/v1/plans"]["POST"].Case(body=body, media_type="application/json"), fuzzed_app)
    assert response.status_code == 422, response.text
    fields = [field["field"] for field in response.json()["error"]["fields"]]
    assert fields and all(field.startswith("cluster.") for field in fields), response.text


SEARCH_WITH_A_LARGE_BATCH = {
    "model": {"name": "gpt3-175b"},
    "training": {"seq_len": 2048, "global_batch_size": 2**24},
    "cluster": {"gpu": "h100-sxm", "num_nodes": 8, "gpus_per_node": 8},
}
SEARCH_SCRIPT = """
import json, sys, time
from pathlib import Path
from schemathesis.python import asgi
from api.app import create_app
from api.settings import Settings
folder = Path(sys.argv[1])
app = create_app(Settings(data_dir=folder, database_url=f"sqlite:///{folder / 'paraplan.db'}"))
with asgi.get_client(app) as client:
    start = time.perf_counter()
    response = client.post("/v1/plans", json=json.loads(sys.argv[2]))
    print(json.dumps({"status": response.status_code, "seconds": time.perf_counter() - start}))
"""


def test_a_plan_search_over_a_large_batch_is_answered_in_seconds(tmp_path: Path) -> None:
    """The search runs in a process of its own, killed at the deadline, so a slow one cannot hold up the suite."""
    env = {name: value for name, value in os.environ.items() if not name.startswith("PARAPLAN_")}
    command = [sys.executable, "-c", SEARCH_SCRIPT, str(tmp_path), json.dumps(SEARCH_WITH_A_LARGE_BATCH)]
    try:
        done = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=20)
    except subprocess.TimeoutExpired:
        pytest.fail("the search was not answered in 20 s")
    answer = json.loads(done.stdout.splitlines()[-1])
    assert answer["status"] == 201 and answer["seconds"] < 8, answer
