"""`estimate` and `plan`: the contract request (DESIGN.md, "The contract") is their options record; the CLI builds
it from a file and flags (api/cli/flags.py), the REST service takes it as the body (api/service.py). Both parse
it here, with the resolver of `cluster.profile` that suits them: the CLI reads files and the database, the
service only ids it stores."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from api.errors import InputError

if TYPE_CHECKING:
    from planner.request import EstimateRequest, PlanRequest
    from planner.search.result import SearchResult
    from planner.specs import HardwareProfile, PipelineTimeline, StepEstimate

# The most tasks a timeline answers (chunks x micro-batches x forward, recompute, backward): enough for any plan
# a person reads bar by bar, and it bounds what one request costs (the task graph is built in Python).
MAX_TIMELINE_TASKS = 30_000

ProfileResolver = Callable[[str], "HardwareProfile"]


def resolve_profile(ref: str) -> HardwareProfile:
    """`cluster.profile` -> the profile: a file, or an id stored in the database (imported only when asked)."""
    from profiler.store import resolve_profile as resolve

    return resolve(ref)


def parse(request: dict[str, Any], command: str = "estimate", resolve: ProfileResolver = resolve_profile) -> Any:
    """The request of `estimate` (with its `plan`) or of `plan` (with its `search`), parsed; ValueError naming the
    field at fault."""
    from planner.request import parse_estimate_request, parse_plan_request

    return (parse_estimate_request if command == "estimate" else parse_plan_request)(request, resolve)


def estimate(
    request: dict[str, Any], resolve: ProfileResolver = resolve_profile
) -> tuple[EstimateRequest, StepEstimate]:
    """The parsed request and its StepEstimate; ValueError (InputError, InfeasiblePlanError, ...) on bad input."""
    import planner

    parsed = parse(request, "estimate", resolve)
    return parsed, planner.estimate(parsed)


def search_plans(
    request: dict[str, Any], resolve: ProfileResolver = resolve_profile
) -> tuple[PlanRequest, SearchResult]:
    """The parsed request and its ranked plans; ValueError on bad input."""
    import planner

    parsed = parse(request, "plan", resolve)
    return parsed, planner.search(parsed)


def timeline(request: dict[str, Any], resolve: ProfileResolver = resolve_profile) -> PipelineTimeline:
    """The plan's pipeline schedule, task by task (planner/estimates.py `pipeline_timeline`); InputError naming
    `training.global_batch_size` when the step has more tasks than a timeline answers."""
    from planner.estimates import pipeline_timeline

    parsed = parse(request, "estimate", resolve)
    plan = parsed.plan
    microbatches = plan.num_microbatches(parsed.training)
    tasks = 3 * plan.num_model_chunks * microbatches
    if tasks > MAX_TIMELINE_TASKS:
        raise InputError.at(
            "training.global_batch_size",
            f"{microbatches} micro-batches over {plan.num_model_chunks} model chunks make up to {tasks:,} tasks, "
            f"over the {MAX_TIMELINE_TASKS:,} a timeline answers; ask with a smaller global batch",
        )
    return pipeline_timeline(parsed)
