"""Data parallelism's communication and its overlap with compute: gradient reduction, ZeRO's gathers and
reduce-scatters, per data-parallel wrapper (DDP, FSDP2 `fully_shard` / `replicate`, ZeroRedundancyOptimizer), as
the regime says the stack wraps each ZeRO stage and layout (planner/cost/runtime.py). Per-row values are (N, 1),
per-device ones (N, pp) (planner/cost/batch.py).

Fully sharded data parallelism (ZeRO 2 and 3) moves each unit's parameters and gradients in its own collectives:
a block is a unit, and the embedding, the head and what else a device holds make its root unit. Where the stack
prefetches (FSDP2), a unit's collectives overlap the compute of the unit next to it, so what shows is, unit by
unit, the collective time beyond that compute (Zhao et al. 2023, sec. 3.3-4), not the step's comm beyond the
step's compute.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from planner.cost import comm, params
from planner.cost.measured import hidden_share
from planner.cost.pipeline import edge_masks

if TYPE_CHECKING:
    from planner.cost.batch import PlanBatch


def dp_meetings(batch: PlanBatch) -> np.ndarray:
    """Meetings of data-parallel peers per step, each a collective every rank of the group must reach: the regime's
    reductions (Runtime.dp_step_reductions: the executor's loss mean over dp), the gradient norm's reduction when
    the parameters are DTensor shards (executor/apply.py), and the gradient collectives: DDP's buckets, after
    which ZeRO-1's owners broadcast their shares (asynchronously, waited for together: one meeting); fully sharded
    stacks one collective per unit (or per tensor, `zero_collectives`) as `dp_comm_s` counts them (`sharded_passes`
    of the gathers and reduce-scatters; `replicate`: an all-reduce per unit). With ep > 1 the experts meet their
    edp peers apart (`expert_units`, `ddp_expert_collectives`). (N, pp); 0 with one data-parallel rank."""
    zero, fsdp2 = batch.zero_stage, batch.on_fsdp2
    units = zero_collectives(batch) + expert_units(batch)
    passes = sharded_passes(batch)
    gradients = np.select(
        [fsdp2 & (zero >= 2), fsdp2],
        [units * (passes.gathers + passes.scatters), units],
        ddp_buckets(batch) + (zero == 1) + ddp_expert_collectives(batch),
    )
    reductions = batch.runtime.dp_step_reductions + batch.holds_dtensors
    return (batch.shard_degree > 1) * (reductions + gradients)


def experts_meet_apart(batch: PlanBatch) -> np.ndarray | bool:
    """Rows whose experts' gradients are reduced apart from the dense ones over an edp group of more than one rank
    (`separate_expert_bytes`): ep > 1 and edp = dp x cp / ep > 1. With edp = 1 each expert lives on one rank,
    which meets no peer over it. (N, 1); False for a dense model."""
    if not batch.has_experts:
        return False
    return (batch.ep > 1) & (batch.expert_shard_degree > 1)


def expert_units(batch: PlanBatch) -> np.ndarray | int:
    """FSDP2 units the experts add where they meet apart: each of a block's E/ep local experts is its own
    `fully_shard` / `replicate` unit on the edp mesh (executor/parallel/data.py `_experts_on_edp`; the units
    `sharded_collectives.expert_units_s` costs), whose collectives count as a block's do. (N, pp)."""
    return batch.blocks * local_expert_units(batch)


def ddp_expert_collectives(batch: PlanBatch) -> np.ndarray | int:
    """Collectives the experts add on the DDP path where they meet apart: DDP is told to skip them and
    `ExpertGradReduction` (executor/parallel/expert.py) all-reduces all of a rank's expert gradients, flattened
    into one tensor, once per step over edp: one meeting (the `experts_reduce` of `dp_during_backward_s`); ZeRO-1
    gathers the experts' updated weights over edp apart too (`dp_after_step_s`): one more. (N, 1)."""
    if not batch.has_experts:
        return 0
    return experts_meet_apart(batch) * (1 + (batch.zero_stage == 1))


@dataclass(frozen=True)
class ShardedPasses:
    """How many times a step runs every fully sharded unit's all-gather and its reduce-scatter. (N, 1)."""

    gathers: np.ndarray
    scatters: np.ndarray


# Chunks of a rank that torch's interleaved schedules keep gathered at once (torch/distributed/pipelining/
# schedules.py `_add_unshard_reshard`, max_active_stages=3): it reshards the others, fully, between their uses.
TORCH_ACTIVE_PIPELINE_CHUNKS = 3


def pipelined_gathers(zero3: np.ndarray, microbatches: np.ndarray, virtual_stages: np.ndarray) -> np.ndarray:
    """All-gathers per FSDP2 unit and step inside torch.distributed.pipelining, m micro-batches a step. A backward
    leaves the unit's parameters gathered (`set_reshard_after_backward(False)`), so a forward after a backward
    gathers nothing (FSDP2's `unshard` returns when the group is unsharded). ZeRO-3 reshards after each forward, so
    every backward that follows a forward gathers: m + 1 a step, whatever the device's warm-up (its forwards
    before the first backward gather each, and as many fewer backwards follow a forward); ZeRO-2 gathers once.
    With more chunks a rank than TORCH_ACTIVE_PIPELINE_CHUNKS, the share of them beyond it is taken to regather
    for every forward and backward (2m), an approximation: at 4 chunks a rank and 4 micro-batches it is within 6% of
    the executor's count averaged over the pipeline's ranks (tests/distributed/test_pipeline_fsdp_collectives.py),
    and torch's lowered programs gather less than it as micro-batches grow."""
    kept = np.where(zero3, microbatches + 1, 1)
    evicted = np.maximum(virtual_stages - TORCH_ACTIVE_PIPELINE_CHUNKS, 0) / virtual_stages
    return (1 - evicted) * kept + evicted * 2 * microbatches


def sharded_passes(batch: PlanBatch) -> ShardedPasses:
    """Passes of ZeRO 2/3's collectives per step (Rajbhandari et al. 2020, sec. 5; executor/apply.py
    `_accumulating`): ZeRO-2 gathers once, its parameters staying gathered through the step, and reduce-scatters
    every micro-batch; ZeRO-3 gathers in every micro-batch's forward and again in its backward, and reduce-scatters
    every micro-batch. Where FSDP2 runs inside torch.distributed.pipelining (`PlanBatch.fsdp2_pipelined`) each unit
    reduce-scatters once, after the stage's last backward, and gathers `pipelined_gathers` times."""
    m, zero3, pipelined = batch.microbatches, batch.zero_stage == 3, batch.fsdp2_pipelined
    accumulating = np.where(zero3, 2 * m, 1)
    gathers = np.where(pipelined, pipelined_gathers(zero3, m, batch.virtual_stages), accumulating)
    return ShardedPasses(gathers=gathers, scatters=np.where(pipelined, 1, m))


def ddp_buckets(batch: PlanBatch) -> np.ndarray:
    """How many buckets DDP reduces a device's gradients in: the first of Runtime.ddp_first_bucket_bytes, the rest
    of Runtime.ddp_bucket_bytes (torch.nn.parallel.DistributedDataParallel), at the regime's gradient bytes. With
    ep > 1 DDP holds no experts: the executor tells it to ignore them (executor/parallel/data.py
    `_set_params_and_buffers_to_ignore_for_model`), and they are reduced apart (`ddp_expert_collectives`). (N, pp)."""
    runtime = batch.runtime
    params = batch.device_params()
    if batch.has_experts:
        params = params - np.where(batch.ep > 1, batch.device_expert_params(), 0.0)
    gradient_bytes = params * runtime.partial_gradient_bytes
    return 1 + np.ceil(np.maximum(gradient_bytes - runtime.ddp_first_bucket_bytes, 0) / runtime.ddp_bucket_bytes)


def dp_comm_s(batch: PlanBatch) -> np.ndarray:
    """Data-parallel traffic of each device per step (ZeRO sec. 7: all-reduce = reduce-scatter + all-gather).

    ZeRO 0: all-reduce of the gradients; 1: the same all-reduce (DDP) and, after the optimizer step, each
    owner's broadcast of its updated share (torch's ZeroRedundancyOptimizer, executor/parallel/data.py), which
    together move an all-gather's bytes; 2 (FSDP, no resharding until the last micro-batch's backward): a
    reduce-scatter per micro-batch + one all-gather; 3 (resharding after forward): per micro-batch, an all-gather
    in forward, another in backward and a reduce-scatter. Full recomputation adds no gather: FSDP2 unshards a unit
    before its backward, recomputed forward included (its pre-forward hook does nothing in backward,
    torch/distributed/fsdp/_fully_shard/_fsdp_state.py `_pre_forward`); DeepSpeed's recomputed forward gathers
    and its backward reuses those parameters (stage3.py `_keep_for_later`), so it counts its forward's and its
    recompute's. Each collective is issued once per unit (`dp_units`) or per tensor (`zero_collectives`): the
    volume is the same, the ring latency is paid per collective."""
    return dp_during_backward_s(batch) + dp_after_step_s(batch)


@dataclass(frozen=True)
class ShardedCollectives:
    """One pass of a fully sharded device's collectives, per block and for its root unit: seconds. (N, 1) per
    block, (N, pp) for the root."""

    block_gather_s: np.ndarray
    block_scatter_s: np.ndarray
    root_gather_s: np.ndarray
    root_scatter_s: np.ndarray

    def gather_s(self, blocks: np.ndarray) -> np.ndarray:
        """All of a device's gathers in one pass. (N, pp)."""
        return blocks * self.block_gather_s + self.root_gather_s

    def scatter_s(self, blocks: np.ndarray) -> np.ndarray:
        """All of a device's reduce-scatters in one pass. (N, pp)."""
        return blocks * self.block_scatter_s + self.root_scatter_s


def sharded_collectives(batch: PlanBatch) -> ShardedCollectives:
    """Each unit's all-gather of its parameters, at the unsharded copy's bytes (FSDP2's `param_dtype`), and
    reduce-scatter of its gradients, at the regime's reduction bytes (`reduce_dtype`), issued as one collective
    or, for ZeRO-3 where the regime does so, one per tensor (Runtime.zero3_collective_per_tensor), each at the
    bus bandwidth ZeRO-3's collectives reach there (Runtime.zero3_bandwidth_efficiency)."""
    runtime, precision, n = batch.runtime, batch.training.precision, batch.shard_degree
    zero3 = batch.zero_stage == 3
    experts = np.where(batch.ep > 1, batch.expert_params_per_block, 0.0)  # costed apart: `expert_units_s`
    block_params = batch.block_params_per_gpu - experts
    root_params = batch.device_params() - batch.blocks * batch.block_params_per_gpu
    per_tensor = zero3 & runtime.zero3_collective_per_tensor
    block_pieces = np.where(per_tensor, params.block_tensors(batch.model), 1)
    root_pieces = np.where(per_tensor, root_tensors(batch), 1)
    # A share e of the bus bandwidth moves S bytes in the time the whole of it moves S / e.
    efficiency = np.where(zero3, runtime.zero3_bandwidth_efficiency, 1.0)

    def pieces_s(collective, elements, pieces, bytes_per_element, channel: comm.Channel) -> np.ndarray:
        return pieces * collective(elements * bytes_per_element / pieces / efficiency, n, channel)

    def expert_units_s(collective, bytes_per_element) -> np.ndarray:
        """With ep > 1 each of a rank's E/ep experts is its own unit over the edp ranks holding it (Megatron-Core's
        expert data-parallel group; executor/parallel/data.py wraps each on the edp mesh)."""
        units = batch.model.num_experts // batch.ep
        # Rows without experts (ep 1, or an edp group of one rank with no link) would divide by zero; np.where
        # drops what they compute.
        with np.errstate(divide="ignore", invalid="ignore"):
            unit_bytes = experts * bytes_per_element / units / efficiency
            timed = units * collective(unit_bytes, batch.expert_shard_degree, batch.edp_channel)
        return np.where(experts > 0, timed, 0.0)

    gather_bytes, scatter_bytes = runtime.unsharded_bytes(precision), runtime.data_parallel_bytes(precision)
    gather, scatter = batch.dp_channel.fsdp_gather, batch.dp_channel.fsdp_scatter
    return ShardedCollectives(
        block_gather_s=pieces_s(comm.all_gather_s, block_params, block_pieces, gather_bytes, gather)
        + expert_units_s(comm.all_gather_s, gather_bytes),
        block_scatter_s=pieces_s(comm.reduce_scatter_s, block_params, block_pieces, scatter_bytes, scatter)
        + expert_units_s(comm.reduce_scatter_s, scatter_bytes),
        root_gather_s=pieces_s(comm.all_gather_s, root_params, root_pieces, gather_bytes, gather),
        root_scatter_s=pieces_s(comm.reduce_scatter_s, root_params, root_pieces, scatter_bytes, scatter),
    )


def root_tensors(batch: PlanBatch) -> np.ndarray:
    """Parameter tensors outside the blocks on each device: the embedding's on the first, the head's on the last
    (and the tied word-embedding copy there, `PlanBatch.tied_copy`). (1, pp)."""
    has_embedding, has_head = edge_masks(batch.pp)
    head = params.head_tensors(batch.model) + int(batch.tied_copy)
    return np.maximum(has_embedding * params.embedding_tensors(batch.model) + has_head * head, 1)


def zero_collectives(batch: PlanBatch) -> np.ndarray:
    """Collectives of one kind (a gather, say) in one pass over a device's parameters: one per unit (`dp_units`), or
    one per parameter tensor under ZeRO-3 where the regime issues them so. (N, pp)."""
    if not batch.runtime.zero3_collective_per_tensor:
        return dp_units(batch)
    tensors = batch.blocks * params.block_tensors(batch.model) + root_tensors(batch)
    return np.where(batch.on_fsdp2 & (batch.zero_stage == 3), tensors, dp_units(batch))


def dp_during_backward_s(batch: PlanBatch) -> np.ndarray:
    """The part of `dp_comm_s` issued while forward and backward run, which can overlap with them."""
    n, zero, channels = batch.shard_degree, batch.zero_stage, batch.dp_channel
    units = dp_units(batch)
    experts = separate_expert_bytes(batch)
    unit_bytes = (batch.device_params() * batch.runtime.data_parallel_bytes(batch.training.precision) - experts) / units
    experts_reduce = expert_collective_s(comm.all_reduce_s, experts, batch)
    sharded, passes = sharded_collectives(batch), sharded_passes(batch)
    gather, scatter = sharded.gather_s(batch.blocks), sharded.scatter_s(batch.blocks)
    return np.where(
        zero <= 1,
        units * comm.all_reduce_s(unit_bytes, n, channels.bare) + experts_reduce,
        passes.gathers * gather + passes.scatters * scatter,
    )


def separate_expert_bytes(batch: PlanBatch) -> np.ndarray:
    """The bytes of a device's expert gradients (or weights) that a DDP-style reduction moves over the edp group on
    their own, apart from the dense ones over dp x cp: with ep > 1 each expert's replicas are only the edp ranks
    (Megatron-Core's expert data-parallel group; the executor's `ExpertGradReduction`,
    executor/parallel/expert.py). With ep = 1 the experts go with the rest. (N, pp)."""
    experts = batch.device_expert_params() * batch.runtime.data_parallel_bytes(batch.training.precision)
    return np.where(batch.ep > 1, experts, 0.0)


def expert_collective_s(collective, expert_bytes: np.ndarray, batch: PlanBatch) -> np.ndarray:
    """`collective` of the experts' `expert_bytes` over the edp group's ring; nothing where there are none. (N, pp)."""
    timed = collective(expert_bytes, batch.expert_shard_degree, batch.edp_channel)
    return np.where(expert_bytes > 0, timed, 0.0)


def dp_after_step_s(batch: PlanBatch) -> np.ndarray:
    """ZeRO-1's gather of the updated weights (one broadcast per owner, same bytes as an all-gather): it runs
    after the optimizer step, so nothing overlaps with it. The experts' weights are gathered over edp."""
    experts = separate_expert_bytes(batch)
    weight_bytes = batch.device_params() * batch.runtime.data_parallel_bytes(batch.training.precision) - experts
    gather = comm.all_gather_s(weight_bytes, batch.shard_degree, batch.dp_channel.bare)
    gather = gather + expert_collective_s(comm.all_gather_s, experts, batch)
    return np.where(batch.zero_stage == 1, gather, 0.0)


def dp_units(batch: PlanBatch) -> np.ndarray:
    """How many pieces a device's data-parallel collectives come in: FSDP2 (ZeRO 2/3, and `replicate` for
    ZeRO 0 under TP or PP) wraps every block and then the root, one collective each (Zhao et al. 2023, sec. 3.2;
    executor/parallel/data.py); DDP and ZeRO-1 reduce the whole gradient in one bucketed pass. (N, pp)."""
    return np.where(batch.on_fsdp2, batch.blocks + 1, 1)


def fsdp_hooks_s(batch: PlanBatch) -> np.ndarray:
    """Host time FSDP2's hooks add to each device per micro-batch: every block unit's forward and backward hooks
    (Runtime.fsdp_unit_host_s), with those of the block's local experts where each is a unit of its own
    (`local_expert_units`), beyond the host slack of the block's passes, where they hide behind the device
    (LayerCost.forward_slack_s); and the root unit's in full (its hooks run before the embedding and after the
    head). The host runs the hooks between the passes' launches, so on a host-bound pass each costs its whole time,
    on a device-bound one nothing. (N, pp); 0 off FSDP2, with one data-parallel rank, and where the profile timed
    FSDP2's collectives as training issues them (their fits hold the hooks' work: planner/cost/comm.py
    `fsdp_channel`)."""
    forward, backward = batch.runtime.fsdp_unit_host_s
    if forward == backward == 0 or (batch.measured is not None and batch.measured.times_fsdp_units):
        return np.zeros((1, batch.pp))
    units = 1 + local_expert_units(batch)  # a block's own unit and its experts' (`expert_units`)
    block = batch.block
    per_block = np.maximum(units * forward - block.forward_slack_s, 0.0) + np.maximum(
        units * backward - block.backward_slack_s, 0.0
    )
    return np.where(batch.on_fsdp2, batch.blocks * per_block + forward + backward, 0.0)


def local_expert_units(batch: PlanBatch) -> np.ndarray | int:
    """The FSDP2 units of one block's experts on a device (`expert_units` over the blocks): its E/ep local experts
    where they meet their edp peers apart, else none. (N, 1)."""
    if not batch.has_experts:
        return 0
    return np.where(experts_meet_apart(batch), batch.model.num_experts // batch.ep, 0)


def sharded_exposed_s(batch: PlanBatch) -> np.ndarray:
    """The least of ZeRO 2/3's collectives that shows with one unit prefetched ahead (FSDP2, Zhao et al. 2023
    sec. 3.3-4), unit by unit: in forward a block's gather hides behind the previous unit's forward, so
    max(0, gather - forward) shows; in backward its gather (ZeRO-3) and the reduce-scatter beside it hide behind a
    block's recompute and backward, so max(0, gather + scatter - recompute - backward) shows. The root's gather
    comes before any compute and its reduce-scatter after all of it: both show. ZeRO-2 gathers in the first
    micro-batch only. Inside torch.distributed.pipelining: `pipelined_sharded_exposed_s`. (N, pp)."""
    sharded, blocks, m = sharded_collectives(batch), batch.blocks, batch.microbatches
    forward, backward = batch.block.forward_s, batch.block.recompute_s + batch.block.backward_s
    gather, scatter = sharded.block_gather_s, sharded.block_scatter_s
    forward_shows = blocks * np.maximum(gather - forward, 0) + sharded.root_gather_s
    zero3_backward = blocks * np.maximum(gather + scatter - backward, 0) + sharded.root_gather_s
    zero2_backward = blocks * np.maximum(scatter - backward, 0)
    backward_shows = np.where(batch.zero_stage == 3, zero3_backward, zero2_backward) + sharded.root_scatter_s
    accumulating = np.where(
        batch.zero_stage == 3, m * (forward_shows + backward_shows), forward_shows + m * backward_shows
    )
    pipelined = batch.fsdp2_pipelined
    if not pipelined.any():  # no pipeline, or a stack with its own: the search's common case, spared the work
        return accumulating
    return np.where(pipelined, pipelined_sharded_exposed_s(batch, sharded), accumulating)


def pipelined_sharded_exposed_s(batch: PlanBatch, sharded: ShardedCollectives) -> np.ndarray:
    """ZeRO 2/3 inside torch.distributed.pipelining (`sharded_passes`): each unit's one reduce-scatter comes after
    the stage's last backward, all at once, and the step waits for them (`_root_post_backward_final_callback`):
    all of it shows. The gathers hide unit by unit as they do elsewhere (`sharded_exposed_s`): the step's first
    behind the forward, ZeRO-3's further ones, which come before backwards, behind a block's recompute and
    backward. (N, pp)."""
    blocks, gather = batch.blocks, sharded.block_gather_s
    forward, backward = batch.block.forward_s, batch.block.recompute_s + batch.block.backward_s
    first_gather = blocks * np.maximum(gather - forward, 0) + sharded.root_gather_s
    later_gather = blocks * np.maximum(gather - backward, 0) + sharded.root_gather_s
    later_gathers = sharded_passes(batch).gathers - 1
    return first_gather + later_gathers * later_gather + sharded.scatter_s(blocks)


def dp_comm_exposed_s(batch: PlanBatch) -> np.ndarray:
    """Gradient reduction runs in buckets while backward goes on (PyTorch DDP, Li et al. 2020, sec. 3.2.3): ZeRO 0/1
    reduce during the last micro-batch's backward, and the last bucket (one layer's share) can never overlap, nor
    can ZeRO-1's gather after the optimizer step. ZeRO 2/3 communicate every micro-batch, unit by unit, and hide
    what their prefetching lets them (`sharded_exposed_s`); a regime that synchronizes around ZeRO-3's gathers
    (Runtime.zero3_prefetch_overlap) hides none of them. Without overlap (Megatron-LM before 2023), or where the
    stack reduces only after backward or after the pipeline's flush (DeepSpeed: Runtime.reduction_overlaps), all of
    it is exposed."""
    hideable = dp_during_backward_s(batch)
    last_backward = batch.per_device("backward_s") + batch.per_device("recompute_s")
    bucketed_shows = np.maximum(hideable - last_backward, hideable / batch.layers_on_device())
    # `replicate` inside torch.distributed.pipelining all-reduces every unit after the stage's last backward.
    replicated_shows = np.where(batch.fsdp2_pipelined, hideable, bucketed_shows)
    least_shown = np.where(batch.zero_stage <= 1, replicated_shows, sharded_exposed_s(batch))
    # How much of what could be hidden a run does hide: calibrated, else measured by the profile, else the share the
    # compute beside a GPU collective does not lose to it (`hidden_share`).
    hidden = hidden_share(batch.measured, batch.runtime) * (hideable - least_shown)
    synchronized = (batch.zero_stage == 3) & ~batch.runtime.zero3_prefetch_overlap
    in_backward = batch.runtime.reduction_overlaps(batch.zero_stage, batch.pp, batch.training.precision)
    can_hide = batch.overlap_grad_reduce & in_backward & (hideable > 0) & ~blocking_fsdp2(batch) & ~synchronized
    exposed = np.where(can_hide, hideable - hidden, hideable)
    return exposed + dp_after_step_s(batch)


def blocking_fsdp2(batch: PlanBatch) -> np.ndarray:
    """Rows whose FSDP2 collectives block the rank. FSDP2 overlaps its all-gathers and reduce-scatters with compute
    by issuing them on their own CUDA streams, as synchronous calls (torch/distributed/fsdp/_fully_shard/
    _fsdp_collectives.py `foreach_reduce`: the reduce-scatter without `async_op`; Zhao et al. 2023 sec. 4 on the
    streams); on a CPU, where streams are no-ops, a synchronous gloo collective holds the rank until it is done,
    so none of it hides (Runtime.blocking_fsdp_collectives). DDP's bucket all-reduces are asynchronous
    everywhere. (N, 1)."""
    return batch.on_fsdp2 & batch.runtime.blocking_fsdp_collectives
