"""Re-splitting the leading candidates' layers with the partition ILP: the problem it is given matches the
cost model, and the search uses the re-split where it is faster or makes a plan fit."""

from __future__ import annotations

import pytest

import planner
from planner.cost.step import estimate_step
from planner.request import parse_plan_request
from planner.search.balance import partition_problem
from planner.search.partition import evaluate_partition
from planner.specs import ParallelPlan

GiB = 1024**3
# Llama-3 8B's 128k-token LM head makes the last pipeline stage the slowest under an even split.
LLAMA8B = {"model": "llama3-8b", "training": {"seq_len": 4096, "global_batch_size": 64},
           "cluster": {"gpu": "a100-80gb"}}  # fmt: skip
PIPELINED = ParallelPlan(dp=1, tp=2, pp=4, micro_batch_size=1, schedule="1f1b")


@pytest.mark.parametrize(
    "plan, split",
    [
        (PIPELINED, (8, 9, 9, 6)),
        (PIPELINED.model_copy(update={"zero_stage": 0, "recompute": "full"}), (5, 10, 10, 7)),
        (
            ParallelPlan(
                dp=2, tp=1, pp=4, zero_stage=3, micro_batch_size=2, schedule="interleaved_1f1b", virtual_stages=2
            ),
            (3, 4, 5, 4, 4, 5, 4, 3),
        ),  # fmt: skip
    ],
)
def test_partition_problem_reproduces_the_cost_model_for_any_split(plan, split):
    req = parse_plan_request(LLAMA8B)
    problem = partition_problem(req, plan, limit_bytes=80 * GiB)
    predicted = evaluate_partition(problem, split)
    split_plan = plan.model_copy(update={"layers_per_stage": split})
    est = estimate_step(req.model, req.training, req.cluster, split_plan)
    assert predicted.device_memory_bytes == pytest.approx([s.total_bytes for s in est.memory.by_stage], rel=1e-9)
    busy = (est.breakdown.compute_s + est.breakdown.tp_comm_s + est.breakdown.cp_comm_s) / est.num_microbatches
    assert predicted.max_device_time_s == pytest.approx(busy, rel=1e-9)


def test_search_moves_blocks_off_the_head_stage_when_that_is_faster():
    fixed = {"fixed": {"pp": 4, "tp": 2, "schedule": "1f1b"}, "top_k": 3}
    balanced = planner.search({**LLAMA8B, "search": fixed})
    even = planner.search({**LLAMA8B, "search": {**fixed, "partition": False}})
    best = balanced.plans[0]
    assert best.plan.layers_per_stage is not None
    assert best.plan.layers_per_stage[-1] < 32 // 4, "the head's stage holds fewer blocks"
    assert best.estimate.step_time_s < even.plans[0].estimate.step_time_s
    assert balanced.counts.partitioned > 0
    req = parse_plan_request({**LLAMA8B, "search": fixed})
    assert best.estimate == estimate_step(req.model, req.training, req.cluster, best.plan)


def test_a_resplit_can_make_a_plan_fit_that_the_even_split_does_not():
    """One candidate only (every field fixed); its even split is over the limit on stage 0, which holds pp
    micro-batches under 1F1B, and a split with fewer blocks there fits."""
    req = parse_plan_request(LLAMA8B)
    plan = ParallelPlan(dp=2, tp=1, pp=4, micro_batch_size=2, schedule="1f1b", zero_stage=1)
    even = estimate_step(req.model, req.training, req.cluster, plan)
    assert even.memory.peak_stage == 0
    lighter = estimate_step(
        req.model, req.training, req.cluster, plan.model_copy(update={"layers_per_stage": (6, 8, 9, 9)})
    )
    limit = (even.memory.peak_bytes + lighter.memory.peak_bytes) / 2
    fixed = {f: getattr(plan, f) for f in ("dp", "tp", "pp", "cp", "zero_stage", "micro_batch_size",
                                           "sequence_parallel", "schedule", "virtual_stages")}  # fmt: skip
    search = {"fixed": fixed, "recompute": ["none"], "max_memory_fraction": limit / req.cluster.gpu.memory_bytes}

    without = planner.search({**LLAMA8B, "search": {**search, "partition": False}})
    assert not without.found and without.closest[0].over_stage == 0
    rescued = planner.search({**LLAMA8B, "search": search})
    assert rescued.found
    assert rescued.plans[0].plan.layers_per_stage is not None
    assert rescued.plans[0].estimate.memory.peak_bytes <= limit
