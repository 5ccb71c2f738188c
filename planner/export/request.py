"""The contract's request (DESIGN.md, "The contract"): the plan as `paraplan estimate`, `paraplan train` and
`POST /v1/estimates` take it back. It keeps the request's own `training.framework`."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from planner.export.base import Exporter, Rendered
from planner.presets import GPU_PRESETS, MODEL_PRESETS

if TYPE_CHECKING:
    from planner.errors import Violation
    from planner.request import EstimateRequest


def contract_request(req: EstimateRequest) -> dict[str, Any]:
    """The request as JSON values: the model and the GPU by their preset names when they are the presets
    (a preset written out in full would read back as a modified preset), in full otherwise; the training setup,
    the cluster (a profile by its reference) and the plan."""
    request = req.model_dump(mode="json")
    if _is_preset(req.model.name, req.model, MODEL_PRESETS):
        request["model"] = {"name": req.model.name}
    if _is_preset(req.cluster.gpu.name, req.cluster.gpu, GPU_PRESETS):
        request["cluster"]["gpu"] = req.cluster.gpu.name
    return request


def _is_preset(name: str | None, spec: object, presets: Mapping[str, object]) -> bool:
    return name is not None and presets.get(name.lower()) == spec


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
