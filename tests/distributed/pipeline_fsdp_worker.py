"""Count the data-parallel collectives FSDP2 issues in one pipeline schedule step of the executor; rank 0 writes them.

Under torchrun (`python -m torch.distributed.run --standalone --nproc-per-node=4 -m
tests.distributed.pipeline_fsdp_worker --cases JSON --out FILE`) every rank builds parity_worker's tiny Llama (with
each case's layer count), the executor applies the case's plan (executor/apply.py `apply_plan`: FSDP2 `fully_shard`
/ `replicate` per block and root, then torch's PipelineStage and schedule), and two training steps run with SGD.
In the second step's `schedule.step` (the first also runs the schedule's shape inference and FSDP2's lazy init)
every call of the functions FSDP2 issues its collectives through (torch/distributed/fsdp/_fully_shard/
_fsdp_collectives.py: `dist.all_gather_single` in `DefaultAllGather`, `dist.reduce_scatter_single` in
`DefaultReduceScatter`, `dist.all_reduce` in `foreach_reduce`) is counted with the ranks of its group, so the dp
group's collectives are told apart from any other. After each micro-batch's backward on a stage the worker also
records how many gradient elements FSDP2 holds unsharded (`FSDPParam._unsharded_param.grad`, where gradients
accumulate while `reduce_grads` is off) and sharded (`sharded_param.grad`, what the reduction writes), and again
after the step.
"""

from __future__ import annotations

import argparse
import inspect
import json
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from planner.specs import ModelSpec, ParallelPlan
from tests.distributed.parity_worker import LLAMA, _applied, _local_numel, batches, write_and_leave

FSDP2_COLLECTIVES = ("all_gather_single", "reduce_scatter_single", "all_reduce")
STEPS = 2  # the counts are of the last


@contextmanager
def counting_collectives(calls: Counter) -> Iterator[None]:
    """Count, into `calls`, each call of FSDP2_COLLECTIVES by (function name, ranks of its group), while inside.
    FSDP2 looks the functions up on `torch.distributed` at each call, so replacing them there sees every one."""
    originals = {name: getattr(dist, name) for name in FSDP2_COLLECTIVES}

    def counted(name: str, original: Callable) -> Callable:
        signature = inspect.signature(original)

        def call(*args: Any, **kwargs: Any) -> Any:
            group = signature.bind(*args, **kwargs).arguments.get("group") or dist.group.WORLD
            calls[(name, tuple(dist.get_process_group_ranks(group)))] += 1
            return original(*args, **kwargs)

        return call

    for name, original in originals.items():
        setattr(dist, name, counted(name, original))
    try:
        yield
    finally:
        for name, original in originals.items():
            setattr(dist, name, original)


def _fsdp_param_groups(module: torch.nn.Module) -> list[Any]:
    """The FSDP2 parameter groups in `module` (private attributes: torch has no public view of them). A
    `fully_shard` / `replicate` of a module left with no parameters of its own (a middle stage's root) has none."""
    from torch.distributed.fsdp import FSDPModule

    states = {id(m): m._get_fsdp_state() for m in module.modules() if isinstance(m, FSDPModule)}
    return [group for state in states.values() for group in state._fsdp_param_groups]


def held_grad_elements(module: torch.nn.Module) -> dict[str, int]:
    """Gradient elements FSDP2 holds for `module`: unsharded (whole, accumulating) and sharded (reduced)."""
    unsharded = sharded = 0
    for group in _fsdp_param_groups(module):
        for param in group.fsdp_params:
            whole = getattr(param, "_unsharded_param", None)
            for grad in (None if whole is None else whole.grad, param.unsharded_accumulated_grad):
                unsharded += 0 if grad is None else _local_numel(grad)
            sharded += 0 if param.sharded_param.grad is None else _local_numel(param.sharded_param.grad)
    return {"unsharded": unsharded, "sharded": sharded}


def _stages(schedule: Any) -> list[Any]:
    """The PipelineStages a torch schedule runs on this rank (one, or several for the multi-stage schedules)."""
    return list(schedule._stages) if hasattr(schedule, "_stages") else [schedule._stage]


