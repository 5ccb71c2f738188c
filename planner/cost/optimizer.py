"""The optimizer step: memory-bound passes over the parameters, or a profile's measured time per parameter.
Per-device values are (N, pp) (planner/cost/batch.py)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from planner.cost.layers import busy_ranks_per_node
from planner.cost.measured import ProfileCosts
from planner.cost.offload import any_offload, gpus_sharing_a_host, offloads_optimizer, stepped_params
from planner.cost.params import model_params
from planner.specs import ClusterSpec, ModelSpec

if TYPE_CHECKING:
    from planner.cost.batch import PlanBatch


def optimizer_traffic_bytes_per_param(precision: str, optimizer: str) -> int:
    """HBM bytes one optimizer step moves per parameter, pass by pass, for mixed-precision training with fp32
    master weights and (fp16 only) loss scaling (Micikevicius et al. 2018), as Megatron-LM's optimizer runs it:
    copy 16-bit grads into fp32 (read 2, write 4); fp16: unscale and check for inf (read 4, write 4); gradient
    norm for clipping (read 4); the update (read grad 4; read + write weight 8 and each optimizer state 8);
    copy fp32 weights back to 16-bit (read 4, write 2); zero the 16-bit grads (write 2). In fp32 training
    there are no copies: norm, update and zeroing only."""
    states = 2 if optimizer == "adamw" else 0  # AdamW: momentum and variance; SGD (no momentum): none
    update = 4 + 8 + 8 * states
    if precision == "fp32":
        return 4 + update + 4
    unscale = 8 if precision == "fp16" else 0
    return 6 + unscale + 4 + update + 6 + 2


# DeepSpeed's CPU-Adam steps 10B parameters in 2.57 s (Ren et al. 2021, "ZeRO-Offload", Table 2, CPU-Adam column;
# 1B: 0.22 s) on the host of a DGX-2 (2 x 24-core Xeon Platinum 8168). Taken as what one node's CPUs do for all its
# GPUs together: their processes share the host's cores and memory bandwidth. Seconds per parameter. (The table
# was quoted from memory, not re-read; the roofline agrees: Adam on the host moves 30 bytes per parameter
# (fp32 gradient, weight, momentum and variance read, the last three written back, a 16-bit copy out), and 10B of
# them in 2.57 s is 117 GB/s, 46% of the host's 2 sockets x 6 channels of DDR4-2666, 256 GB/s.)
CPU_ADAM_S_PER_PARAM = 2.57 / 10e9


def optimizer_step_s(batch: PlanBatch) -> np.ndarray:
    """The step where it runs: on the host for rows that offload the optimizer (`cpu_optimizer_step_s`), on the
    GPU otherwise (`gpu_optimizer_step_s`). (N, pp)."""
    if not any_offload(batch):
        return gpu_optimizer_step_s(batch)
    return np.where(offloads_optimizer(batch), cpu_optimizer_step_s(batch), gpu_optimizer_step_s(batch))


def cpu_optimizer_step_s(batch: PlanBatch) -> np.ndarray:
    """The CPU step of a node: every parameter its GPUs own (their ZeRO shards), at CPU-Adam's rate
    (`CPU_ADAM_S_PER_PARAM`); SGD at that rate scaled by its fp32 memory traffic per parameter against Adam's (both
    memory-bound on the CPU, as `optimizer_traffic_bytes_per_param` counts for the GPU). (N, pp)."""
    node_params = stepped_params(batch) * gpus_sharing_a_host(batch.cluster)
    return node_params * cpu_optimizer_s_per_param(batch.training.optimizer)


def cpu_optimizer_s_per_param(optimizer: str) -> float:
    """Seconds a node's CPUs spend per parameter on `optimizer`'s step (`cpu_optimizer_step_s`)."""
    relative = optimizer_traffic_bytes_per_param("fp32", optimizer) / optimizer_traffic_bytes_per_param("fp32", "adamw")
    return CPU_ADAM_S_PER_PARAM * relative


def cpu_optimizer_floor_s(model: ModelSpec, optimizer: str, cluster: ClusterSpec) -> float:
    """A lower bound on `cpu_optimizer_step_s` for any plan of `model` on `cluster`: the GPUs' shards cover every
    parameter at least once, so the GPU that owns the most owns at least model_params / GPUs (the search's bound,
    planner/search/evaluate.py)."""
    owned_at_least = model_params(model) / cluster.num_gpus
    return owned_at_least * gpus_sharing_a_host(cluster) * cpu_optimizer_s_per_param(optimizer)


def gpu_optimizer_step_s(batch: PlanBatch) -> np.ndarray:
    """The optimizer is memory-bound (roofline, Williams et al. 2009): bytes touched / achievable HBM
    bandwidth, on this rank's shard only under ZeRO >= 1 (Rajbhandari et al. 2020, sec. 5.1). (N, pp).
    With a profile that timed this optimizer: its measured seconds per parameter instead, as timed on DTensor
    shards for plans whose parameters are DTensors (PlanBatch.holds_dtensors; profiler/compute.py
    `measure_optimizer`)."""
    training, gpu = batch.training, batch.cluster.gpu
    params = stepped_params(batch)
    plain_s = measured_optimizer_s_per_param(batch.cluster, batch.measured, training.optimizer)
    if plain_s is not None:
        sharded_s = measured_optimizer_s_per_param(batch.cluster, batch.measured, training.optimizer, sharded=True)
        return params * np.where(batch.holds_dtensors, sharded_s, plain_s)
    traffic = optimizer_traffic_bytes_per_param(training.precision, training.optimizer)
    return params * traffic / (gpu.hbm_GBps * 1e9 * gpu.memory_efficiency)


def measured_optimizer_s_per_param(
    cluster: ClusterSpec, measured: ProfileCosts | None, optimizer: str, sharded: bool = False
) -> float | None:
    """The profile's optimizer seconds per parameter with every rank of a node stepping at once, on DTensor shards
    if `sharded` (where the profile timed them so), if measured."""
    if measured is None:
        return None
    return measured.optimizer_s_per_param(optimizer, busy_ranks_per_node(cluster), sharded)
