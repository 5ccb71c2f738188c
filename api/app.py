"""The REST service: `create_app(settings)` builds it; `paraplan serve` runs it under uvicorn.

Every error, from a malformed body to an unknown route, is answered with one body shape,
`{"error": {"kind", "message", "fields" | "violations" | ...}}`, and the status of its kind (api/errors.py):
422 for bad input (naming the field) and for plans that cannot run (with the planner's reason), 404 for unknown
ids, 401/403 for a missing or wrong token, 413 for a body over the size limit, 503 for a plan search whose worker
process died (the request may be retried). A 500 is a bug.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from starlette.exceptions import HTTPException
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.commands.kernels import KernelCheckBody
from api.errors import error_payload, validation_fields
from api.jobs.profile import ProfileJobBody, ProfileJobs
from api.jobs.runner import JobRunner, TimeLimit
from api.jobs.train import TrainJobOptions, TrainJobs
from api.jobs.validate import ValidationJobBody, ValidationJobs
from api.routes import (
    catalog,
    estimates,
    exports,
    health,
    jobs,
    kernels,
    models,
    plans,
    profiles,
    scaling,
    validations,
)
from api.routes.common import ApiError, Service, error_response
from api.routes.pages import install_pages
from api.routes.responses import ErrorBody
from api.search_pool import SearchPool, SearchUnavailable
from api.service import PlanSearches
from api.settings import MAX_VALIDATION_S_ENV, Settings
from api.store import ApiStore

log = logging.getLogger("paraplan.api")
VERSION = "0.1.0"
_STATUS_KINDS = {401: "unauthorized", 403: "forbidden", 404: "not_found", 405: "method_not_allowed",
                 413: "too_large", 415: "unsupported_media_type"}  # fmt: skip


def create_app(settings: Settings | None = None) -> FastAPI:
    """A server over `settings` (default: from the environment). The database is opened (and its schema
    version checked) here, so a bad database fails before the server listens."""
    settings = settings or Settings.from_env()
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    store = ApiStore(settings.database_url)
    kinds = {"train": TrainJobs(store), "profile": ProfileJobs(store), "validate": ValidationJobs(store)}
    runner = JobRunner(store, settings, kinds, {"validate": TimeLimit(settings.max_validation_s, MAX_VALIDATION_S_ENV)})
    pool = SearchPool(settings.search_workers)
    service = Service(settings, store, runner, PlanSearches(store, keep=settings.plan_retention, pool=pool))

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        runner.start()
        pool.start()
        try:
            yield
        finally:
            pool.close()  # no search worker outlives the lifespan
            runner.close()  # running jobs go on; the next server re-attaches to them
            store.close()

    # No slash redirects: Starlette answers `/v1/jobs/` with a 307 to an absolute URL built from the request's Host
    # header (a redirect anyone can point elsewhere); a path with a trailing slash is an unknown route (404).
    # docs_url=None: /docs is served by api/routes/pages.py from vendored files (FastAPI's loads them from a CDN).
    app = FastAPI(title="paraplan", version=VERSION, lifespan=lifespan, redirect_slashes=False,
                  description="Performance model and auto-parallel planner for PyTorch training.",
                  docs_url=None, redoc_url=None)  # fmt: skip
    app.state.service = service
    app.include_router(health.router)
    for router in (catalog.router, estimates.router, plans.router, profiles.router, jobs.router, validations.router):
        app.include_router(router, prefix="/v1")
    for router in (models.router, scaling.router, kernels.router):
        app.include_router(router, prefix="/v1")
    app.include_router(exports.router, prefix="/v1")
    install_pages(app)
    _install_error_handlers(app)
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_request_bytes)
    app.openapi = lambda: _openapi(app)  # type: ignore[method-assign]
    return app


# ================================================================================================= errors


def _install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(ValueError, _bad_input)
    app.add_exception_handler(RequestValidationError, _invalid_parameters)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(SearchUnavailable, _search_unavailable)
    app.add_exception_handler(Exception, _internal_error)


async def _api_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ApiError)
    return error_response(exc.payload())


async def _bad_input(request: Request, exc: Exception) -> Response:
    """The planner's, executor's and profiler's bad-input errors (ValueErrors), in the CLI's error shape."""
    assert isinstance(exc, ValueError)
    try:
        return error_response(error_payload(exc))
    except ValueError:  # a ValueError of no known kind: a bug, not bad input
        return await _internal_error(request, exc)


async def _invalid_parameters(request: Request, exc: Exception) -> Response:
    """Query, path and header parameters FastAPI validated (bodies are read by the routes themselves)."""
    assert isinstance(exc, RequestValidationError)
    fields = [field for error in exc.errors() for field in validation_fields(dict(error))]
    return error_response({"kind": "invalid_request", "message": "invalid request", "fields": fields})


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    kind = _STATUS_KINDS.get(exc.status_code, "invalid_request")
    headers = dict(exc.headers or {})
    if exc.status_code == 405:  # Starlette names only the first matching route's methods
        headers["Allow"] = ", ".join(_allowed_methods(request))
    return error_response({"kind": kind, "message": str(exc.detail)}, headers=headers)


def _allowed_methods(request: Request) -> list[str]:
    """Every method some route serves at this path (asked of the router, which knows included routers too)."""
    routes = request.app.router.routes
    methods = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE")
    return [m for m in methods if any(r.matches({**request.scope, "method": m})[0] == Match.FULL for r in routes)]


async def _search_unavailable(request: Request, exc: Exception) -> Response:
    """A search whose worker died (or that the shutdown cancelled): the same request may be retried."""
    return error_response({"kind": "unavailable", "message": str(exc)}, headers={"Retry-After": "1"})


async def _internal_error(request: Request, exc: Exception) -> Response:
    log.error("%s %s failed", request.method, request.url.path, exc_info=exc)
    return error_response({"kind": "internal", "message": "internal error; the server's log has the details"})


# ========================================================================================== request size


class BodySizeLimit:
    """Refuse (413) a request body over `max_bytes`, by its Content-Length or, without one, as it arrives."""

    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_bytes):
            await error_response(self._too_large())(scope, receive, send)
            return
        received = 0

        async def counted() -> Message:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_bytes:
                raise ApiError(**self._too_large())
            return message

        await self.app(scope, counted, send)

    def _too_large(self) -> dict[str, Any]:
        return {"kind": "too_large", "message": f"the request body is over this server's {self.max_bytes} bytes"}


# ================================================================================================ OpenAPI


# Bodies are read by the routes (so that every malformed one gets the common error shape); these are the
# schemas that document them, and the error body every route's error answers refer to (api/routes/responses.py).
def _body_schemas() -> dict[str, Any]:
    from pydantic import BaseModel, ConfigDict

    from planner.request import EstimateRequest, PlanRequest

    class TrainJobRequest(EstimateRequest, TrainJobOptions):  # type: ignore[misc]
        """The contract's request with `plan` (or, instead of model/training/cluster/plan, `plan_id`), plus the
        job's own fields."""

        model_config = ConfigDict(title="TrainJobRequest")

    models: list[type[BaseModel]] = [EstimateRequest, PlanRequest, TrainJobRequest, ProfileJobBody, ValidationJobBody,
                                     KernelCheckBody, ErrorBody]  # fmt: skip
    schemas: dict[str, Any] = {}
    for model in models:
        schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
        schemas |= schema.pop("$defs", {})
        schemas[model.__name__] = schema
    return schemas


def _openapi(app: FastAPI) -> dict[str, Any]:
    if app.openapi_schema is None:
        from fastapi.openapi.utils import get_openapi

        schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        schema.setdefault("components", {}).setdefault("schemas", {}).update(_body_schemas())
        app.openapi_schema = schema
    return app.openapi_schema
