"""Data parallelism at the plan's ZeRO stage (Rajbhandari et al. 2020, sec. 5), on the mesh's dp axis.

| ZeRO | what is split over dp            | torch feature                                                       |
|------|----------------------------------|---------------------------------------------------------------------|
| 0    | nothing (gradients all-reduced)  | DDP for pure-DP plans; FSDP2's `replicate` under TP or PP           |
| 1    | optimizer state                  | DDP + ZeroRedundancyOptimizer (`make_optimizer`): gradients are     |
|      |                                  | all-reduced, each owner broadcasts its updated share                |
| 2    | + gradients                      | FSDP2 `fully_shard(reshard_after_forward=False)`: parameters stay   |
|      |                                  | gathered over the step's micro-batches, gradients are               |
|      |                                  | reduce-scattered after each (executor/apply.py `_accumulating`)     |
| 3    | + parameters                     | FSDP2 `fully_shard(reshard_after_forward=True)`                     |

FSDP2 (and its `replicate`) is applied per block and then to the root, so each block's all-gather /
reduce-scatter is its own collective that overlaps with the neighbouring blocks' compute. Under a pipeline, torch's
PipelineStage drives the units instead of `_accumulating`: no unit reduces or reshards after a micro-batch's
backward, each reduces once after the stage's last one (planner/cost/data.py `sharded_passes`). Classic DDP cannot
hold DTensor (tensor-parallel) parameters, and the old `_composable.replicate` trains silently wrong with them
(shared/notes/torch-distributed-on-cpu.md), hence FSDP2's `replicate` whenever the plan is not pure DP.
Every wrapper averages gradients over dp, so gradients equal those of the mean loss over the global batch.
With one dp rank there is nothing to synchronise and the module is returned unchanged.

Under expert parallelism (`edp_mesh`, executor/parallel/expert.py) the routed experts are synchronised over their
edp group instead: FSDP2 (and its `replicate`) wraps each expert as its own unit on the edp mesh, before the blocks,
with gradients divided by dp x cp rather than edp (torchtitan's MoE parallelize does the same); classic DDP is told
to skip them, and `ExpertGradReduction` reduces them after backward.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from torch import nn

if TYPE_CHECKING:
    import torch
    from torch.distributed import ProcessGroup
    from torch.distributed.device_mesh import DeviceMesh

    from executor.models import Transformer


def _per_block_then_root(wrap: Callable[..., Any], module: Transformer, **kwargs: Any) -> nn.Module:
    """Apply an FSDP2-style wrapper to every block of `module`, then to `module` for what is left (embeddings,
    norm, head): one communication group per block, as torchtitan does."""
    for block in module.layers.values():
        wrap(block, **kwargs)
    wrap(module, **kwargs)
    return module


def uses_classic_ddp(zero_stage: int, pure_dp: bool) -> bool:
    """Whether `apply_data_parallel` wraps with classic DDP (ZeRO-1, or ZeRO-0 of a pure-DP plan)."""
    return zero_stage == 1 or (zero_stage == 0 and pure_dp)


def apply_data_parallel(
    module: Transformer,
    dp_mesh: DeviceMesh,
    zero_stage: int,
    pure_dp: bool,
    offload_params: bool = False,
    edp_mesh: DeviceMesh | None = None,
) -> nn.Module:
    """`module` synchronised over `dp_mesh` at `zero_stage`; DDP returns a wrapper, FSDP2 changes it in place.

    `pure_dp`: the plan has tp == pp == 1, so classic DDP can run ZeRO-0 (it is the fastest on CPU/gloo).
    `offload_params`: ZeRO-3 with the weight shards, their gradients and the optimizer step on the host (the plan's
    offload "optimizer_and_params"): FSDP2's CPUOffloadPolicy, also with one dp rank (single-GPU offload).
    `edp_mesh`: under expert parallelism, the ranks holding the same experts, over which these are synchronised.
    """
    if dp_mesh.size() == 1 and not offload_params:
        return module
    if zero_stage >= 2:
        from torch.distributed.fsdp import CPUOffloadPolicy, OffloadPolicy, fully_shard

        # Pinned host memory makes the copies asynchronous on CUDA; there is nothing to pin for on a CPU mesh.
        policy = CPUOffloadPolicy(pin_memory=dp_mesh.device_type == "cuda") if offload_params else OffloadPolicy()
        kwargs = {"reshard_after_forward": zero_stage == 3, "offload_policy": policy}
        _experts_on_edp(fully_shard, module, edp_mesh, dp_mesh.size(), sharded=True, **kwargs)
        return _per_block_then_root(fully_shard, module, mesh=dp_mesh, **kwargs)
    if uses_classic_ddp(zero_stage, pure_dp):
        if edp_mesh is not None:
            from torch.nn.parallel import DistributedDataParallel

            from executor.parallel.expert import expert_parameter_names

            DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(module, expert_parameter_names(module))
        return classic_ddp(module, dp_mesh.get_group())
    from torch.distributed._composable.replicate_with_fsdp import replicate

    _experts_on_edp(replicate, module, edp_mesh, dp_mesh.size(), sharded=False)
    return _per_block_then_root(replicate, module, mesh=dp_mesh)


def _experts_on_edp(
    wrap: Callable[..., Any],
    module: Transformer,
    edp_mesh: DeviceMesh | None,
    data_ranks: int,
    sharded: bool,
    **kwargs: Any,
) -> None:
    """Wrap every routed expert of `module` on `edp_mesh` (before its block, which then leaves its parameters
    alone), its gradients summed over edp and divided by the `data_ranks` (dp x cp) whose mean loss they serve.
    `sharded`: `wrap` is fully_shard (reduce-scatter over edp), not replicate (all-reduce)."""
    if edp_mesh is None:
        return
    from executor.parallel.expert import moe_layers

    # With a divide factor other than the group's size FSDP2 reduce-scatters with PREMUL_SUM, which gloo lacks
    # ("Cannot use ReduceOp.PREMUL_SUM with Gloo"): forced to sum, it divides after. Only for a real reduce-scatter:
    # where there is none (replicate, or one edp rank) torch 2.13 divides the local gradient by the factor itself,
    # all-reduces with SUM, and a forced sum would divide a second time (measured: expert gradients 1/factor too
    # small at pp2 x dp4 x ep2 and dp2 x ep2 at ZeRO-3).
    force_sum = sharded and edp_mesh.size() > 1
    for moe in moe_layers(module):
        for expert in moe.experts.values():
            wrap(expert, mesh=edp_mesh, **kwargs)
            expert.set_gradient_divide_factor(float(data_ranks))
            expert.set_force_sum_reduction_for_comms(force_sum)


def classic_ddp(module: nn.Module, dp_group: ProcessGroup) -> nn.Module:
    """Classic DDP, its gradients views into its all-reduce buckets: by default DDP keeps the buckets beside the
    gradients, a second copy of every gradient (PyTorch PR #41954: 1 GB less peak memory for a model of 1 GB of
    gradients), which the memory model, Megatron-LM's one contiguous gradient buffer, does not count."""
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(module, process_group=dp_group, gradient_as_bucket_view=True)


def make_optimizer(
    params: Iterable[torch.Tensor],
    zero_stage: int,
    dp_group: ProcessGroup | None,
    optimizer_class: type[torch.optim.Optimizer],
    **kwargs: Any,
) -> torch.optim.Optimizer:
    """The optimizer for `params`; under ZeRO-1 with more than one dp rank, each rank keeps the state of its
    share of the parameters and broadcasts its updated values after each step. `parameters_as_bucket_view`
    packs each rank's share into one flat bucket, so that is one broadcast per rank instead of one per
    parameter tensor: each broadcast's latency (and on CPU its Python dispatch) is paid n times, not once per
    tensor (measured on 2 gloo ranks, 3.3M-parameter Llama: ZeRO-1 cost about 50 ms a step more than ZeRO-0
    with per-tensor broadcasts, about the same with buckets)."""
    import torch.distributed as dist

    params = list(params)
    if zero_stage == 1 and dp_group is not None and dist.get_world_size(dp_group) > 1:
        from torch.distributed.optim import ZeroRedundancyOptimizer

        return ZeroRedundancyOptimizer(
            params, optimizer_class=optimizer_class, process_group=dp_group, parameters_as_bucket_view=True, **kwargs
        )
    return optimizer_class(params, **kwargs)
