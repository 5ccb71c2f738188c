"""Training jobs: `POST /v1/jobs` (token; Idempotency-Key), `GET /v1/jobs`, `GET /v1/jobs/{id}`, its metrics,
its logs (text, or a server-sent-events stream that follows the job to its end) and `POST .../cancel` (token).

`submit_job` and `job_view` serve the profiling jobs of api/routes/profiles.py too.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import shutil
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Header, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import Response
from sse_starlette import EventSourceResponse

from api.errors import InputError
from api.jobs.supervise import OUTPUT_FILE
from api.jobs.train import RUN_FOLDER, prepare_train_job, train_job_view
from api.jobs.validate import validation_details
from api.routes.common import (
    ApiError,
    Limit,
    Offset,
    Service,
    ServiceDep,
    TokenDep,
    body_schema,
    json_body,
    json_response,
    not_found,
)
from api.routes.responses import NEEDS_THE_TOKEN, STARTS_A_JOB, TextResponse, answered_as, errors
from api.store import FINAL_STATES, JobRow, dumps, new_id
from executor.config import RunDir

router = APIRouter(prefix="/jobs", tags=["jobs"])

IdempotencyKey = Annotated[
    str | None, Header(alias="Idempotency-Key", description="a retried POST with the same key returns the same job")
]
MAX_LOG_CHUNK_BYTES = 1 << 20
SSE_POLL_S = 0.25
"""How often a followed job's output file is read for new lines while the job runs."""
SSE_PING_S = 15.0
"""A comment line this often on a followed job's stream (sse-starlette's ping): proxies close a connection idle for
60 s by default (nginx's proxy_read_timeout), and a quiet job writes nothing for longer. SSE clients skip comments."""


# ============================================================================================= submitting


def submit_job(
    service: Service, kind: str, body: dict[str, Any], key: str | None, prepare: Callable[[str], JobRow]
) -> tuple[JobRow, bool]:
    """Prepare and queue a job of `kind`; (job, True). With an Idempotency-Key already used for the same body:
    (that job, False); used for another body: 409. Keys are per kind: a profile and a training job may share one."""
    body_hash = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()
    stored_key = None if key is None else f"{kind}:{_checked(key)}"
    if stored_key is not None:
        existing = service.store.job_by_key(stored_key)
        if existing is not None:
            return _replayed(existing, body_hash), False
    row = prepare(new_id())
    row.body, row.body_hash, row.idempotency_key = dumps(body), body_hash, stored_key
    stored, created = service.store.add_job(row)
    if not created:  # another request with this key won the race: drop what this one prepared
        shutil.rmtree(service.runner.job_dir(row.id), ignore_errors=True)
        return _replayed(stored, body_hash), False
    service.runner.wake()
    return stored, True


def _checked(key: str) -> str:
    if not 1 <= len(key) <= 240 or not key.isprintable():
        raise InputError.at("Idempotency-Key", "must be 1 to 240 printable characters")
    return key


def _replayed(existing: JobRow, body_hash: str) -> JobRow:
    if existing.body_hash != body_hash:
        raise ApiError(
            "conflict", f"Idempotency-Key already used for job {existing.id} with a different body", job_id=existing.id
        )
    return existing


async def accept_job(
    request: Request, service: Service, kind: str, key: str | None, prepare: Callable[[dict[str, Any], str], JobRow]
) -> Response:
    """A POST that queues a job: 202 with the job (and where it lives), also when it replays an earlier one."""
    body = await json_body(request)

    def submit() -> tuple[dict[str, Any], bool]:
        row, created = submit_job(service, kind, body, key, lambda job_id: prepare(body, job_id))
        return job_view(service, row), created

    view, created = await run_in_threadpool(submit)
    replayed = {} if created else {"Idempotent-Replayed": "true"}
    return json_response(view, 202, {"Location": view["links"]["self"], **replayed})


# ================================================================================================ viewing


