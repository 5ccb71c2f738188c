"""Expert parallelism: the experts of every MoE layer split over the ep ranks of an expert group, tokens carried to
them and back by all-to-all (Lepikhin et al. 2020, GShard, sec. 3.2; Megatron-Core's `MoEAlltoAllTokenDispatcher`).

The groups are planner/layout.py's (`expert_group_ranks`): an ep group is ep consecutive ranks of a dp x cp group
and holds one copy of every expert, num_experts / ep per rank (rank i of the group experts [i E/ep, (i+1) E/ep));
the edp group is the ranks holding the same experts. Per MoE layer and micro-batch:

1. the routed rows, already sorted by expert (executor/models/routing.py), are contiguous per destination rank;
   an all-to-all of the per-expert counts tells each rank how many rows of each of its experts every rank sends;
2. an all-to-all of the rows (uneven splits), regrouped by local expert, each expert computes its rows;
3. the reverse regrouping and all-to-all bring the outputs home, where they are combined with the gates.

`_AllToAll` is the differentiable all-to-all: its backward is the all-to-all with the splits swapped. (torch's
`torch.distributed.nn.functional.all_to_all_single` does the same, but torch 2.13 deprecates it (FutureWarning) for
`_functional_collectives.all_to_all_single_autograd`, which is private. gloo runs `all_to_all_single` with uneven
splits, checked on 2 ranks, so the plain collective is all this needs, on CPU as on NCCL.)

Gradients: dense parameters are averaged over dp x cp as before (executor/parallel/data.py); an expert's gradient
on one rank already sums the contributions of every token its ep group routed to it (the combine all-to-all's
backward brings them), so the edp ranks sum theirs and divide by dp x cp, the number of ranks whose mean loss
the step minimises (torchtitan sets FSDP2's gradient divide factor to its dp x cp size for the experts the same
way). Under ZeRO-0 on classic DDP the experts are kept out of DDP and reduced here (`ExpertGradReduction`); under
FSDP2 each expert is its own `fully_shard` / `replicate` unit on the edp mesh (executor/parallel/data.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from executor.models.layers import MoEFeedForward
from executor.models.routing import inverse_permutation

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Iterator

    from torch import nn
    from torch.distributed import ProcessGroup
    from torch.distributed.device_mesh import DeviceMesh


class _AllToAll(torch.autograd.Function):
    """all_to_all_single with uneven splits whose backward sends the gradients back the way the rows came."""

    @staticmethod
    def forward(ctx: Any, rows: torch.Tensor, send: list[int], receive: list[int], group: ProcessGroup) -> torch.Tensor:
        ctx.send, ctx.receive, ctx.group = send, receive, group
        return _all_to_all(rows, send, receive, group)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:
        return _all_to_all(grad, ctx.receive, ctx.send, ctx.group), None, None, None


def _all_to_all(rows: torch.Tensor, send: list[int], receive: list[int], group: ProcessGroup) -> torch.Tensor:
    out = rows.new_empty((sum(receive), *rows.shape[1:]))
    dist.all_to_all_single(out, rows.contiguous(), output_split_sizes=receive, input_split_sizes=send, group=group)
    return out


@dataclass(frozen=True)
class ExpertParallel:
    """The dispatch and combine of one rank of an ep group (`MoEFeedForward.expert_parallel`)."""

    group: ProcessGroup
    size: int

    def __call__(
        self,
        routed: torch.Tensor,
        counts: torch.Tensor,
        run_local_experts: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    ) -> torch.Tensor:
        """Rows sorted by expert [N, h] and the rows per expert [E] -> the experts' outputs for them, same order."""
        per_rank = counts.view(self.size, -1)  # [ep, local experts]: rank r's experts are rows of r
        arriving = torch.empty_like(per_rank)
        dist.all_to_all_single(arriving, per_rank, group=self.group)  # [ep sources, local experts]
        send, receive = per_rank.sum(dim=1).tolist(), arriving.sum(dim=1).tolist()
        received = _AllToAll.apply(routed, send, receive, self.group)  # ordered by (source, local expert)
        by_expert = source_to_expert_order(arriving)
        out = run_local_experts(received.index_select(0, by_expert), arriving.sum(dim=0))
        by_source = inverse_permutation(by_expert)
        return _AllToAll.apply(out.index_select(0, by_source), receive, send, self.group)


def source_to_expert_order(arriving: torch.Tensor) -> torch.Tensor:
    """The row order that turns received rows, grouped by (source rank, local expert) with `arriving` [sources,
    experts] rows each, into rows grouped by (local expert, source rank)."""
    sources, experts = arriving.shape
    segment_expert = torch.arange(sources * experts, device=arriving.device) % experts
    row_expert = segment_expert.repeat_interleave(arriving.flatten())
    return torch.argsort(row_expert, stable=True)


def moe_layers(module: nn.Module) -> Iterator[MoEFeedForward]:
    return (m for m in module.modules() if isinstance(m, MoEFeedForward))


