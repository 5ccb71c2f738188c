"""Pipeline parallelism: which blocks each device holds, the pipeline's bubble and its point-to-point traffic.

Functions broadcast over numpy arrays: per-row values have shape (N, 1), per-device ones (N, pp).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from planner.cost.ops import ACTIVATION_BYTES

if TYPE_CHECKING:
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