def job_view(service: Service, row: JobRow) -> dict[str, Any]:
    """A job as the API shows it: state, timing, why it failed, and what its kind adds (progress, results)."""
    collection = {"train": "jobs", "profile": "profiles", "validate": "validations"}[row.kind]
    view: dict[str, Any] = {
        "id": row.id, "kind": row.kind, "state": row.state, "created": row.created, "started": row.started,
        "finished": row.finished, "nproc": row.nproc, "launcher": row.launcher, "nodes": row.nodes,
        "slurm_job_id": row.slurm_job_id, "slurm_state": row.slurm_state, "cancel_requested": row.cancel_requested,
        "failure_reason": row.failure_reason, "returncode": row.returncode,
        "links": {"self": f"/v1/{collection}/{row.id}", "logs": f"/v1/jobs/{row.id}/logs"},
    }  # fmt: skip
    if row.kind == "train":
        details = train_details(service, row)
        view |= details | {"links": view["links"] | details["links"]}
    elif row.kind == "validate":
        links = {"report": f"/v1/validations/{row.id}/report", "plot": f"/v1/validations/{row.id}/plot"}
        view |= validation_details(row, service.runner.job_dir(row.id)) | {"links": view["links"] | links}
    else:
        view["profile_id"] = row.profile_id
    return view


def train_details(service: Service, row: JobRow) -> dict[str, Any]:
    estimate = json.loads(row.estimate) if row.estimate else None
    measured = service.store.measured_runs(job_id=row.id, limit=1)
    details = train_job_view(row, service.runner.job_dir(row.id))
    return details | {
        "plan_id": row.plan_id,
        "predicted": {"step_time_s": estimate["step_time_s"], "peak_bytes": estimate["memory"]["peak_bytes"]}
        if estimate
        else None,
        "measured_run": measured_view(measured[0]) if measured else None,
        "links": {"metrics": f"/v1/jobs/{row.id}/metrics"},
    }


def measured_view(run: Any) -> dict[str, Any]:
    """A measured run as the API shows it; a validation's runs carry their plan too."""
    fields = ("id", "steps", "predicted_step_time_s", "measured_step_time_s", "measured_tokens_per_s",
              "predicted_peak_bytes", "measured_peak_bytes")  # fmt: skip
    view = {name: getattr(run, name) for name in fields}
    if run.validation_id is not None:
        view["plan"] = json.loads(run.request)["plan"]
    return view


def get_job_row(service: Service, job_id: str, kind: str | None = "train") -> JobRow:
    row = service.store.get_job(job_id)
    if row is None or (kind is not None and row.kind != kind):
        raise not_found("training job" if kind == "train" else "job", job_id)
    return row


# ================================================================================================= routes


@router.post(
    "",
    status_code=202,
    dependencies=[TokenDep],
    summary="Run a training job: the contract's request with `plan` (or `plan_id`) plus steps, nproc, data, ...",
    openapi_extra=body_schema("TrainJobRequest"),
    responses=errors(*STARTS_A_JOB),
)
async def create_job(request: Request, service: ServiceDep, idempotency_key: IdempotencyKey = None) -> Response:
    def prepare(body: dict[str, Any], job_id: str) -> JobRow:
        return prepare_train_job(body, job_id, service.store, service.settings)

    return await accept_job(request, service, "train", idempotency_key, prepare)


@router.get("", summary="Training jobs, newest first", responses=errors(422))
def list_jobs(
    service: ServiceDep,
    state: Annotated[Literal["QUEUED", "RUNNING", "SUCCEEDED", "FAILED", "CANCELLED"] | None, Query()] = None,
    limit: Limit = 50,
    offset: Offset = 0,
) -> Response:
    rows = service.store.jobs(kind="train", states=[state] if state else [], limit=limit, offset=offset)
    return json_response({"jobs": [job_view(service, row) for row in rows]})


@router.get("/{job_id}", summary="One training job: state, failure reason, latest metrics", responses=errors(404, 422))
def get_job(job_id: str, service: ServiceDep) -> Response:
    return json_response(job_view(service, get_job_row(service, job_id)))


