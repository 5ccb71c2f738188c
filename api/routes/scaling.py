"""`POST /v1/scaling`: "how many GPUs do I need" — the plan search of one request repeated over several node
counts, each answered by its best plan, with the Pareto front of GPU count against step time marked. Nothing is
stored (each search is memoized like POST /v1/plans's); the web page draws its chart from this answer."""

from __future__ import annotations

import json
from typing import Any

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import Response

from api.commands import estimate as commands
from api.errors import InputError
from api.routes.common import ServiceDep, body_schema, json_body, json_response
from api.routes.responses import RUNS_A_SEARCH, errors
from api.search_pool import SearchAnswer
from api.service import stored_profile_resolver
from planner.request import PlanRequest
from planner.specs.base import MAX_GPUS

router = APIRouter(prefix="/scaling", tags=["plans"])

MAX_POINTS = 8  # each point is a full plan search (up to a second on one core; side by side in the pool)
DEFAULT_FACTORS = (0.25, 0.5, 1, 2, 4)  # around the request's own node count


@router.post(
    "",
    summary="The best plan at each of several node counts (`nodes`, default: the request's num_nodes x 1/4 .. 4), "
    "with the Pareto front of GPU count vs step time",
    openapi_extra=body_schema("PlanRequest"),
    responses=errors(*RUNS_A_SEARCH),
)
async def create_scaling(request: Request, service: ServiceDep) -> Response:
    body = await json_body(request)
    nodes = body.pop("nodes", None)  # no field of the plan request: the rest is one, checked as posted
    parsed = await run_in_threadpool(commands.parse, body, "plan", stored_profile_resolver(service.store))
    counts = node_counts(nodes, parsed.cluster.num_nodes, parsed.cluster.gpus_per_node)
    points = await run_in_threadpool(best_at_each, service, body, counts)
    return json_response({"points": mark_pareto_front(points)})


def node_counts(nodes: Any, requested: int, gpus_per_node: int) -> list[int]:
    """`nodes` as given (checked), or by default the request's node count times 1/4 .. 4 (those the planner
    searches: at most MAX_GPUS GPUs)."""
    most = MAX_GPUS // gpus_per_node
    if nodes is None:
        return sorted({count for f in DEFAULT_FACTORS if (count := max(1, int(requested * f))) <= most})
    if not isinstance(nodes, list) or not 1 <= len(nodes) <= MAX_POINTS:
        raise InputError.at("nodes", f"must be a list of 1 to {MAX_POINTS} node counts")
    for index, count in enumerate(nodes):
        if not isinstance(count, int) or isinstance(count, bool) or not 1 <= count <= most:
            raise InputError.at(f"nodes[{index}]", f"must be an integer from 1 to {most} (at most {MAX_GPUS} GPUs "
                                f"of {gpus_per_node} per node), got {count!r}")  # fmt: skip
    return sorted(set(nodes))


def best_at_each(service: ServiceDep, body: dict[str, Any], counts: list[int]) -> list[dict[str, Any]]:
    """`best_at` every node count: all the searches are submitted first, so that they run side by side in the
    service's search pool (one worker per core), then each answer is waited for."""
    submitted = [
        (count, *service.searches.submit({**body, "cluster": {**body["cluster"], "num_nodes": count}}))
        for count in counts
    ]
    return [best_at(count, request, answer.result()) for count, request, answer in submitted]


def best_at(num_nodes: int, request: PlanRequest, answer: SearchAnswer) -> dict[str, Any]:
    """The best plan of a search on `num_nodes` nodes (None when none fits), and how many GPUs that is."""
    point: dict[str, Any] = {"num_nodes": num_nodes, "num_gpus": request.cluster.num_gpus, "found": answer.found}
    if not answer.found:
        return point | {"best": None}
    best = json.loads(answer.json)["plans"][0]
    estimate = best["estimate"]
    return point | {"best": {"plan": best["plan"], "step_time_s": estimate["step_time_s"],
                             "tokens_per_s": estimate["tokens_per_s"], "mfu": estimate["mfu"],
                             "peak_bytes": estimate["memory"]["peak_bytes"]}}  # fmt: skip


def mark_pareto_front(points: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each point with `pareto`: true when no other point runs a step as fast or faster on no more GPUs (more GPUs
    are only worth buying for a shorter step)."""

    def dominated(point: dict[str, Any]) -> bool:
        return any(
            other is not point and other["best"] is not None
            and other["num_gpus"] <= point["num_gpus"]
            and other["best"]["step_time_s"] <= point["best"]["step_time_s"]
            and (other["num_gpus"], other["best"]["step_time_s"]) != (point["num_gpus"], point["best"]["step_time_s"])
            for other in points
        )  # fmt: skip

    return [point | {"pareto": point["best"] is not None and not dominated(point)} for point in points]
