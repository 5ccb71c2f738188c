"""Re-split the leading candidates' layers over pipeline stages with the partition ILP.

The even split puts as many blocks on the stages that also hold the embedding and the LM head as on the
others, and as many on device 0, which holds pp micro-batches under 1F1B, as on the last device, which holds
one. The ILP (search/partition.py) minimises the slowest device's time under each device's memory limit; its
inputs come from the cost model itself: a device's time and memory are affine in its block count (every block
costs the same), so the cost model evaluated at 0, 1 and 2 blocks per device gives the coefficients.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from planner.cost.batch import PlanBatch
from planner.cost.data import fsdp_hooks_s
from planner.cost.step import estimate_step, evaluate
from planner.request import PlanRequest
from planner.search.partition import PartitionProblem, solve_partition
from planner.specs import ParallelPlan, StepEstimate

Ranked = list[tuple[ParallelPlan, StepEstimate]]
# Per leading candidate; the search as a whole aims at under half a second.
PARTITION_TIME_LIMIT_S = 0.2
# CP-SAT search threads. The search's problems have uniform blocks, so CP-SAT solves the small count model
# (partition.py), proven optimal in milliseconds by one worker with an answer that does not depend on the workers;
# a second worker only adds its start and, on a machine of few cores, competes with the first (5 leaders'
# solves: 60-70 ms with one worker, 90-145 ms with two, on the 2-core VM of benchmarks/results/).
PARTITION_WORKERS = 1


def partition_problem(req: PlanRequest, plan: ParallelPlan, limit_bytes: float) -> PartitionProblem:
    """The plan's layer-to-stage problem: per-block time and per-device memory per block, per-device base
    time and memory, from the cost model at 0, 1 and 2 blocks per device."""
    batch = PlanBatch.of_plan(req.model, req.training, req.cluster, plan, measured=req.measured, runtime=req.runtime)
    pp = plan.pp

    def with_blocks(count: int) -> PlanBatch:
        return replace(batch, blocks=np.full((1, pp), count, dtype=np.int64))

    one, two = (evaluate(with_blocks(n)).device_total_bytes[0] for n in (1, 2))
    per_block_bytes = two - one
    # FSDP2's hooks: the root unit's on every device, and each block unit's (planner/cost/data.py `fsdp_hooks_s`).
    root_hooks = fsdp_hooks_s(with_blocks(0))[0]
    base_time = with_blocks(0).per_device("busy_s")[0] + root_hooks
    block_time = float(batch.block.busy_s[0, 0] + fsdp_hooks_s(with_blocks(1))[0, 0] - root_hooks[0])
    return PartitionProblem(
        block_time_s=(block_time,) * req.model.num_layers,
        block_memory_bytes=(tuple(float(b) for b in per_block_bytes),) * req.model.num_layers,
        device_base_time_s=tuple(float(t) for t in base_time),
        device_base_memory_bytes=tuple(float(b) for b in one - per_block_bytes),
        capacity_bytes=limit_bytes,
        pp=pp,
        virtual_stages=plan.virtual_stages,
    )


def rebalance(req: PlanRequest, plans: Ranked, limit_bytes: float) -> tuple[Ranked, int]:
    """Each pipelined plan re-split by the ILP where that is faster, or fits where the even split did not.
    Returns the plans and how many were partitioned."""
    answer, partitioned = [], 0
    for plan, est in plans:
        if plan.pp == 1:
            answer.append((plan, est))
            continue
        partitioned += 1
        answer.append(_better_split(req, plan, est, limit_bytes))
    return answer, partitioned


def _better_split(
    req: PlanRequest, plan: ParallelPlan, est: StepEstimate, limit_bytes: float
) -> tuple[ParallelPlan, StepEstimate]:
    try:
        problem = partition_problem(req, plan, limit_bytes)
        found = solve_partition(problem, time_limit_s=PARTITION_TIME_LIMIT_S, workers=PARTITION_WORKERS)
    except TimeoutError:
        return plan, est  # no split found in time: the even split stands
    if found is None or found.layers_per_stage == plan.stage_layer_counts(req.model.num_layers):
        return plan, est
    split = plan.model_copy(update={"layers_per_stage": found.layers_per_stage})
    split_est = estimate_step(req.model, req.training, req.cluster, split, req.measured, req.runtime)
    fitted = est.memory.peak_bytes <= limit_bytes
    if split_est.memory.peak_bytes > limit_bytes or (fitted and split_est.step_time_s >= est.step_time_s):
        return plan, est
    return split, split_est
