"""apply_plan: turn one rank's copy of the model into its share of a parallel plan, in DESIGN.md's fixed order.

pipeline split -> context parallel -> expert parallel -> tensor/sequence parallel -> activation recompute -> data
parallel (DDP / FSDP2; experts over their edp ranks) -> pipeline stages + schedule. Every rank calls it with the
same full model (same seed) and the plan's mesh; what comes back (`AppliedPlan`) runs one step's forward and
backward on this rank's slice of the global batch and reports the global-batch mean loss, so a parallel run and a
single-device run can be compared number for number.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from executor.mesh import build_expert_mesh
from executor.parallel.checkpoint import apply_recompute
from executor.parallel.context import apply_context_parallel
from executor.parallel.data import apply_data_parallel, make_optimizer, uses_classic_ddp
from executor.parallel.expert import (
    ExpertGradReduction,
    apply_expert_parallel,
    apply_sequence_shards,
    expert_parameters,
    moe_layers,
    set_aux_grad_scale,
    take_aux_losses,
)
from executor.parallel.pipeline import build_schedule, build_stages, split_model
from executor.parallel.tensor import apply_tensor_parallel
from executor.support import require_executable

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh

    from executor.models import Transformer
    from planner.specs import ParallelPlan, TrainingSpec

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
ScaleLoss = Callable[[torch.Tensor], torch.Tensor]


class ScheduleLoss:
    """The loss function a pipeline schedule calls on the last stage: the loss, times the step's loss scale under
    fp16 (executor/precision.py), since the schedule runs backward on what this returns."""

    def __init__(self, loss_fn: LossFn) -> None:
        self.loss_fn = loss_fn
        self.scale_loss: ScaleLoss | None = None

    def __call__(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        loss = self.loss_fn(output, target)
        return loss if self.scale_loss is None else self.scale_loss(loss)


@dataclass
class AppliedPlan:
    """This rank's share of a plan: its model chunks (one unless interleaved), and the schedule under PP."""

    plan: ParallelPlan
    mesh: DeviceMesh
    chunks: list[nn.Module]
    schedule: Any  # a torch.distributed.pipelining schedule, or None without pipeline parallelism
    is_first: bool  # holds the first pipeline stage (takes token ids)
    is_last: bool  # holds the last pipeline stage (computes the loss)
    microbatches: int
    loss_fn: LossFn
    device: torch.device
    replicas: DeviceMesh  # the ranks holding the same weights, whose gradients are averaged: dp, or dp x cp
    positions: torch.Tensor | None = None  # this rank's sequence positions under context parallelism
    schedule_loss: ScheduleLoss | None = None  # the schedule's loss function under PP
    expert_grads: ExpertGradReduction | None = None  # expert parallelism on classic DDP: the experts' reduction
    expert_group: Any = None  # expert parallelism: the ep group, whose ranks hold different experts

    @property
    def replica_group(self) -> Any:
        return self.replicas.get_group()

    def parameters(self) -> Iterator[nn.Parameter]:
        for chunk in self.chunks:
            yield from chunk.parameters()

    def make_optimizers(
        self, optimizer_class: type[torch.optim.Optimizer], **kwargs: Any
    ) -> list[torch.optim.Optimizer]:
        """One optimizer per model chunk (ZeroRedundancyOptimizer under ZeRO-1). Per chunk, so that a checkpoint
        can name each optimizer's state by the parameter names of its own chunk (executor/train_state.py)."""
        return [
            make_optimizer(chunk.parameters(), self.plan.zero_stage, self.replica_group, optimizer_class, **kwargs)
            for chunk in self.chunks
        ]

    def step(self, tokens: torch.Tensor, targets: torch.Tensor, scale_loss: ScaleLoss | None = None) -> float:
        """Forward and backward over this rank's rows of the global batch [B, s]; the global-batch mean loss.

        Gradients equal those of the mean loss over all B sequences: each micro-batch's mean loss is scaled by
        1/microbatches (by hand here, by the schedule's `scale_grads` under PP) and DP averages over dp x cp ranks.
        Under context parallelism each rank's loss covers its s/cp tokens; the ring carries every other rank's
        gradient with respect to this rank's keys and values back to it, so the sum over cp ranks of their
        gradients is the gradient of the sum of their losses, and the average over cp that of the mean loss
        (Megatron-LM averages over its data-parallel-with-context-parallel group the same way).
        `scale_loss` (fp16's loss scaler) multiplies every loss before its backward; the gradients then carry
        the scale until the scaler unscales them, and the loss reported is unscaled.
        """
        tokens, targets = self._local_rows(tokens), self._local_rows(targets)
        self._scale_aux_loss(scale_loss)
        if self.schedule is not None:
            local = self._pipeline(tokens, targets, scale_loss)
        else:
            local = self._accumulate(tokens, targets, scale_loss)
        if self.expert_grads is not None:
            self.expert_grads()
        align_grads_with_params(self.parameters())
        return self._global_mean(local)

    def _scale_aux_loss(self, scale_loss: ScaleLoss | None) -> None:
        """Give the MoE load-balancing loss's gradient the scale this step gives the loss: 1 / micro-batches when
        this code divides each micro-batch's loss (a pipeline schedule divides the gradients itself, `scale_grads`),
        times fp16's loss scale."""
        if not self.moe:
            return
        scale = 1.0 if scale_loss is None else scale_loss(torch.ones((), device=self.device)).item()
        set_aux_grad_scale(self.chunks, scale if self.schedule is not None else scale / self.microbatches)

    def aux_loss(self) -> float | None:
        """The step's MoE load-balancing loss (executor/models/routing.py, without its coefficient): per layer,
        the mean over the step's micro-batches; then the mean over all MoE layers and dp x cp ranks. None for a
        dense model. Every rank must call it (two small all-reduces)."""
        if not self.moe:
            return None
        total, layers = take_aux_losses(self.chunks, self.microbatches)
        summed = torch.tensor([total, float(layers)], device=self.device)
        if self.plan.pp > 1:
            dist.all_reduce(summed, group=self.mesh["pp"].get_group())
        if self.replicas.size() > 1:
            dist.all_reduce(summed, group=self.replica_group)
            summed[0] /= self.replicas.size()
            summed[1] /= self.replicas.size()
        return (summed[0] / summed[1]).item() if summed[1] > 0 else None

    @property
    def moe(self) -> bool:
        return any(True for chunk in self.chunks for _ in moe_layers(chunk))

    def _local_rows(self, batch: torch.Tensor) -> torch.Tensor:
        """dp rank r takes rows [r B/dp, (r+1) B/dp) of the global batch; under context parallelism, only the
        columns of its cp rank's positions (the zigzag chunks, executor/parallel/context.py)."""
        rows = batch.chunk(self.plan.dp)[self.mesh["dp"].get_local_rank()].to(self.device)
        return rows if self.positions is None else rows[:, self.positions]

    def _accumulate(self, tokens: torch.Tensor, targets: torch.Tensor, scale_loss: ScaleLoss | None) -> torch.Tensor:
        """Gradient accumulation over equal micro-batches, communicating as the cost model counts it
        (planner/cost/step.py `dp_comm_s`); see `_accumulating`."""
        (model,) = self.chunks
        total = torch.zeros((), device=self.device)
        pairs = list(zip(tokens.chunk(self.microbatches), targets.chunk(self.microbatches), strict=True))
        for index, (x, y) in enumerate(pairs):
            with _accumulating(model, self.plan.zero_stage, last=index == len(pairs) - 1):
                loss = self.loss_fn(model(x), y)
                share = loss / self.microbatches
                (share if scale_loss is None else scale_loss(share)).backward()
            total += loss.detach()
        return total / self.microbatches

    def _pipeline(self, tokens: torch.Tensor, targets: torch.Tensor, scale_loss: ScaleLoss | None) -> torch.Tensor:
        """One schedule step; the last stage's mean micro-batch loss, unscaled (zero on the other stages)."""
        assert self.schedule_loss is not None
        self.schedule_loss.scale_loss = scale_loss
        losses: list[torch.Tensor] = []
        inputs = (tokens,) if self.is_first else ()
        outputs = {"target": targets, "losses": losses} if self.is_last else {}
        self.schedule.step(*inputs, **outputs)
        if not self.is_last:
            return torch.zeros((), device=self.device)
        mean = torch.stack([loss.detach() for loss in losses]).mean()
        if scale_loss is None:
            return mean
        return mean / scale_loss(torch.ones((), device=self.device))  # the scale: a power of 2, so this is exact

    def _global_mean(self, local: torch.Tensor) -> float:
        """Mean over dp x cp ranks (each saw B/dp rows of s/cp tokens), then the last stage's value on every pp
        rank. TP ranks already agree (the head's output is replicated)."""
        loss = local.detach().float().clone()
        if self.replicas.size() > 1:
            dist.all_reduce(loss, group=self.replica_group)
            loss /= self.replicas.size()
        if self.plan.pp > 1:  # the other stages contribute zeros: a sum is a broadcast from the last stage
            dist.all_reduce(loss, group=self.mesh["pp"].get_group())
        return loss.item()

    def clip_grad_norm_(self, max_norm: float) -> float:
        """Scale gradients so their global 2-norm is at most `max_norm`; the norm before clipping.

        The norm covers every parameter of the model once, whatever is sharded over tp/dp (DTensor norms are
        reduced by `full_tensor`), split over pipeline stages (squares summed over pp) or, for routed experts, split
        over the ep group (their squares summed over it).
        """
        pp_group = self.mesh["pp"].get_group() if self.plan.pp > 1 else None
        experts = None
        if self.expert_group is not None:
            experts = ExpertShards(expert_parameters(self.chunks), self.expert_group)
        return clip_grad_norm(self.parameters(), max_norm, self.device, pp_group, experts)


