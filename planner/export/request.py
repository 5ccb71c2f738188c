"""The contract's request (DESIGN.md, "The contract"): the plan as `paraplan estimate`, `paraplan train` and
`POST /v1/estimates` take it back. It keeps the request's own `training.framework`."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from planner.export.base import Exporter, Rendered

if TYPE_CHECKING:
    from planner.errors import Violation
    from planner.request import EstimateRequest


def contract_request(req: EstimateRequest) -> dict[str, Any]:
    """The request as JSON values: the model in full (a preset's name is kept, with its fields), the training
    setup, the cluster (its GPU by preset name, a profile by its reference) and the plan."""
    return req.model_dump(mode="json")


def _no_refusals(req: EstimateRequest) -> list[Violation]:
    return []


def _render(req: EstimateRequest) -> Rendered:
    return Rendered(json.dumps(contract_request(req), indent=2) + "\n")


EXPORTER = Exporter(
    target="request",
    filename="request.json",
    media_type="application/json",
    framework=lambda req: req.training.framework,
    refusals=_no_refusals,
    render=_render,
)
