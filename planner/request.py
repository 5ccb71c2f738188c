"""The contract's request: `{"model", "training", "cluster", "plan" | "search"}` -> resolved specs.

`model` is a preset reference (`{"name": "gpt3-175b"}`), a preset with overrides
(`{"name": "llama3-8b", "num_layers": 4}`) or the full form. `cluster.gpu` is a preset name or a full GpuSpec.
`plan.dp` may be left out: it is then the GPU count over tp x pp x cp.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, field_validator, model_validator

from planner.specs import ClusterSpec, ModelSpec, ParallelPlan, SearchOptions, TrainingSpec


class _Setup(BaseModel):
    """What every request names: the model (a preset, a preset with overrides, or in full), the training
    setup and the cluster."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    model: ModelSpec
    training: TrainingSpec
    cluster: ClusterSpec

    @field_validator("model", mode="before")
    @classmethod
    def _resolve_model(cls, value: Any) -> Any:
        return resolve_model(value)


class EstimateRequest(_Setup):
    """A request with a plan, as `paraplan estimate` and `POST /v1/estimates` take it."""

    plan: ParallelPlan

    @model_validator(mode="before")
    @classmethod
    def _infer_dp(cls, data: Any) -> Any:
        return infer_dp(data)


class PlanRequest(_Setup):
    """A request to search for plans, as `paraplan plan` and `POST /v1/plans` take it."""

    search: SearchOptions = SearchOptions()

    @model_validator(mode="before")
    @classmethod
    def _no_plan(cls, data: Any) -> Any:
        if isinstance(data, dict) and "plan" in data:
            raise ValueError("a plan search takes no `plan`; keep plan fields fixed with `search.fixed`")
        return data


def parse_plan_request(request: dict[str, Any] | PlanRequest) -> PlanRequest:
    if isinstance(request, PlanRequest):
        return request
    return PlanRequest.model_validate(request)


def resolve_model(value: Any) -> Any:
    """A preset name, `{"name": preset, **overrides}`, or a full ModelSpec dict -> ModelSpec (or the input,
    unchanged, for pydantic to report what is wrong with it)."""
    from planner.presets import MODEL_PRESETS, model_preset

    if isinstance(value, str):
        return model_preset(value)
    if not isinstance(value, dict) or "name" not in value:
        return value
    name = value["name"]
    overrides = {k: v for k, v in value.items() if k != "name"}
    if isinstance(name, str) and name.lower() in MODEL_PRESETS:
        if not overrides:
            return model_preset(name)
        # Only the preset's explicit fields: derived ones (head_dim, ffn, kv heads) follow the overrides.
        base = model_preset(name).model_dump(exclude_unset=True)
        return ModelSpec.model_validate({**base, **overrides, "name": f"{name} (modified)"})
    if not overrides:
        model_preset(name)  # raises UnknownPresetError listing the closest names
    return value


def infer_dp(data: Any) -> Any:
    """Fill `plan.dp` from the cluster size when the request leaves it out."""
    if not isinstance(data, dict):
        return data
    plan, cluster = data.get("plan"), data.get("cluster")
    if not isinstance(plan, dict) or "dp" in plan or not isinstance(cluster, dict):
        return data
    try:
        gpus = int(cluster.get("num_nodes", 1)) * int(cluster.get("gpus_per_node", 8))
        model_parallel = int(plan.get("tp", 1)) * int(plan.get("pp", 1)) * int(plan.get("cp", 1))
    except (TypeError, ValueError):
        return data  # let field validation name the bad value
    if model_parallel > 0 and gpus % model_parallel == 0:
        return {**data, "plan": {**plan, "dp": gpus // model_parallel}}
    return data


def parse_estimate_request(request: dict[str, Any] | EstimateRequest) -> EstimateRequest:
    if isinstance(request, EstimateRequest):
        return request
    return EstimateRequest.model_validate(request)
