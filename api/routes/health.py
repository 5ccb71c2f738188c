"""`GET /healthz` (the process answers) and `GET /readyz` (the database answers and the job runner runs)."""

from __future__ import annotations

from fastapi import APIRouter
from sqlalchemy.exc import SQLAlchemyError

from api.routes.common import ApiError, ServiceDep
from api.routes.responses import errors

router = APIRouter(tags=["health"])


@router.get("/healthz", summary="The server process is up")
def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz", summary="The database answers and the job runner is running", responses=errors(503))
def readyz(service: ServiceDep) -> dict[str, str]:
    try:
        service.store.ping()
    except SQLAlchemyError as error:
        raise ApiError("not_ready", f"the database does not answer: {error.__class__.__name__}") from None
    if not service.runner.alive:
        raise ApiError("not_ready", "the job runner is not running")
    return {"status": "ready"}
