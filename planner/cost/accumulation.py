"""Gradient accumulation's memory traffic: what adding each micro-batch's gradients into those a device holds costs
beyond the backward's own kernels. Per-row values are (N, 1), per-device ones (N, pp) (planner/cost/batch.py).

Autograd accumulates a parameter's gradient in place: the first micro-batch's gradient is kept as computed, each
later one is added to it (`AccumulateGrad`: `grad += new`, both read and one written, on the compute stream), a
memory-bound pass over every gradient the device holds (roofline, Williams et al. 2009). What a stack adds, in which
precision, and whether it fuses the addition into the weight-gradient GEMM is the stack's
(Runtime.accumulation_bytes, Runtime.microbatch_gradient_bytes; planner/cost/runtime.py).

A device adds whole gradients where nothing reduces them before the step's last micro-batch: ZeRO 0-1 (DDP's
`no_sync`, Megatron-LM's and DeepSpeed's buffers) and FSDP2 inside torch.distributed.pipelining
(PlanBatch.fsdp2_pipelined). ZeRO 2-3 elsewhere reduce-scatter every micro-batch and add only their shard.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from planner.cost.batch import PlanBatch


def accumulation_s(batch: PlanBatch) -> np.ndarray:
    """Seconds a step spends adding gradients on each device: Runtime.accumulation_bytes per gradient element it
    holds for every micro-batch after the first, and Runtime.microbatch_gradient_bytes per whole gradient element
    for every micro-batch (a ZeRO 0-1 optimizer's own copy). (N, pp)."""
    runtime, precision, m = batch.runtime, batch.training.precision, batch.microbatches
    whole = (batch.zero_stage <= 1) | batch.fsdp2_pipelined
    held = np.where(whole, batch.device_params(), batch.params_per_shard(np.full_like(whole, True)))
    later = (m - 1) * held * runtime.accumulation_bytes.get(precision, 0)
    copied = np.where(batch.zero_stage <= 1, batch.device_params(), 0.0)
    every = m * copied * runtime.microbatch_gradient_bytes.get(precision, 0)
    gpu = batch.cluster.gpu
    return (later + every) / (gpu.hbm_GBps * 1e9 * gpu.memory_efficiency)
