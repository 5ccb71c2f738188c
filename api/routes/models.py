"""`POST /v1/models/resolve`: a model as a user has it — a Hugging Face `config.json`, a ModelSpec, or a preset
name with overrides — as the ModelSpec the planner reads, with its parameter count. The web page sends a pasted
config here, so a request it builds carries a ModelSpec (the contract's `model`), as the CLI's `--model` does."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response

from api.commands.inputs import model_from_json
from api.routes.common import json_body, json_response
from api.routes.responses import READS_A_BODY, errors

router = APIRouter(prefix="/models", tags=["catalog"])
ANY_OBJECT_BODY = {"requestBody": {"required": True, "content": {"application/json": {"schema": {"type": "object"}}}}}


@router.post(
    "/resolve",
    summary="A Hugging Face config.json, a ModelSpec or {name: preset, ...overrides} -> the ModelSpec and its "
    "parameter count",
    openapi_extra=ANY_OBJECT_BODY,
    responses=errors(*READS_A_BODY),
)
async def resolve(request: Request) -> Response:
    from planner.cost.params import model_params
    from planner.request import resolve_model
    from planner.specs import ModelSpec

    body = await json_body(request)
    resolved = resolve_model(model_from_json(body, "body", default_name=None))
    spec = resolved if isinstance(resolved, ModelSpec) else ModelSpec.model_validate(resolved)
    return json_response({"spec": spec.model_dump(mode="json"), "params": model_params(spec)})
