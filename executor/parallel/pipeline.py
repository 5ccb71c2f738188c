"""Pipeline parallelism: cut the model into chunks, wrap them as PipelineStages and pick the schedule.

The split is torchtitan's manual one: every rank deep-copies the whole model and prunes what its chunks do not
hold. Layers live in an `nn.ModuleDict` keyed by their global index, so each chunk keeps the parameter names
(FQNs) of the full model and `init_weights` / checkpoints see the same names whatever the split. Chunk c runs
on pp rank c % pp (the loop placement of Narayanan et al. SC'21 and of `plan.stage_layer_counts`).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from itertools import accumulate
from typing import TYPE_CHECKING

from torch import nn

if TYPE_CHECKING:
    import torch
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.pipelining import PipelineStage
    from torch.distributed.pipelining.schedules import _PipelineSchedule

    from executor.models import Transformer
    from planner.specs import ParallelPlan


def chunk_layer_ranges(plan: ParallelPlan, num_layers: int) -> list[range]:
    """The global layer indices of each model chunk, in pipeline order."""
    ends = list(accumulate(plan.stage_layer_counts(num_layers)))
    return [range(end - count, end) for end, count in zip(ends, plan.stage_layer_counts(num_layers), strict=True)]


def prune_to_chunk(model: Transformer, layers: range, first: bool, last: bool) -> Transformer:
    """A deep copy of `model` holding only `layers`, plus the embeddings if `first` and norm + head if `last`."""
    chunk = copy.deepcopy(model)
    for key in list(chunk.layers):
        if int(key) not in layers:
            del chunk.layers[key]
    if not first:  # the model's forward skips None modules and takes hidden states instead of token ids
        chunk.tok_embeddings = None
        chunk.pos_embeddings = None
    if not last:
        chunk.norm = None
        chunk.output = None
    return chunk


def split_model(model: Transformer, plan: ParallelPlan, pp_rank: int) -> list[tuple[int, Transformer]]:
    """(stage index, module) for each model chunk that pp rank `pp_rank` runs; the model itself when pp == 1."""
    if plan.num_model_chunks == 1:
        return [(0, model)]  # no copy: keeps a tied head tied
    ranges = chunk_layer_ranges(plan, len(model.layers))
    last = len(ranges) - 1
    return [
        (stage, prune_to_chunk(model, layers, first=stage == 0, last=stage == last))
        for stage, layers in enumerate(ranges)
        if stage % plan.pp == pp_rank
    ]


def build_stages(
    chunks: Sequence[tuple[int, nn.Module]], num_stages: int, pp_mesh: DeviceMesh, device: torch.device
) -> list[PipelineStage]:
    """One PipelineStage per chunk. Shapes are inferred at run time, so TP/SP-sharded activations need no args."""
    from torch.distributed.pipelining import PipelineStage

    group = pp_mesh.get_group()
    return [PipelineStage(module, stage, num_stages, device, group=group) for stage, module in chunks]


def build_schedule(
    stages: Sequence[PipelineStage], schedule_name: str, microbatches: int, loss_fn: Callable
) -> _PipelineSchedule:
    """torch's schedule for the plan's name. `scale_grads` (default) divides gradients by the micro-batch count,
    so with equal micro-batches they equal those of the mean loss over the whole local batch."""
    from torch.distributed.pipelining import Schedule1F1B, ScheduleGPipe, ScheduleInterleaved1F1B

    if schedule_name == "interleaved_1f1b":
        return ScheduleInterleaved1F1B([*stages], n_microbatches=microbatches, loss_fn=loss_fn)
    single_stage = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B}[schedule_name]
    (stage,) = stages  # the plan's intrinsic rules give these schedules one chunk per rank
    return single_stage(stage, n_microbatches=microbatches, loss_fn=loss_fn)
