"""`GET /v1/plans/{id}/export?to=...&rank=k`: the `rank`-th plan of a stored search as the configuration of the stack
that runs it (api/commands/export.py), with its estimate under that stack's regime; `raw=true` answers the file
itself."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import Response

from api.commands.export import ExportAnswer, export, require_target
from api.routes.common import ServiceDep, json_response, not_found
from api.routes.responses import answered_as, errors
from api.service import stored_plan_request, stored_profile_resolver
from planner.export import TARGETS

router = APIRouter(prefix="/plans", tags=["plans"])

# The schema lists the targets (a client, or a schema fuzzer, reads them there); `require_target` still answers an
# unknown one with its own message naming them.
Target = Annotated[str, Query(description=f"one of {', '.join(TARGETS)}", json_schema_extra={"enum": list(TARGETS)})]
Rank = Annotated[int, Query(ge=1, le=100, description="which of the search's ranked plans (1 = the best)")]
Raw = Annotated[bool, Query(description="answer the file itself (its media type) instead of the JSON record")]


@router.get(
    "/{plan_id}/export",
    summary="Export a stored search's plan to Megatron-LM, DeepSpeed, torchtitan, Accelerate or the contract request",
    response_description="the file, the stack it is for, notes on what to set in code, and the plan's estimate",
    responses=answered_as("With `raw`, the file itself", "text/plain", "application/yaml", "application/toml")
    | errors(404, 422),
)
async def export_plan(plan_id: str, service: ServiceDep, to: Target, rank: Rank = 1, raw: Raw = False) -> Response:
    require_target(to)
    if service.store.get_plan(plan_id) is None:
        raise not_found("plan search", plan_id)

    def exported() -> ExportAnswer:
        request = stored_plan_request(service.store, plan_id, rank, rank_field="rank")
        return export(request, to, stored_profile_resolver(service.store))

    answer = await run_in_threadpool(exported)
    if raw:
        disposition = {"Content-Disposition": f'attachment; filename="{answer.export.filename}"'}
        return Response(answer.export.text, media_type=answer.export.media_type, headers=disposition)
    return json_response(answer.to_json())