def apply_expert_parallel(chunk: nn.Module, ep_mesh: DeviceMesh) -> None:
    """Keep only this ep rank's experts in every MoE layer of `chunk` (their names unchanged) and give each layer
    the all-to-all dispatch over the ep group. Nothing changes with ep = 1."""
    size = ep_mesh.size()
    if size == 1:
        return
    rank, group = ep_mesh.get_local_rank(), ep_mesh.get_group()
    for moe in moe_layers(chunk):
        local = moe.num_experts // size
        mine = range(rank * local, (rank + 1) * local)
        for key in list(moe.experts):
            if int(key) not in mine:
                del moe.experts[key]
        moe.expert_parallel = ExpertParallel(group, size)


class _SumOverRanks(torch.autograd.Function):
    """all_reduce(SUM) whose backward is all_reduce(SUM) of the gradients: every rank's copy of the output feeds a
    loss, so each input's gradient is the sum of theirs."""

    @staticmethod
    def forward(ctx: Any, tensor: torch.Tensor, group: ProcessGroup) -> torch.Tensor:
        ctx.group = group
        summed = tensor.clone()
        dist.all_reduce(summed, group=group)
        return summed

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        summed = grad.clone()
        dist.all_reduce(summed, group=ctx.group)
        return summed, None


@dataclass(frozen=True)
class SequenceShards:
    """Under context parallelism, the routing statistics of a whole sequence from its cp ranks' shares
    (`MoEFeedForward.sequence_shards`): counts and probability sums added over the cp group, tokens times cp.

    Each cp rank then computes the same per-sequence load-balancing loss and backpropagates it; the summed
    gradient brings every rank cp times its share, which the average over dp x cp divides back, as it does for the
    cross-entropy of each rank's s / cp tokens (executor/apply.py `AppliedPlan.step`)."""

    group: ProcessGroup
    size: int

    def __call__(
        self, counts: torch.Tensor, prob_sums: torch.Tensor, tokens: int
    ) -> tuple[torch.Tensor, torch.Tensor, int]:
        counts = counts.clone()
        dist.all_reduce(counts, group=self.group)  # no gradient: which experts were chosen
        return counts, _SumOverRanks.apply(prob_sums, self.group), tokens * self.size


def apply_sequence_shards(chunk: nn.Module, cp_mesh: DeviceMesh) -> None:
    """Give every MoE layer of `chunk` the cp group its sequences are split over; nothing with one cp rank."""
    if cp_mesh.size() == 1:
        return
    shards = SequenceShards(cp_mesh.get_group(), cp_mesh.size())
    for moe in moe_layers(chunk):
        moe.sequence_shards = shards


def expert_parameter_names(module: nn.Module) -> list[str]:
    """FQNs (in `module`) of every routed expert's parameters: what is reduced over edp instead of dp x cp."""
    names = []
    for prefix, moe in module.named_modules():
        if isinstance(moe, MoEFeedForward):
            names += [f"{prefix}.experts.{name}" for name, _ in moe.experts.named_parameters()]
    return names


def expert_parameters(modules: Iterable[nn.Module]) -> list[nn.Parameter]:
    """Every routed expert's parameters in `modules` (this rank's experts under expert parallelism)."""
    return [p for module in modules for moe in moe_layers(module) for p in moe.experts.parameters()]


@dataclass
class ExpertGradReduction:
    """Sum the expert gradients over the edp group and divide by dp x cp (see the module docstring), once per step
    after the last micro-batch's backward: what DDP does for the dense parameters, for the ones it was told to skip."""

    params: list[nn.Parameter]
    edp_group: ProcessGroup | None  # None with one rank per expert
    data_ranks: int  # dp x cp

    def __call__(self) -> None:
        grads = [p.grad for p in self.params if p.grad is not None]
        if not grads:
            return
        flat = torch.cat([g.reshape(-1) for g in grads])
        if self.edp_group is not None:
            dist.all_reduce(flat, group=self.edp_group)
        flat /= self.data_ranks
        for grad, values in zip(grads, flat.split([g.numel() for g in grads]), strict=True):
            grad.copy_(values.view_as(grad))


def set_aux_grad_scale(modules: Iterable[nn.Module], scale: float) -> None:
    """Scale the load-balancing loss's gradient as the caller scales the loss it backpropagates."""
    for module in modules:
        for moe in moe_layers(module):
            moe.aux_grad_scale = scale


def take_aux_losses(modules: Iterable[nn.Module], microbatches: int) -> tuple[float, int]:
    """The sum over this rank's MoE layers of each layer's mean aux loss over the step's `microbatches` backwards,
    and the number of layers; clears what the layers recorded. Only the last `microbatches` records count: on its
    first step torch 2.13's PipelineStage runs one more forward and backward, on uninitialised tensors, to infer
    the shapes it sends (`_backward_metadata_inference`)."""
    total, layers = 0.0, 0
    for module in modules:
        for moe in moe_layers(module):
            if moe.aux_losses:
                total += torch.stack(moe.aux_losses[-microbatches:]).mean().item()
                layers += 1
            moe.aux_losses.clear()
    return total, layers
