"""Data parallelism's communication and its overlap with compute: gradient reduction, ZeRO's gathers and
reduce-scatters, per data-parallel wrapper (DDP, FSDP2 `fully_shard` / `replicate`, ZeroRedundancyOptimizer), as
the regime says the stack wraps each ZeRO stage and layout (planner/cost/runtime.py). Per-row values are (N, 1),
per-device ones (N, pp) (planner/cost/batch.py)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from planner.cost import comm
from planner.cost.measured import calibrated_overlap

if TYPE_CHECKING:
    from planner.cost.batch import PlanBatch


def dp_meetings(batch: PlanBatch) -> np.ndarray:
    """Meetings of data-parallel peers per step, each a collective every rank of the group must reach: the regime's
    reductions (Runtime.dp_step_reductions: the executor's loss mean over dp), the gradient norm's reduction when
    the parameters are DTensor shards (executor/apply.py), and the gradient collectives: DDP's buckets, after
    which ZeRO-1's owners broadcast their shares (asynchronously, waited for together: one meeting); FSDP2 one
    collective per unit as `dp_comm_s` counts them (ZeRO-2: a gather per unit, a reduce-scatter per unit and
    micro-batch; ZeRO-3: two gathers and a reduce-scatter per unit and micro-batch; `replicate`: an all-reduce per
    unit). (N, pp); 0 with one data-parallel rank."""
    zero, m, units, fsdp2 = batch.zero_stage, batch.microbatches, dp_units(batch), batch.on_fsdp2
    gradients = np.select(
        [fsdp2 & (zero == 2), fsdp2 & (zero == 3), fsdp2],
        [units * (m + 1), 3 * m * units, units],
        ddp_buckets(batch) + (zero == 1),
    )
    reductions = batch.runtime.dp_step_reductions + batch.holds_dtensors
    return (batch.shard_degree > 1) * (reductions + gradients)


def ddp_buckets(batch: PlanBatch) -> np.ndarray:
    """How many buckets DDP reduces a device's gradients in: the first of Runtime.ddp_first_bucket_bytes, the rest
    of Runtime.ddp_bucket_bytes (torch.nn.parallel.DistributedDataParallel), at the regime's gradient bytes. (N, pp)."""
    runtime = batch.runtime
    gradient_bytes = batch.device_params() * runtime.partial_gradient_bytes
    return 1 + np.ceil(np.maximum(gradient_bytes - runtime.ddp_first_bucket_bytes, 0) / runtime.ddp_bucket_bytes)


def dp_comm_s(batch: PlanBatch) -> np.ndarray:
    """Data-parallel traffic of each device per step (ZeRO sec. 7: all-reduce = reduce-scatter + all-gather).

    ZeRO 0: all-reduce of the gradients; 1: the same all-reduce (DDP) and, after the optimizer step, each
    owner's broadcast of its updated share (torch's ZeroRedundancyOptimizer, executor/parallel/data.py), which
    together move an all-gather's bytes; 2 (FSDP, no resharding until the last micro-batch's backward): a
    reduce-scatter per micro-batch + one all-gather; 3 (FSDP, resharding): per micro-batch, all-gathers in
    forward and backward and a reduce-scatter. Each collective is issued once per communication unit
    (`dp_units`): the volume is the same, the per-operation latency is paid per unit."""
    return dp_during_backward_s(batch) + dp_after_step_s(batch)


def dp_during_backward_s(batch: PlanBatch) -> np.ndarray:
    """The part of `dp_comm_s` issued while forward and backward run, which can overlap with them."""
    n, zero, m, channels = batch.shard_degree, batch.zero_stage, batch.microbatches, batch.dp_channel
    units = dp_units(batch)
    # Weights and gradients have the same size in bytes (both 16-bit in mixed precision, ZeRO sec. 3.1).
    unit_bytes = batch.device_params() * batch.runtime.data_parallel_bytes(batch.training.precision) / units
    # ZeRO 2/3 run on FSDP2: its per-unit collectives as measured, framework work included, where profiled.
    gather = units * comm.all_gather_s(unit_bytes, n, channels.fsdp_gather)
    scatter = units * comm.reduce_scatter_s(unit_bytes, n, channels.fsdp_scatter)
    return np.select(
        [zero <= 1, zero == 2],
        [units * comm.all_reduce_s(unit_bytes, n, channels.bare), m * scatter + gather],
        m * (2 * gather + scatter),
    )


def dp_after_step_s(batch: PlanBatch) -> np.ndarray:
    """ZeRO-1's gather of the updated weights (one broadcast per owner, same bytes as an all-gather): it runs
    after the optimizer step, so nothing overlaps with it."""
    weight_bytes = batch.device_params() * batch.runtime.data_parallel_bytes(batch.training.precision)
    gather = comm.all_gather_s(weight_bytes, batch.shard_degree, batch.dp_channel.bare)
    return np.where(batch.zero_stage == 1, gather, 0.0)


def dp_units(batch: PlanBatch) -> np.ndarray:
    """How many pieces a device's data-parallel collectives come in: FSDP2 (ZeRO 2/3, and `replicate` for
    ZeRO 0 under TP or PP) wraps every block and then the root, one collective each (Zhao et al. 2023, sec. 3.2;
    executor/parallel/data.py); DDP and ZeRO-1 reduce the whole gradient in one bucketed pass. (N, pp)."""
    return np.where(batch.on_fsdp2, batch.blocks + 1, 1)


def dp_comm_exposed_s(batch: PlanBatch) -> np.ndarray:
    """Gradient reduction runs in buckets while backward goes on (PyTorch DDP, Li et al. 2020, sec. 3.2.3;
    FSDP prefetching, Zhao et al. 2023). ZeRO 0/1 reduce during the last micro-batch's backward; ZeRO 2/3
    communicate every micro-batch and overlap with all of the step's compute. The last bucket (one layer's
    share) can never overlap, nor can ZeRO-1's gather after the optimizer step. Without overlap (Megatron-LM
    before 2023) all of it is exposed."""
    hideable = dp_during_backward_s(batch)
    last_backward = batch.per_device("backward_s") + batch.per_device("recompute_s")
    every_microbatch = batch.microbatches * (batch.per_device("forward_s") + batch.per_device("backward_s"))
    window = np.where(batch.zero_stage <= 1, last_backward, every_microbatch)
    overlapped = np.maximum(hideable - window, hideable / batch.layers_on_device())
    # How much of what could be hidden a run does hide: calibrated, else measured by the profile (`calibrated_overlap`).
    hidden = calibrated_overlap(batch.measured) * (hideable - overlapped)
    can_hide = batch.overlap_grad_reduce & (hideable > 0) & ~blocking_fsdp2(batch)
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
