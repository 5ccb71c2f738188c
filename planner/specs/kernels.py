"""What one device's kernels reach, measured (`paraplan profile kernels`, profiler/kernels.py): matmuls and fused
attention at the shapes training runs them, and the host's time per kernel under the executor's own block. The
planner sets each beside what its GPU preset predicts (planner/kernel_check.py)."""

from __future__ import annotations

from typing import Literal

from planner.specs.base import Frozen, PositiveInt, Precision
from planner.specs.model import ModelSpec
from planner.specs.profile import TimingStats

KERNEL_PROFILE_SCHEMA_VERSION = 1
"""Bumped whenever a KernelProfile field changes meaning; a file of another version is refused, not guessed."""


class GemmMeasurement(Frozen):
    """C = A B with A rows x inner and B inner x cols, in the profile's dtype (torch.mm): a linear layer's forward
    over `rows` tokens."""

    rows: PositiveInt
    cols: PositiveInt
    inner: PositiveInt
    time: TimingStats


class AttentionMeasurement(Frozen):
    """Causal fused attention (torch's scaled_dot_product_attention, is_causal=True) over `batch` sequences of
    `seq_len` tokens with `heads` heads of `head_dim`: forward, and backward from its output's gradient."""

    batch: PositiveInt
    heads: PositiveInt
    seq_len: PositiveInt
    head_dim: PositiveInt
    forward: TimingStats
    backward: TimingStats


class HostFloorMeasurement(Frozen):
    """The executor's transformer block at a width where the device finishes every kernel before the host issues
    the next one (`model`, a narrowed copy of the profiled architecture), timed inside a small model as the
    compute profile times blocks: its forward and backward are then the host's time to issue them."""

    model: ModelSpec
    seq_len: PositiveInt
    micro_batch_size: PositiveInt
    forward: TimingStats
    backward: TimingStats


class KernelProfile(Frozen):
    """One device's kernel sweep."""

    schema_version: int = KERNEL_PROFILE_SCHEMA_VERSION
    device_kind: Literal["cpu", "cuda"]
    device_name: str
    torch_version: str
    cuda_version: str | None = None
    created: str  # ISO 8601, UTC
    dtype: Precision
    gemms: list[GemmMeasurement] = []
    attention: list[AttentionMeasurement] = []
    host_floor: HostFloorMeasurement | None = None
