"""What every router shares: the app's state, the token check, errors with the common body, JSON responses."""

from __future__ import annotations

import hmac
import json
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import Depends, Header, Query, Request
from fastapi.responses import Response

from api.errors import HTTP_STATUS, InputError
from api.jobs.runner import JobRunner
from api.service import PlanSearches
from api.settings import API_TOKEN_ENV, Settings
from api.store import ApiStore


class ApiError(Exception):
    """An error answered with the common body: `{"error": {"kind", "message", ...}}` and the kind's status."""

    def __init__(self, kind: str, message: str, **details: Any):
        super().__init__(message)
        self.kind, self.message, self.details = kind, message, details

    @property
    def status(self) -> int:
        return HTTP_STATUS[self.kind]

    def payload(self) -> dict[str, Any]:
        return {"kind": self.kind, "message": self.message, **self.details}


def not_found(what: str, ident: str) -> ApiError:
    return ApiError("not_found", f"no {what} with id {ident!r}")


async def json_body(request: Request) -> dict[str, Any]:
    """The request's body as a JSON object, or InputError naming `body`. Read here rather than declared, so
    that every malformed body gets the common error shape and the contract's schema documents it."""
    raw = await request.body()
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError) as error:  # UnicodeDecodeError is a ValueError
        raise InputError.at("body", f"not valid JSON: {error}", kind="invalid_request") from None
    if not isinstance(data, dict):
        raise InputError.at("body", f"expected a JSON object, got {type(data).__name__}", kind="invalid_request")
    return data


def body_schema(name: str) -> dict[str, Any]:
    """`openapi_extra` documenting a JSON body by a schema api/app.py adds to the components."""
    schema = {"$ref": f"#/components/schemas/{name}"}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}


def json_with(meta: dict[str, Any], **json_texts: str) -> str:
    """`meta` as a JSON object with more members whose values are JSON text already (stored results), so a
    large stored body is answered without being parsed and encoded again."""
    members = "".join(f", {json.dumps(name)}: {text}" for name, text in json_texts.items())
    return json.dumps(meta)[:-1] + members + "}"


def error_response(payload: dict[str, Any], headers: dict[str, str] | None = None) -> Response:
    return json_response({"error": payload}, HTTP_STATUS.get(payload["kind"], 422), headers)


def json_response(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    """JSON without FastAPI's encoder walk: the bodies here are already plain JSON values (or JSON text)."""
    content = data if isinstance(data, str) else json.dumps(data)
    return Response(content, status_code=status, media_type="application/json", headers=headers)


@dataclass(frozen=True)
class Service:
    """The app's long-lived parts, created by create_app."""

    settings: Settings
    store: ApiStore
    runner: JobRunner
    searches: PlanSearches


def service(request: Request) -> Service:
    return request.app.state.service


ServiceDep = Annotated[Service, Depends(service)]
Limit = Annotated[int, Query(ge=1, le=1000, description="at most this many, newest first")]
Offset = Annotated[int, Query(ge=0, le=10**9, description="skip this many")]


def require_token(
    request: Request, authorization: Annotated[str | None, Header(description="Bearer <PARAPLAN_API_TOKEN>")] = None
) -> None:
    """Endpoints that start processes need `Authorization: Bearer <token>`. Without a configured token they
    are disabled (403), never open; no header is 401, a wrong token 403."""
    expected = service(request).settings.api_token
    if expected is None:
        raise ApiError("disabled", f"this endpoint starts processes and is disabled: set {API_TOKEN_ENV} on the server")
    if authorization is None:
        raise ApiError("unauthorized", "this endpoint needs an `Authorization: Bearer <token>` header")
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), expected.encode()):
        raise ApiError("forbidden", "the bearer token is not this server's")


TokenDep = Depends(require_token)