@dataclass(frozen=True)
class ExpertShards:
    """Parameters that each rank of `group` holds a different share of (expert parallelism's experts)."""

    params: list[nn.Parameter]
    group: Any


def clip_grad_norm(
    params: Iterable[nn.Parameter],
    max_norm: float,
    device: torch.device,
    pp_group: Any = None,
    experts: ExpertShards | None = None,
) -> float:
    """Scale the gradients of `params` (plain tensors or DTensors of any layouts) so that their global 2-norm is at
    most `max_norm`; the norm before clipping. `pp_group`: the pipeline group whose stages hold the rest of the
    model (their squares are summed), if any; `experts`: those of `params` whose other shares other ranks hold."""
    params = list(params)
    sharded = {id(p) for p in experts.params} if experts is not None else set()
    groups = _grads_by_layout(p for p in params if id(p) not in sharded)
    norm_sq = _norm_sq(groups, device)
    if experts is not None:
        expert_groups = _grads_by_layout(iter(experts.params))
        expert_sq = _norm_sq(expert_groups, device)
        dist.all_reduce(expert_sq, group=experts.group)
        norm_sq, groups = norm_sq + expert_sq, groups + expert_groups
    if pp_group is not None:
        dist.all_reduce(norm_sq, group=pp_group)
    total = norm_sq.sqrt()
    for group in groups:  # one call per layout: foreach kernels cannot mix DTensor layouts or plain tensors
        torch.nn.utils.clip_grads_with_norm_(group, max_norm, total)
    return total.item()


