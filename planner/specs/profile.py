"""What the profiler measured on one machine type (HardwareProfile), and a calibration fitted to runs."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field, field_validator

from planner.specs.base import Frozen, Optimizer, PositiveInt, Precision, Recompute
from planner.specs.model import ModelSpec

PROFILE_SCHEMA_VERSION = 1
"""Bumped whenever a HardwareProfile field changes meaning; a profile of another version is refused, not guessed."""

CollectiveOp = Literal[
    "all_reduce", "all_gather", "reduce_scatter", "all_to_all", "send_recv", "fsdp_all_gather", "fsdp_reduce_scatter"
]
"""The fsdp_* ops are one FSDP2 unit's all-gather and reduce-scatter as training issues them, framework work
included (profiler/collectives.py); the cost model charges what they take beyond the bare collective as
dispatch that no compute hides (planner/cost/step.py `fsdp_dispatch_s`)."""
LinkTier = Literal["intra_node", "inter_node"]
LayerKind = Literal["block", "embedding", "head"]


class TimingStats(Frozen):
    """Repeated timings of one measurement: the median and how far the repeats spread around it."""

    median_s: Annotated[float, Field(ge=0, allow_inf_nan=False)]
    spread: Annotated[float, Field(ge=0, allow_inf_nan=False)]  # (p90 - p10) / median over the repeats
    repeats: PositiveInt
    unstable: bool = False  # spread above the profiler's threshold: the median is not to be trusted alone


class LayerMeasurement(Frozen):
    """One layer at one shape, dtype and recompute mode, as one device runs it under tensor parallelism `tp`
    (its weights sharded as tp would shard them). `backward` includes the recomputation the mode implies.

    `tp_collectives`: timed on `tp` ranks running the executor's tensor-parallel layer (profiler/tp_layers.py),
    so the times include its collectives and DTensor's dispatch, with or without `sequence_parallel`; otherwise
    timed on one device holding the shard, and the cost model adds the collectives from the fits.

    `concurrent_ranks`: how many ranks of the node ran the same work at the same time while it was timed: 1 when
    one device ran alone; N when every rank of an N-rank node timed its own copy at once (profiler/tp_layers.py
    `--loaded`), as a data-parallel or pipelined step keeps them all busy. Devices that share cores, caches or
    memory bandwidth (CPU ranks) are slower loaded than alone; the cost model uses the loaded times for plans
    that keep that many ranks busy."""

    layer: LayerKind
    tp: PositiveInt = 1
    tp_collectives: bool = False
    concurrent_ranks: PositiveInt = 1
    sequence_parallel: bool = False
    micro_batch_size: PositiveInt
    seq_len: PositiveInt
    dtype: Precision
    recompute: Recompute = "none"
    forward: TimingStats
    backward: TimingStats
    saved_bytes: Annotated[int, Field(ge=0)]  # what the forward keeps for backward (saved-tensor hooks)
    peak_allocated_bytes: int | None = None  # CUDA only: allocator peak over forward + backward


class OptimizerMeasurement(Frozen):
    """One optimizer step over `num_params` parameters (fp32 master weights and state); `concurrent_ranks` as in
    LayerMeasurement. `sharded`: the parameters were DTensor shards over the `concurrent_ranks` ranks (FSDP2), each
    op dispatched by DTensor, as in plans whose parameters are DTensors; `num_params` is then one rank's share."""

    optimizer: Optimizer
    num_params: PositiveInt
    time: TimingStats
    concurrent_ranks: PositiveInt = 1
    sharded: bool = False


class MeetingWait(Frozen):
    """How long each rank waited for its peers per meeting (a collective every rank must reach), with
    `concurrent_ranks` ranks running the executor's model at one layer shape (profiler/meeting_wait.py): `free`
    passes never meet, `synced` ones meet `meetings_per_pass` times; wait_s = (synced - free) / meetings_per_pass -
    collective_s, the one-element collective's own time, averaged over the ranks and never below 0."""

    micro_batch_size: PositiveInt
    seq_len: PositiveInt
    recompute: Recompute
    concurrent_ranks: Annotated[int, Field(ge=2)]
    meetings_per_pass: PositiveInt
    free: TimingStats
    synced: TimingStats
    collective_s: Annotated[float, Field(ge=0)]
    wait_s: Annotated[float, Field(ge=0)]