def _program(schedule: Any, pp_rank: int, stage_index: int) -> list[str] | None:
    """The actions the schedule runs for one stage, in order (FORWARD, FULL_BACKWARD, UNSHARD, RESHARD, REDUCE_GRAD),
    as torch lowered them (schedules.py `_PipelineScheduleRuntime`, `_add_unshard_reshard`, `_add_reduce_grad`);
    None for the single-stage schedules, whose order is written in their `_step_microbatches` code."""
    lowered = getattr(schedule, "pipeline_order_with_comms", None)
    if lowered is None:
        return None
    return [a.computation_type.name for a in lowered[pp_rank] if a is not None and a.stage_index == stage_index]


def _after_each_backward(stage: Any, log: list[dict[str, int]]) -> None:
    """After each micro-batch's backward on `stage`, append what `held_grad_elements` finds to `log`."""
    backward = stage.backward_maybe_with_nosync

    def recorded(*args: Any, **kwargs: Any) -> Any:
        result = backward(*args, **kwargs)
        log.append(held_grad_elements(stage.submod))
        return result

    stage.backward_maybe_with_nosync = recorded


def _counted(function: Callable, calls: Counter) -> Callable:
    """`function`, its FSDP2 collectives counted into `calls`."""

    def call(*args: Any, **kwargs: Any) -> Any:
        with counting_collectives(calls):
            return function(*args, **kwargs)

    return call


def count_case(spec: ModelSpec, plan: ParallelPlan, mesh: Any) -> dict:
    """This rank's record for `plan`: the second step's collectives by function and group; per stage, its FSDP2
    units, parameter elements (whole and this rank's), program, and the gradient elements held after each of the
    step's micro-batch backwards and after the step."""
    applied, optimizers = _applied(spec, plan, mesh, seed=0)
    stages = _stages(applied.schedule)
    backward_logs: dict[int, list[dict[str, int]]] = {stage.stage_index: [] for stage in stages}
    for stage in stages:
        _after_each_backward(stage, backward_logs[stage.stage_index])
    calls: Counter = Counter()
    schedule_step = applied.schedule.step
    for step, (tokens, targets) in zip(range(1, STEPS + 1), batches(spec), strict=False):
        for log in backward_logs.values():
            log.clear()
        for optimizer in optimizers:
            optimizer.zero_grad()
        if step == STEPS:  # only the schedule's step: the executor's loss mean over dp after it is not FSDP2's
            applied.schedule.step = _counted(schedule_step, calls)
        applied.step(tokens, targets)
        held_after_step = {stage.stage_index: held_grad_elements(stage.submod) for stage in stages}
        for optimizer in optimizers:
            optimizer.step()
    dp_ranks = tuple(dist.get_process_group_ranks(mesh["dp"].get_group()))
    pp_rank = mesh["pp"].get_local_rank()
    return {
        "pp_rank": pp_rank,
        "microbatches": applied.microbatches,
        "calls": {f"{name}@{'dp' if ranks == dp_ranks else ranks}": n for (name, ranks), n in calls.items()},
        "stages": {
            stage.stage_index: {
                "units": len(_fsdp_param_groups(stage.submod)),
                "param_elements": sum(p.numel() for p in stage.submod.parameters()),
                "local_param_elements": sum(_local_numel(p) for p in stage.submod.parameters()),
                "program": _program(applied.schedule, pp_rank, stage.stage_index),
                "grads_after_backward": backward_logs[stage.stage_index],
                "grads_after_step": held_after_step[stage.stage_index],
            }
            for stage in stages
        },
    }


def main() -> None:
    from executor.mesh import build_mesh

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--cases", required=True, help='JSON {name: {"num_layers": L, "plan": ParallelPlan fields}}')
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    dist.init_process_group("gloo")
    results = {}
    for name, case in json.loads(args.cases).items():
        plan = ParallelPlan.model_validate(case["plan"])
        spec = LLAMA.model_copy(update={"num_layers": case["num_layers"]})
        per_rank: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(per_rank, count_case(spec, plan, build_mesh(plan, "cpu")))
        results[name] = per_rank
    write_and_leave(args.out, results)


if __name__ == "__main__":
    main()
