"""The contract's request: `{"model", "training", "cluster", "plan" | "search"}` -> resolved specs.

`model` is a preset reference (`{"name": "gpt3-175b"}`), a preset with overrides
(`{"name": "llama3-8b", "num_layers": 4}`) or the full form. `cluster.gpu` is a preset name or a full GpuSpec.
`plan.dp` may be left out: it is then the GPU count over tp x pp x cp. `cluster.profile` names a HardwareProfile:
the request reads it (`attach_profile`) and holds what it measured as `measured`, which the cost model then takes
as an explicit argument. This is the edge: planner/specs resolves no name.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, PrivateAttr, ValidationError, field_validator, model_validator

from planner.cost.measured import ProfileCosts
from planner.cost.runtime import Runtime, runtime_for
from planner.profiles import ProfileError, load_profile_json
from planner.specs import (
    ClusterSpec,
    GpuSpec,
    HardwareProfile,
    ModelSpec,
    ParallelPlan,
    Precision,
    SearchOptions,
    TrainingSpec,
)


class _Setup(BaseModel):
    """What every request names: the model (a preset, a preset with overrides, or in full), the training
    setup and the cluster."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    model: ModelSpec
    training: TrainingSpec
    cluster: ClusterSpec
    # What `cluster.profile` measured, as the cost model reads it (`attach_profile`); never serialised.
    _measured: ProfileCosts | None = PrivateAttr(default=None)

    @field_validator("model", mode="before")
    @classmethod
    def _resolve_model(cls, value: Any) -> Any:
        return resolve_model(value)

    @field_validator("cluster", mode="before")
    @classmethod
    def _resolve_cluster(cls, value: Any) -> Any:
        return resolve_cluster(value)

    @property
    def measured(self) -> ProfileCosts | None:
        """The costs `cluster.profile` measured (see `attach_profile`), or None: the analytic model only. Pass it
        to the cost model (`estimate_step(..., measured=req.measured)`)."""
        return self._measured

    @property
    def runtime(self) -> Runtime:
        """The training stack that runs this request's plans (planner/cost/runtime.py `runtime_for`, the one place
        that chooses it), for the cost model's `runtime` argument."""
        return runtime_for(self.cluster, self.measured, self.training.framework)

    @model_validator(mode="before")
    @classmethod
    def _device_precision(cls, data: Any) -> Any:
        return default_precision(data)

    @model_validator(mode="after")
    def _precision_on_this_gpu(self) -> _Setup:
        check_precision(self.training, self.cluster.gpu)
        return self


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


def parse_plan_request(
    request: dict[str, Any] | PlanRequest, resolve_profile: ProfileResolver | None = None
) -> PlanRequest:
    req = request if isinstance(request, PlanRequest) else PlanRequest.model_validate(request)
    return attach_profile(req, resolve_profile)


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


def resolve_cluster(value: Any) -> Any:
    """A cluster dict whose `gpu` is a preset name -> the same dict with the preset's GpuSpec (or the input,
    unchanged, for pydantic to report what is wrong with it)."""
    from planner.presets import gpu_preset

    if isinstance(value, dict) and isinstance(value.get("gpu"), str):
        return {**value, "gpu": gpu_preset(value["gpu"])}
    return value


def default_precision(data: Any) -> Any:
    """Fill `training.precision` when the request names none and its device cannot take TrainingSpec's bf16:
    fp32 on the `cpu` device (the executor trains bf16 requests in fp32 on CPUs, and a CPU profile holds
    fp32 layer times only, so bf16 would predict a run that never happens), fp16 on a GPU without bf16 (V100:
    mixed precision there is fp16 with loss scaling). A precision the request names is kept; `check_precision`
    refuses one the GPU lacks."""
    if not isinstance(data, dict):
        return data
    cluster, training = data.get("cluster"), data.get("training")
    if not isinstance(cluster, dict) or not isinstance(training, dict) or "precision" in training:
        return data
    gpu = _readable_gpu(cluster.get("gpu"))
    precision = None if gpu is None else device_default_precision(gpu)
    if precision is None:
        return data
    return {**data, "training": {**training, "precision": precision}}


