"""`GET /v1/catalog/models` and `/v1/catalog/gpus`: the presets a request can name, with their specs."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

router = APIRouter(prefix="/catalog", tags=["catalog"])


@router.get("/models", summary="Model presets, with their parameter counts")
def models() -> list[dict[str, Any]]:
    from planner.cost.params import model_params
    from planner.presets import MODEL_PRESETS

    return [
        {"name": name, "params": model_params(spec), "spec": spec.model_dump(mode="json")}
        for name, spec in MODEL_PRESETS.items()
    ]


@router.get("/gpus", summary="GPU presets: memory, peak FLOP/s, memory and link bandwidths")
def gpus() -> list[dict[str, Any]]:
    from planner.presets import GPU_PRESETS

    return [{"name": name, "spec": spec.model_dump(mode="json")} for name, spec in GPU_PRESETS.items()]