@contextmanager
def _accumulating(model: nn.Module, zero_stage: int, last: bool) -> Iterator[None]:
    """One micro-batch's forward and backward under gradient accumulation. ZeRO-0/1 reduce the gradients once,
    after the last micro-batch (DDP's `no_sync`, FSDP2 `replicate`'s `set_requires_gradient_sync`), as Megatron-LM
    does. ZeRO-2 reduce-scatters after every micro-batch, which keeps gradients sharded, but keeps the gathered
    parameters until the last backward (ZeRO-2 shards no parameters); ZeRO-3 regathers them every micro-batch
    (Rajbhandari et al. 2020, sec. 5). A module without a data-parallel wrapper (one dp rank) has nothing to do."""
    from torch.distributed.fsdp import FSDPModule

    if last or zero_stage == 3:
        yield
    elif isinstance(model, DistributedDataParallel):
        with model.no_sync():
            yield
    elif isinstance(model, FSDPModule):  # fully_shard (ZeRO-2) or replicate (ZeRO-0)
        hold = model.set_reshard_after_backward if zero_stage == 2 else model.set_requires_gradient_sync
        hold(False)
        try:
            yield
        finally:
            hold(True)
    else:
        yield


def align_grads_with_params(params: Iterable[nn.Parameter]) -> None:
    """Bring every DTensor gradient to its parameter's layout, as the optimizer and the gradient norm expect, once
    per step after backward:

    - gradients that are partial sums over ranks are summed, one all-reduce per layout: under sequence parallelism
      the norms saw only this rank's shard of the sequence (Korthikanti et al. 2022, sec. 4.2.2), and Megatron-LM
      all-reduces their gradients over tp once after backward (megatron/core/distributed/finalize_model_grads.py).
      Left `Partial`, DTensor reduces them again in every operation that reads one: measured on a 4-block Llama
      at tp 2 with SP, 11 all-reduces in the gradient norm and 27 in AdamW's step, about 100 ms a step on 2 CPU
      ranks;
    - whole gradients of sharded parameters are cut to this rank's shard, which needs no communication: torch's
      vocabulary-parallel embedding (RowwiseParallel) leaves its weight's gradient `Replicate`, all [vocab, h] of it
      on every tp rank (torch 2.13), and each optimizer operation would cut it again."""
    from torch.distributed.tensor import DTensor

    groups: dict[Any, list[nn.Parameter]] = {}
    for param in params:
        grad = param.grad
        if isinstance(grad, DTensor) and tuple(grad.placements) != tuple(param.placements):
            key = (grad.device_mesh, tuple(grad.placements), tuple(param.placements))
            groups.setdefault(key, []).append(param)
    for (mesh, placements, target), group in groups.items():
        if _sums_into(placements, target):
            _all_reduce_partials(group, mesh, placements, target)
        else:
            for param in group:
                param.grad = param.grad.redistribute(placements=target)


