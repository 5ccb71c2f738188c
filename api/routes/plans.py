"""`POST /v1/plans` (search, stored), `GET /v1/plans`, `GET /v1/plans/{id}`."""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import Response

from api.routes.common import Limit, Offset, ServiceDep, body_schema, json_body, json_response, json_with, not_found
from api.routes.responses import RUNS_A_SEARCH, errors
from api.store import PlanRow

router = APIRouter(prefix="/plans", tags=["plans"])


def plan_summary(row: PlanRow) -> dict[str, Any]:
    return {"id": row.id, "created": row.created, "model_name": row.model_name, "num_gpus": row.num_gpus,
            "found": row.found, "best_step_time_s": row.best_step_time_s,
            "links": {"self": f"/v1/plans/{row.id}"}}  # fmt: skip


def plan_text(row: PlanRow) -> str:
    """The stored search as JSON: its summary, the request as posted, and the SearchResult."""
    return json_with(plan_summary(row), request=row.request, result=row.result)


@router.post(
    "",
    status_code=201,
    summary="Search for the fastest plans that fit; the search is stored and returned with its id",
    openapi_extra=body_schema("PlanRequest"),
    responses=errors(*RUNS_A_SEARCH),
)
async def create_plan(request: Request, service: ServiceDep) -> Response:
    body = await json_body(request)
    parsed, pending = await run_in_threadpool(service.searches.submit, body)
    # Awaited here, not in a thread: a thread per waiting search would starve the other routes of threads. Shielded:
    # an identical request may be waiting for the same answer. A dead worker's SearchUnavailable is a 503 (app.py).
    answer = await asyncio.shield(asyncio.wrap_future(pending))
    row = await run_in_threadpool(service.searches.store, body, parsed, answer)
    return json_response(plan_text(row), 201, {"Location": f"/v1/plans/{row.id}"})


@router.get("", summary="Stored plan searches, newest first (summaries)", responses=errors(422))
def list_plans(service: ServiceDep, limit: Limit = 50, offset: Offset = 0) -> Response:
    return json_response({"plans": [plan_summary(row) for row in service.store.plans(limit, offset)]})


@router.get("/{plan_id}", summary="One stored plan search: request and result", responses=errors(404, 422))
def get_plan(plan_id: str, service: ServiceDep) -> Response:
    row = service.store.get_plan(plan_id)
    if row is None:
        raise not_found("plan search", plan_id)
    return json_response(plan_text(row))
