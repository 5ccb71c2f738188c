"""CPU offload: what moves to host memory, what crosses PCIe each step, and how long the CPU steps.

ZeRO-Offload (Ren et al. 2021, "ZeRO-Offload: Democratizing Billion-Scale Model Training", sec. 4.1-4.2) keeps
forward and backward on the GPU and moves the optimizer's states, its step and the gradients to the CPU: each
step the gradients go device -> host (overlapped with backward), the CPU runs the optimizer, and the updated
16-bit weights come back host -> device, on the critical path (unless the one-step delayed parameter update is
used, which this model does not). ZeRO-Infinity (Rajbhandari et al. 2021, sec. 5-6) also keeps the ZeRO-3 weight
shards on the host: there is no weight copy after the step, and every forward and backward fetches each unit's
shard before its all-gather, prefetched while the previous unit computes. DeepSpeed runs both
(`offload_optimizer`, `offload_param`); FSDP2's CPUOffloadPolicy is the second (executor/apply.py).

Per-device values are (N, pp) (planner/cost/batch.py). On a "cpu" device (the gloo placeholder) host and device
memory are the same RAM: offload moves nothing and costs nothing.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from planner.specs import ClusterSpec

if TYPE_CHECKING:
    from planner.cost.batch import PlanBatch

# The CPU optimizer steps the fp32 master weights with fp32 gradients (ZeRO-Offload sec. 4.1: the gradients are
# converted to fp32 on the CPU), so the host holds each offloaded gradient in 4 bytes whatever the training precision.
HOST_GRADIENT_BYTES = 4


def offloads_optimizer(batch: PlanBatch) -> np.ndarray:
    """Rows whose optimizer (states, step, gradient shards) lives on the host: (N, 1) bools."""
    return (batch.offload != "none") & (batch.cluster.gpu.kind != "cpu")


def any_offload(batch: PlanBatch) -> bool:
    """Whether any row offloads: the offload terms of a batch that does not are zeros, costed for free."""
    return bool(offloads_optimizer(batch).any())


def offloads_params(batch: PlanBatch) -> np.ndarray:
    """Rows whose ZeRO-3 weight shards also live on the host: (N, 1) bools."""
    return (batch.offload == "optimizer_and_params") & (batch.cluster.gpu.kind != "cpu")


def stepped_params(batch: PlanBatch) -> np.ndarray:
    """Parameters whose optimizer state each GPU owns (its ZeRO shard, ZeRO sec. 5.1): (N, pp)."""
    return batch.params_per_shard(batch.zero_stage >= 1)


def gpus_sharing_a_host(cluster: ClusterSpec) -> int:
    """GPUs of one node, whose offloads share its RAM and CPUs (fewer when the plan uses fewer GPUs)."""
    return min(cluster.gpus_per_node, cluster.num_gpus)


def host_bytes_per_node(host_bytes_per_gpu: np.ndarray, batch: PlanBatch) -> np.ndarray:
    """Host bytes a node needs: its GPUs' offloads (memory.py `host_memory`, (N, pp)), each counted at the largest
    stage's (an upper bound where a node holds GPUs of several pipeline stages). (N,)."""
    return host_bytes_per_gpu.max(axis=1) * gpus_sharing_a_host(batch.cluster)


# ------------------------------------------------------------------------------------------- traffic


def gradient_offload_bytes(batch: PlanBatch) -> np.ndarray:
    """Device -> host bytes per step: each GPU's reduced gradient shard, in the stack's gradient bytes (16-bit in
    mixed precision: ZeRO-Offload moves fp16 gradients, sec. 4.1). (N, pp)."""
    grad_bytes = batch.runtime.gradient_bytes(batch.training.precision)
    return np.where(offloads_optimizer(batch), stepped_params(batch) * grad_bytes, 0.0)


def weight_upload_bytes(batch: PlanBatch) -> np.ndarray:
    """Host -> device bytes per step. Optimizer offload: the updated weights of the GPU's shard once, after the
    step (ZeRO-Offload sec. 4.1). Weight offload: no copy after the step (the host copy is the weights), but each
    micro-batch's forward and backward fetch the GPU's weight shard (ZeRO-Infinity sec. 6), 2 m times. (N, pp)."""
    weight_bytes = batch.runtime.weight_bytes(batch.training.precision)
    after_step = stepped_params(batch) * weight_bytes
    per_pass = batch.params_per_shard(np.full_like(batch.zero_stage, True, dtype=bool)) * weight_bytes
    fetched = 2 * batch.microbatches * per_pass
    only_optimizer = offloads_optimizer(batch) & ~offloads_params(batch)
    return np.where(offloads_params(batch), fetched, np.where(only_optimizer, after_step, 0.0))


def pcie_s(bytes_moved: np.ndarray, batch: PlanBatch) -> np.ndarray:
    """Seconds to move `bytes_moved` over one GPU's host link (ClusterSpec.host_link_Bps); 0 where none moves."""
    rate = batch.cluster.host_link_Bps
    if rate is None:  # planner/rules.py refuses an offloading plan without a known host link
        return np.zeros_like(bytes_moved)
    return bytes_moved / rate


# ------------------------------------------------------------------------------------------ time


def offload_exposed_s(batch: PlanBatch) -> np.ndarray:
    """Offload's PCIe time on the critical path, per device (N, pp): the gradient copy beyond what the last
    micro-batch's backward hides (ZeRO-Offload sec. 4.2 overlaps it with backward); the weights' trip back, on the
    critical path after the step; with weight offload, each pass's fetch beyond the compute it is prefetched behind
    (ZeRO-Infinity sec. 6). The CPU step itself is the optimizer term (optimizer.py `cpu_optimizer_step_s`)."""
    if not any_offload(batch):
        return np.zeros_like(batch.device_params())
    backward_s = batch.per_device("backward_s")
    gradients_s = np.maximum(pcie_s(gradient_offload_bytes(batch), batch) - backward_s, 0.0)
    upload_s = pcie_s(weight_upload_bytes(batch), batch)
    work_s = batch.microbatches * batch.per_device("work_s")
    uploads_exposed = np.where(offloads_params(batch), np.maximum(upload_s - work_s, 0.0), upload_s)
    return gradients_s + uploads_exposed
