"""Memory per GPU: model states (ZeRO accounting), activations in flight per pipeline schedule, overhead.

Model states follow Rajbhandari et al. 2020 (ZeRO, sec. 3.1 and 5): mixed-precision Adam keeps 2 bytes of
16-bit weights, 2 bytes of 16-bit gradients and K = 12 bytes of fp32 master weights, momentum and variance
per parameter; ZeRO stage 1 / 2 / 3 partitions the optimizer states / + gradients / + weights over the N_d
data-parallel ranks. Activations per micro-batch come from planner/cost/ops.py; how many micro-batches each
stage holds at once comes from the schedule (Narayanan et al. 2021, sec. 2.2; Korthikanti et al. 2022,
sec. 4.2.3).

Measured on CUDA by paraplan's profiler, memory is that of the stack the profiler and the executor run
(planner/cost/runtime.py `EXECUTOR_MEMORY`, read by `device_memory` below): the parameters stay fp32, and in mixed
precision torch.autocast casts them to 16 bits per use (PyTorch's automatic mixed precision), so weights and
gradients take 4 bytes each and the optimizer keeps only its own state (the fp32 weights are the master copy):
16 bytes per parameter for Adam as in ZeRO's accounting, but sharded differently.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from planner.cost.offload import (
    HOST_GRADIENT_BYTES,
    any_offload,
    offloads_optimizer,
    offloads_params,
    stepped_params,
)
from planner.cost.pipeline import edge_masks
from planner.units import GiB, MiB

if TYPE_CHECKING:
    from planner.cost.batch import PlanBatch


# (weight bytes, gradient bytes) per parameter by training precision (ZeRO sec. 3.1: fp16 weights and grads).
_WEIGHT_GRAD_BYTES = {"bf16": (2, 2), "fp16": (2, 2), "fp32": (4, 4)}
# Optimizer-state bytes per parameter beyond a master copy. AdamW: momentum + variance in fp32 (Loshchilov &
# Hutter 2019). SGD: torch.optim.SGD's default (no momentum) keeps no state.
OPTIMIZER_STATE_BYTES = {"adamw": 8, "sgd": 0}
# Mixed precision keeps an fp32 master copy of the weights in the optimizer: K = states + 4 (ZeRO sec. 3.1).
MASTER_WEIGHT_BYTES = 4


@dataclass(frozen=True)
class ModelStateBytes:
    weights: Any  # float or numpy array, like the inputs
    grads: Any
    optimizer: Any

    @property
    def total(self) -> float:
        return self.weights + self.grads + self.optimizer


def model_state_bytes(params, precision: str, optimizer: str, zero_stage, shard_degree) -> ModelStateBytes:
    """ZeRO's accounting of mixed-precision training (sec. 3.1): (2 + 2 + K) * Psi, K the optimizer's states plus
    an fp32 master copy; (4 + 4 + K) * Psi in fp32, K the states alone. Reproduces the paper's 7.5B / N_d = 64
    example (fig. 1). Other stacks' bytes: `sharded_state_bytes` with a regime's (planner/cost/runtime.py)."""
    weight_bytes, grad_bytes = _WEIGHT_GRAD_BYTES[precision]
    master = MASTER_WEIGHT_BYTES if precision != "fp32" else 0
    opt_bytes = OPTIMIZER_STATE_BYTES[optimizer] + master
    return sharded_state_bytes(params, weight_bytes, grad_bytes, opt_bytes, zero_stage, shard_degree)


def sharded_state_bytes(
    params, weight_bytes: int, grad_bytes: int, optimizer_bytes: int, zero_stage, shard_degree
) -> ModelStateBytes:
    """ZeRO sec. 5.1-5.3: stage s divides the first s of (optimizer, gradients, weights) by N_d. Bytes are per
    parameter. Broadcasts over numpy arrays of params, stages and degrees."""
    return ModelStateBytes(
        weights=params * weight_bytes / np.where(zero_stage >= 3, shard_degree, 1),
        grads=params * grad_bytes / np.where(zero_stage >= 2, shard_degree, 1),
        optimizer=params * optimizer_bytes / np.where(zero_stage >= 1, shard_degree, 1),
    )


def optimizer_step_extra_bytes(params, optimizer: str):
    """Bytes torch.optim allocates for the step itself, beyond its state, over `params` parameters: AdamW's
    default on CUDA, the foreach implementation, takes sqrt(v) of every tensor at once into a new list
    (torch/optim/adam.py `_multi_tensor_adam`: `exp_avg_sq_sqrt = torch._foreach_sqrt(device_exp_avg_sqs)`), 4
    bytes per parameter; SGD's step updates in place. Measured on an H200 with Llama-3.2-1B: the step peaked at
    20.0 bytes per parameter, 16 of state and weights plus these 4
    (benchmarks/results/2026-12-04-h200-llama3.2-1b.md)."""
    return params * (4 if optimizer == "adamw" else 0)


def inflight_microbatches(schedule, device, pp, virtual_stages, microbatches):
    """Micro-batches whose activations device `device` holds at its peak, in units of the device's layers.

    GPipe runs all forwards before any backward: m (Huang et al. 2019). 1F1B: device d holds pp - d
    (Narayanan et al. 2021, sec. 2.2.1; Megatron-LM's warm-up count pp - d - 1, plus the one in flight).
    Interleaved 1F1B: device d runs (pp - d - 1) * 2 + (v - 1) * pp warm-up chunk forwards plus one
    (Megatron-LM schedules.py), each holding 1/v of the device's layers; for d = 0 this is
    pp * (1 + (pp - 1) / (pp * v)), Korthikanti et al. sec. 4.2.3. Broadcasts over numpy arrays.
    """
    schedule = np.asarray(schedule)
    chunks = (pp - device - 1) * 2 + (virtual_stages - 1) * pp + 1
    interleaved = np.minimum(chunks, microbatches * virtual_stages) / virtual_stages
    return np.select(
        [schedule == "gpipe", schedule == "1f1b"],
        [microbatches, np.minimum(pp - device, microbatches)],
        interleaved,
    ).astype(float)


def gradients_at_activation_peak(schedule, device, pp: int, microbatches, persistent):
    """Whether device `device` holds its gradients at its activation peak, as the executor trains.

    The executor frees the gradients before every step (`zero_grad(set_to_none=True)`, PyTorch's default) and
    backward allocates each one as it gets there, so they are all held at the activation peak only if the device
    runs a forward after its first backward: gradient accumulation over more than one micro-batch (pp == 1), or
    1F1B with more micro-batches than the device holds in flight (`inflight_microbatches`). A single micro-batch
    and GPipe peak at their first backward with no gradient yet; measured on an H200 (Llama-3.2-1B, 8 x 1024
    tokens in one micro-batch): the peak was 4.5 GiB under a prediction that counted its 1.24B fp32 gradients
    (4.6 GiB; benchmarks/results/2026-12-04-h200-llama3.2-1b.md).
    Interleaved 1F1B counts them held (the chunks' gradients arrive one chunk at a time: an upper bound), and so
    does a `persistent` gradient buffer (DDP's buckets, executor/parallel/data.py `classic_ddp`). Broadcasts."""
    schedule = np.asarray(schedule)
    if pp == 1:
        forward_after_backward = np.asarray(microbatches) > 1
    else:
        one_f_one_b = microbatches > inflight_microbatches("1f1b", device, pp, 1, microbatches)
        forward_after_backward = np.select([schedule == "gpipe", schedule == "1f1b"], [False, one_f_one_b], True)
    return np.asarray(persistent) | forward_after_backward


def layer_inflight(kind: str, schedule, device, pp: int, virtual_stages, microbatches):
    """Micro-batches of one layer's activations alive at the device's peak.

    Without a pipeline, gradient accumulation finishes each micro-batch's backward before the next forward: 1.
    The LM head sits in the last chunk, which runs each backward right after its forward under 1F1B and
    interleaving: 1. The embedding sits in chunk 0, which holds pp micro-batches (the non-interleaved count)."""
    if pp == 1:
        return np.ones_like(np.asarray(microbatches), dtype=float)
    if kind == "head":
        pipelined = np.ones_like(np.asarray(microbatches), dtype=float)
    elif kind == "embedding":
        pipelined = np.minimum(pp, microbatches)
    else:
        pipelined = inflight_microbatches(schedule, device, pp, virtual_stages, microbatches)
    return np.where(np.asarray(schedule) == "gpipe", microbatches, pipelined).astype(float)


# The CUDA context (kernels, cuBLAS / cuDNN handles) lives outside PyTorch's allocator; PyTorch's CUDA notes
# ("Memory management") warn that it is not counted by memory_allocated. ~0.5 GiB is what torch reports on
# A100/H100 with CUDA 12 lazy loading (assumption until a profile measures it).
CUDA_CONTEXT_BYTES = 0.5 * GiB
# NCCL allocates NCCL_BUFFSIZE = 4 MiB per channel and peer for each communicator (NCCL docs, "Environment
# variables"); with the 2 ring peers and up to 16 channels NVLink/IB rings use, ~128 MiB per communicator.
NCCL_BYTES_PER_COMMUNICATOR = 2 * 16 * 4 * MiB
# The caching allocator rounds and splits blocks; ZeRO (sec. 3.2) reports fragmentation large enough to OOM
# with memory free. We reserve 5% of allocated bytes for it (assumption until the executor measures it).
FRAGMENTATION_FRACTION = 0.05


def overhead_bytes(allocated_bytes: float, communicators: int, kind: str) -> float:
    """The memory a GPU needs beyond tensors: context, communicator buffers and allocator fragmentation."""
    fixed = CUDA_CONTEXT_BYTES + communicators * NCCL_BYTES_PER_COMMUNICATOR if kind == "gpu" else 0.0
    return fixed + FRAGMENTATION_FRACTION * allocated_bytes


# ------------------------------------------------------------------------------------ a step's memory per device


def device_memory(batch: PlanBatch) -> dict[str, np.ndarray]:
    """Each device's peak bytes by what holds them (step.MEMORY_TERMS -> (N, pp)). Where the regime models the
    optimizer step's own peak (Runtime.optimizer_step_peak; bytes only the step holds, StateBytes.step_only),
    the peak is the larger of the forward/backward one,
    which may come before any gradient exists (`gradients_held_at_activation_peak`), and the step's, which holds
    no activations but its temporaries (`optimizer_step_extra_bytes`): the terms of the phase that peaks.
    What CPU offload keeps on the host (`host_memory`) is left out: the optimizer's states and its step, the
    gradient shards under ZeRO >= 2 and, offloading the weights, the weight shards (ZeRO-Offload sec. 4.1)."""
    training, runtime, precision = batch.training, batch.runtime, batch.training.precision
    states = batch_state_bytes(batch)
    on_host, weights_on_host = offloads_optimizer(batch), offloads_params(batch)
    sharded_grads = np.where(on_host & (batch.zero_stage >= 2), 0.0, states.grads)
    weights = np.where(weights_on_host, 0.0, states.weights) + zero_working_copies(batch, "weights")
    grads = sharded_grads + zero_working_copies(batch, "grads")
    activations = activation_bytes(batch)
    optimizer = np.broadcast_to(np.where(on_host, 0.0, states.optimizer), weights.shape)
    stepped = np.where(on_host, 0.0, stepped_params(batch))
    extra = stepped * runtime.step_only_bytes(precision)
    if runtime.optimizer_step_peak:
        extra = extra + optimizer_step_extra_bytes(stepped, training.optimizer)
    if runtime.optimizer_step_peak or runtime.step_only_bytes(precision):
        held = np.where(gradients_held_at_activation_peak(batch), grads, 0.0)
        in_step = grads + extra > held + activations
        activations, optimizer = np.where(in_step, 0.0, activations), np.where(in_step, optimizer + extra, optimizer)
        grads = np.where(in_step, grads, held)
    allocated = weights + grads + optimizer + activations
    other = overhead_bytes(allocated, communicators(batch), batch.cluster.gpu.kind)
    return {
        "params_bytes": weights,
        "grads_bytes": grads,
        "optimizer_bytes": optimizer,
        "activations_bytes": activations,
        "other_bytes": other,
    }


def batch_state_bytes(batch: PlanBatch) -> ModelStateBytes:
    """Each device's sharded model states in its regime's bytes (`sharded_state_bytes`'s ZeRO stages; the experts
    over edp ranks, the rest over dp x cp: PlanBatch.params_per_shard): (N, pp) arrays."""
    runtime, precision, zero = batch.runtime, batch.training.precision, batch.zero_stage
    optimizer_bytes = runtime.master_weight_bytes(precision) + OPTIMIZER_STATE_BYTES[batch.training.optimizer]
    return ModelStateBytes(
        weights=batch.params_per_shard(batch.weights_sharded) * runtime.weight_bytes(precision),
        grads=batch.params_per_shard(zero >= 2) * runtime.gradient_bytes(precision)
        + np.where(zero <= 1, batch.device_params() * runtime.retained_16bit_gradient_bytes(precision), 0.0),
        optimizer=batch.params_per_shard(zero >= 1) * optimizer_bytes,
    )


def host_memory(batch: PlanBatch) -> np.ndarray:
    """Host bytes each GPU's offload keeps (ZeRO-Offload sec. 4.1): the optimizer's states with its master copy
    and the fp32 gradients of the GPU's shard (`HOST_GRADIENT_BYTES`); offloading the weights (ZeRO-Infinity), the
    ZeRO-3 weight shard in the stack's weight bytes as well. 0 where nothing is offloaded. (N, pp)."""
    if not any_offload(batch):
        return np.zeros_like(batch.device_params())
    states = batch_state_bytes(batch)
    optimizer = states.optimizer + stepped_params(batch) * HOST_GRADIENT_BYTES
    return np.where(offloads_optimizer(batch), optimizer, 0.0) + np.where(offloads_params(batch), states.weights, 0.0)


def gradients_held_at_activation_peak(batch: PlanBatch) -> np.ndarray:
    """Whether each device holds its gradients at its activation peak as the executor trains
    (`gradients_at_activation_peak`); DDP's buckets hold them throughout. (N, pp)."""
    device = np.arange(batch.pp)[None, :]
    ddp = (batch.shard_degree > 1) & ~batch.on_fsdp2
    return gradients_at_activation_peak(batch.schedule, device, batch.pp, batch.microbatches, ddp)


def zero_working_copies(batch: PlanBatch, kind: str) -> np.ndarray:
    """FSDP's unsharded working copies: ZeRO-3 gathers the block in use and prefetches the next (2 blocks of
    weights, at the regime's unsharded bytes: 16-bit under FSDP2's mixed-precision policy, the executor's fp32),
    ZeRO-2 on `fully_shard` keeps every unit gathered through the step (PlanBatch.weights_sharded);
    ZeRO-2/3 hold one block's full gradient until its reduce-scatter (Zhao et al. 2023). Inside
    torch.distributed.pipelining (PlanBatch.fsdp2_pipelined) no unit reduces before the stage's last backward, so
    the device's whole unsharded gradient accumulates, in the reduction's dtype (FSDP2's
    `to_accumulated_grad_if_needed` upcasts a 16-bit gradient to `reduce_dtype`)."""
    precision = batch.training.precision
    unsharded = batch.runtime.unsharded_bytes(precision)
    blocks_held = (batch.blocks > 0) * batch.block_params_per_gpu
    if kind == "weights":
        zero2_gathered = batch.weights_sharded & (batch.zero_stage == 2)
        return np.select(
            [batch.zero_stage == 3, zero2_gathered],
            [2 * blocks_held * unsharded, batch.device_params() * unsharded],
            0.0,
        )
    accumulated = batch.device_params() * batch.runtime.data_parallel_bytes(precision)
    working = np.where(batch.fsdp2_pipelined, accumulated, blocks_held * unsharded)
    return np.where(batch.zero_stage >= 2, working, 0.0)


def activation_bytes(batch: PlanBatch) -> np.ndarray:
    """Saved activations of every micro-batch in flight, plus what layers hold once whatever is in flight
    (`LayerCost.cached_bytes`), plus one layer's rematerialised working set."""
    device = np.arange(batch.pp)[None, :]
    has_embedding, has_head = edge_masks(batch.pp)

    def held(kind: str, count: np.ndarray) -> np.ndarray:
        inflight = layer_inflight(kind, batch.schedule, device, batch.pp, batch.virtual_stages, batch.microbatches)
        return count * getattr(batch, kind).saved_bytes * inflight

    saved = held("embedding", has_embedding) + held("block", batch.blocks) + held("head", has_head)
    saved = saved + batch.per_device("cached_bytes")
    working = np.maximum.reduce(
        [
            has_embedding * batch.embedding.working_bytes,
            (batch.blocks > 0) * batch.block.working_bytes,
            has_head * batch.head.working_bytes,
        ]
    )
    return saved + working


def communicators(batch: PlanBatch) -> np.ndarray:
    """NCCL communicators a rank joins: one per group of size > 1 (the ep and edp groups included), two for its
    pipeline neighbours."""
    experts = (batch.ep > 1).astype(int) + ((batch.ep > 1) & (batch.expert_shard_degree > 1))
    groups = (batch.tp > 1).astype(int) + (batch.cp > 1) + (batch.shard_degree > 1) + experts
    return groups + (2 if batch.pp > 1 else 0) + int(batch.tied_copy)
