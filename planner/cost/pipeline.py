"""Pipeline parallelism: which blocks each device holds, the pipeline's bubble and its point-to-point traffic.

Functions broadcast over numpy arrays: per-row values have shape (N, 1), per-device ones (N, pp). The terms of a
step (`pp_comm_s`, `pp_meetings`) read a PlanBatch (planner/cost/batch.py).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from planner.cost import comm
from planner.cost.ops import ACTIVATION_BYTES

if TYPE_CHECKING:
    from planner.cost.batch import PlanBatch
    from planner.specs import ModelSpec, TrainingSpec


def blocks_per_device(chunk_counts: tuple[int, ...], pp: int) -> np.ndarray:
    """Blocks on each device when chunk c runs on device c % pp (Narayanan et al. 2021, sec. 2.2.2,
    interleaved assignment; with one chunk per device, chunk = device)."""
    per_device = np.zeros(pp, dtype=np.int64)
    np.add.at(per_device, np.arange(len(chunk_counts)) % pp, chunk_counts)
    return per_device


def edge_masks(pp: int) -> tuple[np.ndarray, np.ndarray]:
    """Which device holds the embedding (chunk 0 -> device 0) and the LM head (the last chunk, pp * v - 1,
    runs on device pp - 1), as (1, pp) 0/1 arrays."""
    device = np.arange(pp)[None, :]
    return (device == 0).astype(float), (device == pp - 1).astype(float)


def pipeline_bubble_s(busy_per_device_s: np.ndarray, virtual_stages):
    """A pipeline of p devices with per-micro-batch times t_i runs m * max(t) on the slowest device plus the
    fill/drain bubble (sum(t) - max(t)) / v, returned here. For equal stages this is Narayanan et al. 2021 eq. 1
    (bubble = (p - 1) t) and, interleaved, eq. 2 (bubble / v); GPipe's bubble equals 1F1B's (sec. 2.2.1).
    `busy_per_device_s` is (N, pp); the result is (N, 1)."""
    spread = busy_per_device_s.sum(axis=1, keepdims=True) - busy_per_device_s.max(axis=1, keepdims=True)
    return spread / virtual_stages


def p2p_transfers_on_critical_path(pp: int, virtual_stages, microbatches):
    """Each micro-batch crosses a device boundary forward and backward once per chunk (v of them when
    interleaved, Narayanan et al. 2021 sec. 2.2.2: "v times more communication"), and the first forward and
    last backward cross all pp - 1 boundaries while the pipeline fills and drains."""
    if pp == 1:
        return np.zeros_like(np.asarray(microbatches))
    return 2 * (virtual_stages * microbatches + pp - 1)


def p2p_activation_bytes(model: ModelSpec, training: TrainingSpec, micro_batch_size, cp, tp):
    """Bytes one pipeline hand-off moves per rank: a micro-batch's activation (its gradient, backward) of this
    rank's cp share of the sequence, and only its 1/tp share: the sequence-parallel shard, or Megatron's
    scatter/gather optimisation (Narayanan et al. 2021, sec. 4.1). Numbers or (N, 1) columns."""
    tokens = training.seq_len / cp * micro_batch_size
    return ACTIVATION_BYTES[training.precision] * tokens * model.hidden_size / tp


def microbatches_alone(pp: int, virtual_stages: np.ndarray, microbatches: np.ndarray) -> np.ndarray:
    """How much of the slowest device's work, in micro-batches, runs while the rest of the pipeline waits: a
    device waits for its neighbours while the pipeline fills and drains, as long as the bubble, (p - 1) / v
    micro-batch slots (Narayanan et al. 2021, eq. 1-2), and its own work in those slots, F of the first
    micro-batch, B of the last, runs with the others idle. That work, and the bubble, run at the speed of a
    rank alone; the rest at the speed of a loaded node (LayerCost.contention). Exact for two stages; with more,
    fill and drain keep some neighbours busy, so this is the least contention that remains. No pipeline: none."""
    if pp == 1:
        return np.zeros_like(microbatches, dtype=float)
    return np.minimum(microbatches, (pp - 1) / virtual_stages)


def pp_comm_s(batch: PlanBatch) -> np.ndarray:
    """Activations (forward) and their gradients (backward) between pipeline neighbours (`p2p_activation_bytes`
    each), plus the tied word-embedding gradient all-reduce between first and last device."""
    if batch.pp == 1:
        return np.zeros_like(batch.dp, dtype=float)
    model, training = batch.model, batch.training
    activation = p2p_activation_bytes(model, training, batch.micro_batch_size, batch.cp, batch.tp)
    transfers = p2p_transfers_on_critical_path(batch.pp, batch.virtual_stages, batch.microbatches)
    total = transfers * comm.p2p_s(activation, batch.pp_channel)
    if batch.tied_copy:
        grad = batch.runtime.data_parallel_bytes(training.precision) * model.vocab_size * model.hidden_size / batch.tp
        total = total + comm.all_reduce_s(grad, 2, batch.pp_channel)
    return total


def pp_meetings(batch: PlanBatch) -> np.ndarray:
    """Meetings of pipeline neighbours per step on the critical path: each activation or gradient hand-off
    (`p2p_transfers_on_critical_path`), and the regime's reductions over stages (Runtime.pipeline_step_reductions:
    the executor sums the loss and the squared gradient norm, executor/apply.py). (N, 1)."""
    if batch.pp == 1:
        return np.zeros_like(batch.dp, dtype=float)
    transfers = p2p_transfers_on_critical_path(batch.pp, batch.virtual_stages, batch.microbatches)
    return transfers + batch.runtime.pipeline_step_reductions