def _sums_into(placements: tuple, target: tuple) -> bool:
    """Whether each mesh dimension either keeps its placement or turns a partial sum into a replica: then one
    all-reduce per such dimension of the gradients flattened together does the whole change."""
    from torch.distributed.tensor import Partial, Replicate

    def summed(have: Any, want: Any) -> bool:
        return isinstance(have, Partial) and have.reduce_op == "sum" and isinstance(want, Replicate)

    return all(have == want or summed(have, want) for have, want in zip(placements, target, strict=True))


def _all_reduce_partials(group: list[nn.Parameter], mesh: DeviceMesh, placements: tuple, target: tuple) -> None:
    """Sum the group's partial gradients over the mesh dimensions where they are partial, flattened into one
    buffer (one all-reduce per dimension, not per tensor), and give each parameter its summed gradient."""
    from torch.distributed.tensor import DTensor

    shards = [param.grad.to_local() for param in group]
    flat = torch.cat([shard.reshape(-1) for shard in shards])
    for dim, (have, want) in enumerate(zip(placements, target, strict=True)):
        if have != want:
            dist.all_reduce(flat, group=mesh.get_group(dim))
    for param, shard, values in zip(group, shards, flat.split([s.numel() for s in shards]), strict=True):
        grad = param.grad
        param.grad = DTensor.from_local(values.view_as(shard), mesh, target, shape=grad.shape, stride=grad.stride())


def _grads_by_layout(params: Iterator[nn.Parameter]) -> list[list[nn.Parameter]]:
    """Parameters with gradients, grouped by DTensor mesh and placements (plain tensors in one group)."""
    from torch.distributed.tensor import DTensor

    groups: dict[Any, list[nn.Parameter]] = {}
    for param in params:
        if param.grad is None:
            continue
        grad = param.grad
        key = (grad.device_mesh, tuple(grad.placements)) if isinstance(grad, DTensor) else None
        groups.setdefault(key, []).append(param)
    return list(groups.values())


def _norm_sq(groups: list[list[nn.Parameter]], device: torch.device) -> torch.Tensor:
    """The sum of the squared gradient norms of `groups` (each of one layout)."""
    return sum((_group_norm(group, device) ** 2 for group in groups), torch.zeros((), device=device))


def _group_norm(params: list[nn.Parameter], device: torch.device) -> torch.Tensor:
    """2-norm of the gradients of parameters of one layout, as a plain tensor on `device`: the value over the whole
    model. Offloaded gradients (FSDP2's CPUOffloadPolicy) are on the host: their norm moves to `device` before it
    is reduced, since the device's collectives (NCCL) take no host tensor."""
    from torch.distributed.tensor import DTensor

    norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None], 2.0).to(device)
    return norm.full_tensor() if isinstance(norm, DTensor) else norm


def apply_plan(
    model: Transformer,
    plan: ParallelPlan,
    mesh: DeviceMesh,
    *,
    training: TrainingSpec,
    loss_fn: LossFn,
    device: torch.device,
) -> AppliedPlan:
    """This rank's share of `plan` over `mesh` (from executor.mesh.build_mesh), built from the full `model`."""
    require_executable(plan, model.spec, training)  # refuse before any collective can hang on a bad plan
    # 1. Pipeline split first: every later step then touches only the layers this rank runs, and the chunks keep
    #    the full model's FQNs, which the TP plan below addresses.
    chunks = split_model(model, plan, mesh["pp"].get_local_rank())
    replicas = replica_mesh(mesh, plan)
    positions = [apply_context_parallel(chunk, mesh["cp"], training.seq_len, device) for _, chunk in chunks]
    # Expert parallelism next, before anything wraps parameters: each rank drops the experts it does not hold.
    expert_mesh = _apply_experts([chunk for _, chunk in chunks], plan, mesh, device)
    edp_mesh = expert_mesh["edp"] if expert_mesh is not None else None
    modules = [_parallelize_chunk(chunk, plan, mesh, replicas, edp_mesh) for _, chunk in chunks]
    num_stages = plan.num_model_chunks
    stage_ids = [stage for stage, _ in chunks]
    schedule, schedule_loss = None, None
    if plan.pp > 1:
        # 5. Stages and schedule last: PipelineStage must wrap the final (DDP/FSDP2) module, whose backward it
        #    drives (no_sync / requires_gradient_sync on all but the last micro-batch).
        stages = build_stages(list(zip(stage_ids, modules, strict=True)), num_stages, mesh["pp"], device)
        schedule_loss = ScheduleLoss(loss_fn)
        schedule = build_schedule(stages, plan.schedule, plan.num_microbatches(training), schedule_loss)
    return AppliedPlan(
        plan=plan,
        mesh=mesh,
        chunks=modules,
        schedule=schedule,
        is_first=0 in stage_ids,
        is_last=num_stages - 1 in stage_ids,
        microbatches=plan.num_microbatches(training),
        loss_fn=loss_fn,
        device=device,
        replicas=replicas,
        positions=positions[0],
        schedule_loss=schedule_loss,
        expert_grads=_expert_grad_reduction(modules, plan, edp_mesh),
        expert_group=expert_mesh["ep"].get_group() if expert_mesh is not None else None,
    )


