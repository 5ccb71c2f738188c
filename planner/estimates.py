"""The contract's estimate from a request: parse and resolve it at the edge (planner/request.py), check the plan's
rules (planner/rules.py), then ask the cost model (planner/cost/step.py). The cost model itself never sees a
request, so it imports nothing of the edge."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from planner.cost.layers import LayerCost, layers_in_order
from planner.cost.schedule import pipeline_time_s, plan_schedule_graph, timeline
from planner.cost.step import estimate_step
from planner.errors import InfeasiblePlanError
from planner.request import EstimateRequest, ProfileResolver, parse_estimate_request
from planner.rules import host_memory_violation, require_valid
from planner.specs import PipelineTimeline, ScheduledTask, StepEstimate


def estimate_request(
    request: dict[str, Any] | EstimateRequest, resolve_profile: ProfileResolver | None = None
) -> StepEstimate:
    """The contract's estimate; `resolve_profile` finds `cluster.profile` (default: a file path)."""
    req = _valid_request(request, resolve_profile)
    estimate = estimate_step(req.model, req.training, req.cluster, req.plan, req.measured, req.runtime)
    over = host_memory_violation(estimate.memory.host_bytes_per_node, req.cluster)
    if over is not None:  # GPU memory may overflow and still be answered (fits=false); host memory may not
        raise InfeasiblePlanError("host_memory_exceeded", [over])
    return estimate


def layer_costs(
    request: dict[str, Any] | EstimateRequest, resolve_profile: ProfileResolver | None = None
) -> list[LayerCost]:
    """The per-layer records behind an estimate (for explanations and for comparing with a profile)."""
    req = _valid_request(request, resolve_profile)
    return layers_in_order(req.model, req.training, req.cluster, req.plan, req.measured, req.runtime)


def pipeline_timeline(
    request: dict[str, Any] | EstimateRequest, resolve_profile: ProfileResolver | None = None
) -> PipelineTimeline:
    """The plan's pipeline schedule as a timeline: the networkx task graph of planner/cost/schedule.py, its tasks
    with their start and end, and its longest path."""
    req = _valid_request(request, resolve_profile)
    graph = plan_schedule_graph(req.model, req.training, req.cluster, req.plan, req.measured)
    tasks = [ScheduledTask(**asdict(task)) for task in timeline(graph)]
    return PipelineTimeline(
        pipeline_time_s=pipeline_time_s(graph),
        num_microbatches=req.plan.num_microbatches(req.training),
        tasks=tasks,
    )


def _valid_request(
    request: dict[str, Any] | EstimateRequest, resolve_profile: ProfileResolver | None
) -> EstimateRequest:
    req = parse_estimate_request(request, resolve_profile)
    require_valid(req.plan, req.model, req.training, req.cluster)
    return req
