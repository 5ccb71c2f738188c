"""Validations: `POST /v1/validations` starts `paraplan validate` as a job (token; 202 + id), `GET /v1/validations`
lists them, `GET /v1/validations/{id}` shows one (progress; once done its figures, its measured runs and the id of
its calibrated profile), `/report` and `/plot` serve its Markdown report and PNG plot."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, Response

from api.commands.loop.report import PLOT_FILE, REPORT_FILE
from api.jobs.validate import OUT_FOLDER, prepare_validation_job
from api.routes.common import Limit, ServiceDep, TokenDep, body_schema, json_response, not_found
from api.routes.jobs import IdempotencyKey, accept_job, job_view, measured_view
from api.routes.responses import STARTS_A_JOB, MarkdownResponse, PngResponse, errors
from api.store import JobRow

router = APIRouter(prefix="/validations", tags=["validations"])


@router.post(
    "",
    status_code=202,
    dependencies=[TokenDep],
    summary="Validate the cost model on this machine: profile, run every valid plan, compare, recalibrate",
    openapi_extra=body_schema("ValidationJobBody"),
    responses=errors(*STARTS_A_JOB),
)
async def create_validation(request: Request, service: ServiceDep, idempotency_key: IdempotencyKey = None) -> Response:
    return await accept_job(
        request,
        service,
        "validate",
        idempotency_key,
        lambda body, job_id: prepare_validation_job(body, job_id, service.settings, service.store),
    )


@router.get("", summary="Validation jobs, newest first", responses=errors(422))
def list_validations(service: ServiceDep, limit: Limit = 100) -> Response:
    rows = service.store.jobs(kind="validate", limit=limit)
    return json_response({"validations": [job_view(service, row) for row in rows]})


@router.get(
    "/{validation_id}",
    summary="A validation: progress, figures, measured runs, calibrated profile",
    responses=errors(404, 422),
)
def get_validation(validation_id: str, service: ServiceDep) -> Response:
    row = _validation(service, validation_id)
    runs = service.store.measured_runs(validation_id=row.id, limit=10_000)
    return json_response(job_view(service, row) | {"measured_runs": [measured_view(run) for run in runs]})


@router.get(
    "/{validation_id}/report",
    summary="The validation's Markdown report",
    response_class=MarkdownResponse,
    responses=errors(404, 422),
)
def get_report(validation_id: str, service: ServiceDep) -> Response:
    return _result_file(service, validation_id, REPORT_FILE, "text/markdown; charset=utf-8")


@router.get(
    "/{validation_id}/plot",
    summary="The validation's PNG plot (predicted vs measured, breakdown)",
    response_class=PngResponse,
    responses=errors(404, 422),
)
def get_plot(validation_id: str, service: ServiceDep) -> Response:
    return _result_file(service, validation_id, PLOT_FILE, "image/png")


def _validation(service: ServiceDep, validation_id: str) -> JobRow:
    row = service.store.get_job(validation_id)
    if row is None or row.kind != "validate":
        raise not_found("validation", validation_id)
    return row


def _result_file(service: ServiceDep, validation_id: str, name: str, media_type: str) -> Response:
    row = _validation(service, validation_id)
    path: Path = service.runner.job_dir(row.id) / OUT_FOLDER / name
    if row.state != "SUCCEEDED" or not path.is_file():
        raise not_found(f"{name} of validation (state {row.state})", validation_id)
    return FileResponse(path, media_type=media_type)