def _apply_experts(
    chunks: list[Transformer], plan: ParallelPlan, mesh: DeviceMesh, device: torch.device
) -> DeviceMesh | None:
    """Give the MoE layers of `chunks` their cp group (the load-balancing loss's statistics are per whole
    sequence) and, under expert parallelism, their ep group and this rank's experts; the (pp, edp, ep, tp) mesh of
    expert parallelism, or None without it."""
    for chunk in chunks:
        apply_sequence_shards(chunk, mesh["cp"])
    if plan.ep == 1:
        return None
    expert_mesh = build_expert_mesh(plan, device.type)
    for chunk in chunks:
        apply_expert_parallel(chunk, expert_mesh["ep"])
    return expert_mesh


def _expert_grad_reduction(
    modules: list[nn.Module], plan: ParallelPlan, edp_mesh: DeviceMesh | None
) -> ExpertGradReduction | None:
    """The experts' gradient reduction that classic DDP, told to skip them, leaves to the step; None where no
    expert parallelism or where FSDP2 reduces them over edp itself (executor/parallel/data.py)."""
    pure_dp = plan.tp == 1 and plan.pp == 1
    if edp_mesh is None or not uses_classic_ddp(plan.zero_stage, pure_dp):
        return None
    params = expert_parameters(modules)
    edp_group = edp_mesh.get_group() if edp_mesh.size() > 1 else None
    return ExpertGradReduction(params, edp_group, plan.dp * plan.cp)


def replica_mesh(mesh: DeviceMesh, plan: ParallelPlan) -> DeviceMesh:
    """The ranks that hold the same weights and average their gradients: the dp axis, or under context
    parallelism dp x cp flattened into one axis (Megatron-LM's data-parallel group with context parallelism;
    torchtitan's `dp_shard_cp`), over which ZeRO then shards too, as planner/cost/batch.py `shard_degree` counts."""
    if plan.cp == 1:
        return mesh["dp"]
    return mesh["dp", "cp"]._flatten("dp_cp")


def _parallelize_chunk(
    chunk: Transformer, plan: ParallelPlan, mesh: DeviceMesh, replicas: DeviceMesh, edp_mesh: DeviceMesh | None
) -> nn.Module:
    # 2. TP/SP before anything wraps the blocks: parallelize_module finds submodules by their plain FQNs and
    #    turns their parameters into DTensors on the tp mesh.
    chunk = apply_tensor_parallel(chunk, mesh["tp"], plan.sequence_parallel)
    # (Context parallelism, applied before this in apply_plan, only hands the attention cores their ring and the
    # position embeddings their positions: it changes no parameter, so it composes with everything here.)
    # 3. Recompute next, inside DP: the checkpointed region then contains TP's collectives (replayed or saved in
    #    backward) but not FSDP2's all-gathers, which FSDP2 schedules itself around each block.
    chunk = apply_recompute(chunk, plan.recompute)
    # 4. DP last among module transforms: FSDP2 shards the parameters as they now are (TP's DTensors become 2-D
    #    (dp, tp) DTensors) and hooks the checkpoint-wrapped blocks, so backward's recompute re-gathers them.
    #    Under context parallelism the cp ranks are replicas too: DP runs over dp x cp (`replica_mesh`).
    offload_params = plan.offload == "optimizer_and_params"
    pure_dp = plan.tp == 1 and plan.pp == 1
    return apply_data_parallel(
        chunk, replicas, plan.zero_stage, pure_dp, offload_params=offload_params, edp_mesh=edp_mesh
    )
