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

from typing import TYPE_CHECKING, Protocol

import numpy as np

from planner.cost.params import experts_params, model_params

if TYPE_CHECKING:
    from planner.cost.batch import PlanBatch
    from planner.cost.runtime import Runtime
    from planner.specs import GpuSpec, ModelSpec


class PlanColumns(Protocol):
    """Plans as numpy columns (the search's Candidates)."""

    dp: np.ndarray
    tp: np.ndarray
    pp: np.ndarray
    cp: np.ndarray
    zero_stage: np.ndarray


def accumulation_s(batch: PlanBatch) -> np.ndarray:
    """Seconds a step spends adding gradients on each device: Runtime.accumulation_bytes per gradient element it
    holds for every micro-batch after the first, and Runtime.microbatch_gradient_bytes per whole gradient element
    for every micro-batch (a ZeRO 0-1 optimizer's own copy). (N, pp)."""
    runtime, precision, m = batch.runtime, batch.training.precision, batch.microbatches
    whole = (batch.zero_stage <= 1) | batch.fsdp2_pipelined
    held = np.where(whole, batch.device_params(), batch.params_per_shard(np.full_like(whole, True)))
    copied = np.where(batch.zero_stage <= 1, batch.device_params(), 0.0)
    return _traffic_s(runtime, precision, batch.cluster.gpu, m, held, copied)


def accumulation_floor_s(
    model: ModelSpec, precision: str, gpu: GpuSpec, runtime: Runtime, plans: PlanColumns, microbatches: np.ndarray
) -> np.ndarray:
    """A lower bound on `accumulation_s`'s slowest device, for plans given as columns (the search's bound,
    planner/search/evaluate.py): a pipeline's devices hold every dense parameter over tp between them, so the one
    holding most holds at least 1/(tp x pp) of them; a ZeRO >= 2 plan adds at least 1/(dp x cp) of that, unless its
    FSDP2 units run inside torch.distributed.pipelining (the whole of it: PlanBatch.fsdp2_pipelined)."""
    dense = model_params(model) - experts_params(model).total * model.num_layers
    whole = dense / (plans.tp * plans.pp)
    pipelined = (plans.pp > 1) & runtime.fsdp2_in_torch_pipelining
    held = np.where((plans.zero_stage >= 2) & ~pipelined, whole / (plans.dp * plans.cp), whole)
    copied = np.where(plans.zero_stage <= 1, whole, 0.0)
    return _traffic_s(runtime, precision, gpu, microbatches, held, copied)


def _traffic_s(runtime: Runtime, precision: str, gpu: GpuSpec, microbatches, held, copied) -> np.ndarray:
    """`held` gradient elements added for every micro-batch after the first, `copied` ones for every micro-batch,
    at the stack's bytes each, over the GPU's achievable HBM bandwidth."""
    later = (microbatches - 1) * held * runtime.accumulation_bytes.get(precision, 0)
    every = microbatches * copied * runtime.microbatch_gradient_bytes.get(precision, 0)
    return (later + every) / (gpu.hbm_GBps * 1e9 * gpu.memory_efficiency)