def device_default_precision(gpu: GpuSpec) -> Precision | None:
    """What a request on `gpu` that names no precision trains at, where that is not TrainingSpec's bf16."""
    if gpu.kind == "cpu":
        return "fp32"
    return None if gpu.supports("bf16") else "fp16"


def _readable_gpu(value: Any) -> GpuSpec | None:
    """`cluster.gpu` as a GpuSpec when it already reads as one (a known preset name, a valid GPU object), else
    None: field validation then names what is wrong with it."""
    from planner.presets import GPU_PRESETS

    if isinstance(value, GpuSpec):
        return value
    if isinstance(value, str):
        return GPU_PRESETS.get(value.lower())
    try:
        return GpuSpec.model_validate(value)
    except ValidationError:
        return None


def check_precision(training: TrainingSpec, gpu: GpuSpec) -> None:
    """ValueError naming `training.precision` when the GPU has no peak for it (bf16 on a V100): never a KeyError
    deep in the cost model. Every GPU has fp16 (GpuSpec requires it), hence the advice. (A message without "; ",
    which error reports read as a separator between problems.)"""
    if not gpu.supports(training.precision):
        raise ValueError(
            f"training.precision: {training.precision} is not supported by {gpu.name}, which has no "
            f"{training.precision} tensor cores: use fp16"
        )


def infer_dp(data: Any) -> Any:
    """Fill `plan.dp` from the cluster size when the request leaves it out."""
    if not isinstance(data, dict):
        return data
    plan, cluster = data.get("plan"), data.get("cluster")
    if not isinstance(plan, dict) or "dp" in plan or not isinstance(cluster, dict):
        return data
    sizes = [cluster.get("num_nodes", 1), cluster.get("gpus_per_node", 8)]
    degrees = [plan.get(axis, 1) for axis in ("tp", "pp", "cp")]
    if not all(_is_integer(value) for value in sizes + degrees):
        return data  # field validation names the bad value (a float, a boolean, `Infinity`, text)
    gpus, model_parallel = math.prod(sizes), math.prod(degrees)
    if model_parallel > 0 and gpus % model_parallel == 0:
        return {**data, "plan": {**plan, "dp": gpus // model_parallel}}
    return data


def _is_integer(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def parse_estimate_request(
    request: dict[str, Any] | EstimateRequest, resolve_profile: ProfileResolver | None = None
) -> EstimateRequest:
    req = request if isinstance(request, EstimateRequest) else EstimateRequest.model_validate(request)
    return attach_profile(req, resolve_profile)


ProfileResolver = Callable[[str], HardwareProfile]
Request = TypeVar("Request", EstimateRequest, PlanRequest)


def attach_profile(req: Request, resolve_profile: ProfileResolver | None = None) -> Request:
    """`req` holding the costs of the HardwareProfile that `cluster.profile` names (`req.measured`). The planner
    reads profile files itself; the CLI and the service pass `resolve_profile` (profiler.store.resolve_profile),
    which also finds stored ids."""
    cluster = req.cluster
    if cluster.profile is None or req.measured is not None:
        return req
    try:
        profile = (resolve_profile or load_profile_json)(cluster.profile)
    except ProfileError as error:
        message = str(error) if str(error).startswith("cluster.profile") else f"cluster.profile: {error}"
        raise ProfileError(message, field="cluster.profile") from None
    attached = req.model_copy()
    attached._measured = profile_costs(cluster, profile, req.model)
    return attached


def profile_costs(cluster: ClusterSpec, profile: HardwareProfile, model: ModelSpec | None = None) -> ProfileCosts:
    """`profile` as the cost model reads it for `cluster` (and `model`: its layer times only where the profile
    measured layers of that model's shapes); ProfileError naming `cluster.profile` when the profile was measured on
    another kind of device than `cluster.gpu`."""
    costs = ProfileCosts(profile, model)
    mismatch = costs.device_mismatch(cluster.gpu.kind, cluster.gpu.name)
    if mismatch:
        raise ProfileError(f"cluster.profile: {mismatch}", field="cluster.profile")
    return costs
