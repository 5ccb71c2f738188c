"""Profiles: `POST /v1/profiles` starts a profiling job (token; 202 + id), `GET /v1/profiles` lists profiling
jobs and every stored profile, `GET /v1/profiles/{id}` shows one (with the profile once measured). A profiling
job's profile is stored under the job's id, which is what `cluster.profile` then takes."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response

from api.jobs.profile import prepare_profile_job
from api.routes.common import Limit, ServiceDep, TokenDep, body_schema, json_response, json_with, not_found
from api.routes.jobs import IdempotencyKey, accept_job, job_view
from api.routes.responses import STARTS_A_JOB, errors
from api.store import JobRow
from planner.profiles import ProfileError

router = APIRouter(prefix="/profiles", tags=["profiles"])


@router.post(
    "",
    status_code=202,
    dependencies=[TokenDep],
    summary="Profile this machine (layer compute and/or collectives); the profile is stored under the job's id",
    openapi_extra=body_schema("ProfileJobBody"),
    responses=errors(*STARTS_A_JOB),
)
async def create_profile(request: Request, service: ServiceDep, idempotency_key: IdempotencyKey = None) -> Response:
    return await accept_job(
        request,
        service,
        "profile",
        idempotency_key,
        lambda body, job_id: prepare_profile_job(body, job_id, service.settings),
    )


@router.get("", summary="Profiling jobs and stored profiles, newest first", responses=errors(422))
def list_profiles(service: ServiceDep, limit: Limit = 100) -> Response:
    jobs = service.store.jobs(kind="profile", limit=limit)
    from_jobs = {row.id for row in jobs}
    stored = [_stored_view(asdict(s)) for s in service.store.profiles.summaries() if s.id not in from_jobs]
    views = [job_view(service, row) | _summary_of(service, row) for row in jobs] + stored
    views.sort(key=lambda view: view["created"], reverse=True)
    return json_response({"profiles": views[:limit]})


@router.get(
    "/{profile_id}",
    summary="A profiling job or stored profile, with the profile once it is measured",
    responses=errors(404, 422),
)
def get_profile(profile_id: str, service: ServiceDep) -> Response:
    row = service.store.get_job(profile_id)
    if row is not None and row.kind == "profile":
        view = job_view(service, row) | _summary_of(service, row)
        return json_response(json_with(view, profile=_profile_text(service, row.profile_id)))
    summary = service.store.profiles.summary(profile_id)
    if summary is None:
        raise not_found("profile", profile_id)
    return json_response(json_with(_stored_view(asdict(summary)), profile=_profile_text(service, profile_id)))


def _stored_view(summary: dict[str, Any]) -> dict[str, Any]:
    """A profile stored without a job here (`paraplan profile ... --store`)."""
    return {"id": summary["id"], "kind": "profile", "state": "SUCCEEDED", "created": summary["created"],
            "profile_id": summary["id"], "summary": summary,
            "links": {"self": f"/v1/profiles/{summary['id']}"}}  # fmt: skip


def _summary_of(service: ServiceDep, row: JobRow) -> dict[str, Any]:
    if row.profile_id is None:
        return {"summary": None}
    found = service.store.profiles.summary(row.profile_id)
    return {"summary": asdict(found) if found else None}


def _profile_text(service: ServiceDep, profile_id: str | None) -> str:
    if profile_id is None:
        return "null"
    try:
        return service.store.profiles.get(profile_id).model_dump_json()
    except ProfileError:
        return "null"