@router.get(
    "/{job_id}/metrics",
    summary="Every step's metrics, the summary, and the prediction beside it",
    responses=errors(404, 422),
)
def get_metrics(job_id: str, service: ServiceDep) -> Response:
    row = get_job_row(service, job_id)
    run_dir = RunDir(service.runner.job_dir(job_id) / RUN_FOLDER)
    view = train_details(service, row)
    return json_response({"id": job_id, "state": row.state, "steps": run_dir.read_metrics(),
                          "summary": view["summary"], "predicted": view["predicted"],
                          "measured_run": view["measured_run"]})  # fmt: skip


@router.post(
    "/{job_id}/cancel",
    dependencies=[TokenDep],
    summary="Cancel a job (every rank is stopped)",
    responses=errors(*NEEDS_THE_TOKEN, 404, 422),
)
def cancel_job(job_id: str, service: ServiceDep) -> Response:
    get_job_row(service, job_id, kind=None)
    return json_response(job_view(service, service.runner.cancel(job_id)))


@router.get(
    "/{job_id}/logs",
    summary="The job's output: text from `offset`, or with `follow` (or Accept: text/event-stream) a "
    "server-sent-events stream, one event per line, until the job ends",
    response_class=TextResponse,
    responses=answered_as("The output as text, or as server-sent events", "text/event-stream") | errors(404, 422),
)
async def get_logs(
    job_id: str,
    request: Request,
    service: ServiceDep,
    offset: Annotated[int, Query(ge=0, le=2**62, description="byte offset to start from")] = 0,
    follow: Annotated[bool, Query(description="stream as server-sent events until the job ends")] = False,
    last_event_id: Annotated[str | None, Header(alias="Last-Event-ID")] = None,
) -> Response:
    await run_in_threadpool(get_job_row, service, job_id, None)
    output = service.runner.job_dir(job_id) / OUTPUT_FILE
    if follow or "text/event-stream" in request.headers.get("accept", ""):
        start = int(last_event_id) if last_event_id and last_event_id.isdigit() else offset
        return EventSourceResponse(_events(service, job_id, output, start), ping=SSE_PING_S, sep="\n")
    data = await run_in_threadpool(_read_from, output, offset, MAX_LOG_CHUNK_BYTES)
    headers = {"X-Next-Offset": str(offset + len(data))}
    return Response(data.decode("utf-8", errors="replace"), media_type="text/plain; charset=utf-8", headers=headers)


def _read_from(path: Path, offset: int, limit: int, whole_lines: bool = False) -> bytes:
    """Up to `limit` bytes of `path` from `offset` (only complete lines, if asked)."""
    try:
        with path.open("rb") as file:
            file.seek(offset)
            data = file.read(limit)
    except FileNotFoundError:
        return b""
    return data[: data.rfind(b"\n") + 1] if whole_lines else data


async def _events(service: Service, job_id: str, output: Path, offset: int) -> AsyncIterator[dict[str, str]]:
    """One `data:` event per output line (its `id` is the byte offset after it, for Last-Event-ID), then an
    `end` event with the job's final state. sse-starlette encodes them, pings while the job is quiet, and ends this
    generator when the client disconnects or the server shuts down (the client reconnects with Last-Event-ID)."""
    while True:
        row = await run_in_threadpool(service.store.get_job, job_id)
        ended = row is None or row.state in FINAL_STATES  # once ended, nothing more is written: read to the end
        data = await run_in_threadpool(_read_from, output, offset, MAX_LOG_CHUNK_BYTES, not ended)
        for line in data.splitlines(keepends=True):
            offset += len(line)
            yield {"id": str(offset), "data": line.decode("utf-8", errors="replace").rstrip()}
        if data:
            continue
        if ended:
            yield {"event": "end", "data": json.dumps({"state": row.state if row else "UNKNOWN"})}
            return
        await asyncio.sleep(SSE_POLL_S)
