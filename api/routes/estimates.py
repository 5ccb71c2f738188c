"""`POST /v1/estimates`: the contract's request with a `plan` -> its StepEstimate; `POST /v1/estimates/timeline`: the
same request -> its pipeline schedule, task by task (what a timeline draws)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import Response

from api import service as planning
from api.routes.common import ServiceDep, body_schema, json_body, json_response
from api.routes.responses import READS_A_BODY, errors

router = APIRouter(prefix="/estimates", tags=["estimates"])


@router.post(
    "",
    summary="Predict one training step of a plan: time, memory per stage, and where the time goes",
    openapi_extra=body_schema("EstimateRequest"),
    responses=errors(*READS_A_BODY),
    response_description="the StepEstimate",
)
async def create_estimate(request: Request, service: ServiceDep) -> Response:
    body = await json_body(request)
    return json_response(await run_in_threadpool(planning.estimate, body, service.store))


@router.post(
    "/timeline",
    summary="The pipeline schedule of a plan's step: every forward, recompute and backward task with its start and end",
    openapi_extra=body_schema("EstimateRequest"),
    responses=errors(*READS_A_BODY),
    response_description="the PipelineTimeline",
)
async def create_timeline(request: Request, service: ServiceDep) -> Response:
    body = await json_body(request)
    return json_response(await run_in_threadpool(planning.timeline, body, service.store))