class CollectiveMeasurement(Frozen):
    """One collective at one message size on a group of `group_size` ranks over one link tier.
    algbw = size / time; busbw = algbw x the nccl-tests factor of the op (nccl-tests doc/PERFORMANCE.md)."""

    op: CollectiveOp
    tier: LinkTier
    group_size: Annotated[int, Field(ge=2)]
    # nccl-tests' convention (doc/PERFORMANCE.md), as planner/cost/comm.py's total_bytes: all_reduce the buffer,
    # all_gather the gathered output, reduce_scatter each rank's input, all_to_all the send buffer, send_recv
    # one message.
    size_bytes: PositiveInt
    time: TimingStats
    algbw_GBps: Annotated[float, Field(ge=0)]
    busbw_GBps: Annotated[float, Field(ge=0)]


class CollectiveFit(Frozen):
    """time(size) = latency_s + size x busbw_factor(op, n) / (bandwidth_GBps x 1e9): the alpha-beta model
    (Hockney 1994; Thakur et al. 2005) fitted to the measurements of one op, tier and group size."""

    op: CollectiveOp
    tier: LinkTier
    group_size: Annotated[int, Field(ge=2)]
    latency_s: Annotated[float, Field(ge=0)]
    bandwidth_GBps: Annotated[float, Field(gt=0)]  # bus bandwidth
    r2: float  # of log(fitted time) against log(measured time): small messages count as much as large ones
    max_rel_error: Annotated[float, Field(ge=0)]
    num_samples: PositiveInt


ComputeClass = Literal["forward", "backward", "optimizer"]
Efficiency = Annotated[float, Field(gt=0, le=1000)]


class Calibration(Frozen):
    """The cost model's free factors, fitted to runs measured on the profiled machine (`paraplan validate`,
    planner/calibration.py), so that estimates from this profile predict whole training steps, not isolated
    layers. An efficiency is (seconds the profile measured in isolation) / (seconds the same work takes inside
    a run); a class or tier left out keeps 1."""

    compute_efficiency: dict[ComputeClass, Efficiency] = {}
    # Bus bandwidth in a run / the profile's fitted bandwidth, per link tier.
    collective_efficiency: dict[LinkTier, Efficiency] = {}
    # The profile's fitted per-operation latency (alpha) / the latency in a run, per link tier: inside a step a
    # collective also pays its framework's dispatch (DTensor, FSDP hooks) and waits for a busy peer.
    collective_latency_efficiency: dict[LinkTier, Efficiency] = {}
    # The share of the gradient reduction that backward can hide which a run does hide (1: all of it, as the
    # uncalibrated model assumes; 0: none).
    overlap: Annotated[float, Field(ge=0, le=1)] = 1.0
    # Framework time per micro-batch on every device that the layers do not account for (hooks, the pipeline
    # schedule's bookkeeping, the host launching the micro-batch).
    microbatch_overhead_s: Annotated[float, Field(ge=0)] = 0.0
    # Framework time per step that neither layers nor collectives account for (the trainer's own bookkeeping,
    # the loss and norm reductions' waits, ranks lining up at the step's synchronisation points).
    step_overhead_s: Annotated[float, Field(ge=0)] = 0.0
    num_runs: PositiveInt  # measured runs the factors were fitted on
    fit_mape: Annotated[float, Field(ge=0)]  # step-time error on those runs after the fit
    created: str  # ISO 8601, UTC


class HardwareProfile(Frozen):
    """What the profiler measured on one machine type: versioned, with the software it was measured under."""

    schema_version: int = PROFILE_SCHEMA_VERSION
    device_kind: Literal["cpu", "cuda"]
    device_name: str
    device_count: PositiveInt = 1
    hosts: list[str] = []
    torch_version: str
    cuda_version: str | None = None
    nccl_version: str | None = None
    created: str  # ISO 8601, UTC
    settings: dict[str, Any] = {}
    model: ModelSpec | None = None  # the model whose layers were measured
    layers: list[LayerMeasurement] = []
    optimizer: list[OptimizerMeasurement] = []
    collectives: list[CollectiveMeasurement] = []
    collective_fits: list[CollectiveFit] = []
    # The share of a collective that hides behind compute running with it (profiler/collectives.py
    # measure_overlap); None: not measured, and the cost model hides all it can.
    comm_compute_overlap: Annotated[float, Field(ge=0, le=1)] | None = None
    meeting_waits: list[MeetingWait] = []  # by layer shape; none: not measured, and no meeting waits
    calibration: Calibration | None = None  # fitted to measured runs; None: the profile's times as measured

    @field_validator("schema_version")
    @classmethod
    def _known_version(cls, value: int) -> int:
        if value != PROFILE_SCHEMA_VERSION:
            raise ValueError(
                f"profile schema version {value} is not this paraplan's ({PROFILE_SCHEMA_VERSION}); measure again"
            )
        return value
