"""Tensor parallelism's work once a step, outside the layers' own collectives (which planner/cost/layers.py charges per
layer): the reduction of sequence-parallel partial gradients, and the tp ranks' meetings. Per-row values are
(N, 1), per-device ones (N, pp) (planner/cost/batch.py)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from planner.cost import comm
from planner.cost.measured import meeting_wait_s

if TYPE_CHECKING:
    from planner.cost.batch import PlanBatch


def tp_step_comm_s(batch: PlanBatch) -> np.ndarray:
    """Tensor-parallel work once per step, outside the layers' times: the one all-reduce of the gradients that
    sequence parallelism leaves partial (`partial_grad_params`; Megatron-LM's finalize_model_grads, the executor's
    `align_grads_with_params`), at the regime's gradient bytes (Runtime.partial_gradient_bytes), and the waits at
    the tp ranks' meetings (`tp_meetings`). (N, 1)."""
    partial_bytes = batch.per_device("partial_grad_params") * batch.runtime.partial_gradient_bytes
    reduce = np.where(partial_bytes > 0, comm.all_reduce_s(partial_bytes, batch.tp, batch.tp_channel), 0.0)
    wait_s = meeting_wait_s(batch.measured, batch.micro_batch_size)
    return (reduce + tp_meetings(batch) * wait_s).max(axis=1, keepdims=True)


def tp_meetings(batch: PlanBatch) -> np.ndarray:
    """Meetings of the tp ranks per step besides the layers' own collectives (which the layers' times hold): the
    gradient norm's reductions (Runtime.tp_norm_layouts) and, under sequence parallelism, the partial gradients'
    all-reduce. (N, pp); 0 without tensor parallelism."""
    sequence_parallel = batch.per_device("partial_grad_params") > 0
    return (batch.tp > 1) * (batch.runtime.tp_norm_layouts + sequence_parallel)
