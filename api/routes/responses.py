"""What the OpenAPI document says each route answers besides its success: every error status it can return, with
the one error body (api/errors.py's payload under `error`), and the media types of the answers that are not JSON.

The routes pass these to their decorators (`responses=`), so the document lists every status a client can get
(tests/api/test_fuzz.py runs schemathesis's conformance checks against it).
"""

from __future__ import annotations

from typing import Any

from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field


class ErrorEntry(BaseModel):
    """One field at fault (`fields`) or one rule a plan breaks (`violations`, which add a `code`)."""

    model_config = ConfigDict(extra="allow")

    field: str = Field(description="the field, dotted (`plan.tp`), or `(request)` for a rule of the whole request")
    message: str


class ErrorDetail(BaseModel):
    """api/errors.py `error_payload`: the kind (which sets the status), a message, and what the kind adds."""

    model_config = ConfigDict(extra="allow")

    kind: str = Field(description="invalid_request, bad_input, invalid_plan, unknown_preset, not_found, ...")
    message: str
    fields: list[ErrorEntry] = Field(default=[], description="each field at fault, and why")
    violations: list[ErrorEntry] = Field(default=[], description="an invalid plan's broken rules")


class ErrorBody(BaseModel):
    """The body of every error answer."""

    error: ErrorDetail


_WHEN = {
    401: "No `Authorization` header (the endpoint starts processes)",
    403: "A wrong token, or the endpoint is disabled (the server has no token)",
    404: "No such id",
    409: "The `Idempotency-Key` was used for a job with another body",
    413: "The request body is over the server's size limit",
    422: "Bad input, naming each field at fault; or a plan that cannot run, with the planner's reason",
    503: "Unavailable for now (retry): the database does not answer, the job runner does not run, or the worker "
    "process running a search died (`Retry-After`)",
}

READS_A_BODY = (413, 422)
NEEDS_THE_TOKEN = (401, 403)
STARTS_A_JOB = (*NEEDS_THE_TOKEN, 409, *READS_A_BODY)
RUNS_A_SEARCH = (*READS_A_BODY, 503)  # api/search_pool.py: a worker that dies answers its searches 503


def errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """`responses=` for a route that can answer `statuses` (422 also replaces FastAPI's own, whose body differs).
    Always JSON, whatever the route's success is answered as: by reference to ErrorBody (which api/app.py adds to
    the document's schemas), since FastAPI would give a `model` the media type of the route's response class."""
    body = {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorBody"}}}
    return {status: {"description": _WHEN[status], "content": body} for status in sorted(set(statuses))}


def answered_as(description: str, *media_types: str) -> dict[int | str, dict[str, Any]]:
    """`responses=` for a success that may be answered as any of `media_types` (text or bytes) besides the route's
    response class's own (JSON unless the route says otherwise)."""
    content = {media: {"schema": {"type": "string"}} for media in media_types}
    return {200: {"description": description, "content": content}}


class MarkdownResponse(Response):
    media_type = "text/markdown"


class PngResponse(Response):
    media_type = "image/png"


class TextResponse(Response):
    media_type = "text/plain"
