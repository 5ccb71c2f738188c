"""The search against every published training run of the dev set: the published layout is one of the
candidates, and the plan found is predicted at least as fast as it on the same cost model."""

from __future__ import annotations

import numpy as np
import pytest

import planner
from planner.devset import training_runs
from planner.request import parse_estimate_request, parse_plan_request
from planner.search.space import OFFLOADS, RECOMPUTE, SCHEDULES, search_space

RUNS = training_runs()


def plan_request_for(run) -> dict:
    """The run's model, training setup and cluster, searched with its own gradient-overlap setting and the
    whole of GPU memory as the limit (the published runs ran, so they fit in the real 80 GB)."""
    request = run.request
    return {
        "model": request["model"],
        "training": request["training"],
        "cluster": request["cluster"],
        "search": {"max_memory_fraction": 1.0, "overlap_grad_reduce": request["plan"]["overlap_grad_reduce"]},
    }


@pytest.mark.parametrize("run", RUNS, ids=[run.id for run in RUNS])
def test_published_layout_is_a_candidate_and_the_found_plan_is_no_slower(run):
    published = parse_estimate_request(run.request)
    req = parse_plan_request(plan_request_for(run))
    candidates, _ = search_space(req.model, req.training, req.cluster, req.search)
    plan = published.plan
    same = np.ones(len(candidates), dtype=bool)
    for field in ("dp", "tp", "pp", "cp", "zero_stage", "micro_batch_size", "sequence_parallel", "virtual_stages"):
        same &= getattr(candidates, field) == getattr(plan, field)
    same &= candidates.schedule == SCHEDULES.index(plan.schedule)
    same &= candidates.recompute == RECOMPUTE.index(plan.recompute)
    same &= candidates.offload == OFFLOADS.index(plan.offload)
    matches = np.flatnonzero(same)
    assert len(matches) == 1, "the published layout is among the candidates, once"

    published_estimate = planner.estimate(run.request)
    result = planner.search(req)
    assert result.found
    assert result.plans[0].estimate.step_time_s <= published_estimate.step_time_s * (1 + 1e-9)
