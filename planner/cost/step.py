"""One training step, for one plan or for many candidate plans at once.

The step time is the sum of the breakdown's terms (critical path of the slowest pipeline device):
  compute + tp_comm + cp_comm    m x the slowest device's per-micro-batch work (+ a calibrated profile's
                                 framework overheads per micro-batch and per step)
  bubble                         pipeline fill and drain (Narayanan et al. 2021, eq. 1-2)
  pp_comm                        point-to-point activations and gradients, plus tied-embedding sync
  dp_comm                        gradient reduction / ZeRO gathers not hidden behind backward
                                 (both comm terms also hold a measured profile's wait at each meeting of the ranks)
  optimizer                      the optimizer step (memory-bound)

There is one implementation, written over numpy arrays: a `PlanBatch` holds candidate plans that share a
pipeline depth, one row each; per-row columns are (N, 1) arrays so they broadcast against per-device values
(N, pp). `estimate_step` is a batch of one; the search evaluates hundreds of thousands of rows per call.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

import numpy as np

from planner.cost import comm, flops, memory
from planner.cost.comm import Channel, DpChannels
from planner.cost.measured import ProfileCosts
from planner.cost.ops import ACTIVATION_BYTES
from planner.cost.pipeline import (
    blocks_per_device,
    edge_masks,
    p2p_transfers_on_critical_path,
    pipeline_bubble_s,
)
from planner.graph import LayerCost, LayerKinds, busy_ranks_per_node, layer_graph, layer_kinds, layers_in_order
from planner.layout import placement
from planner.request import EstimateRequest, ProfileResolver, parse_estimate_request
from planner.rules import require_valid
from planner.specs import (
    ClusterSpec,
    MemoryEstimate,
    ModelSpec,
    ParallelPlan,
    StageMemory,
    StepEstimate,
    TimeBreakdown,
    TrainingSpec,
)

GiB = 1024**3
TIME_TERMS: tuple[str, ...] = tuple(TimeBreakdown.model_fields)
MEMORY_TERMS = ("params_bytes", "grads_bytes", "optimizer_bytes", "activations_bytes", "other_bytes")
# The gradients the executor reduces are in its weights' dtype: fp32 (mixed precision runs by autocast).
GRADIENT_BYTES = 4


def _column(values: Any, dtype: Any = None) -> np.ndarray:
    return np.asarray(values, dtype=dtype).reshape(-1, 1)


@dataclass(frozen=True)
class KindColumns:
    """One layer kind's cost (LayerCost fields) for every row, as (N, 1) columns."""

    forward_s: np.ndarray
    backward_s: np.ndarray
    recompute_s: np.ndarray
    tp_comm_s: np.ndarray
    cp_comm_s: np.ndarray
    saved_bytes: np.ndarray
    working_bytes: np.ndarray
    cached_bytes: np.ndarray
    contention: np.ndarray
    partial_grad_params: np.ndarray
    params_per_gpu: np.ndarray  # last: `of` derives it, every other field is a LayerCost field of the same name

    @classmethod
    def of(cls, costs: list[LayerCost], tp: np.ndarray) -> KindColumns:
        """Stack LayerCosts (`tp`: each one's tp degree). A cost whose fields are arrays over W micro-batch
        sizes (graph.layer_kinds) contributes W consecutive rows."""
        width = max(np.size(cost.forward_s) for cost in costs)

        def stacked(values: list[Any]) -> np.ndarray:
            return _column(np.concatenate([np.broadcast_to(np.asarray(v, float), (width,)) for v in values]))

        column = {f.name: stacked([getattr(cost, f.name) for cost in costs]) for f in fields(cls)[:-1]}
        sharded = stacked([cost.params.sharded for cost in costs])
        replicated = stacked([cost.params.replicated for cost in costs])
        return cls(**column, params_per_gpu=sharded / np.repeat(_column(tp), width, axis=0) + replicated)

    def take(self, rows: np.ndarray) -> KindColumns:
        return KindColumns(**{f.name: getattr(self, f.name)[rows] for f in fields(self)})

    @property
    def work_s(self) -> np.ndarray:
        return self.forward_s + self.backward_s + self.recompute_s

    @property
    def busy_s(self) -> np.ndarray:
        return self.work_s + self.tp_comm_s + self.cp_comm_s

    @property
    def alone_work_s(self) -> np.ndarray:
        """`work_s` while the node's other ranks wait (LayerCost.contention)."""
        return self.work_s / self.contention

    @property
    def alone_busy_s(self) -> np.ndarray:
        return self.alone_work_s + self.tp_comm_s + self.cp_comm_s


@dataclass(frozen=True)
class PlanBatch:
    """Candidate plans of one model, training setup and cluster that share `pp`: (N, 1) columns of the plan's
    fields, each row's layer costs, and the channels its dp x cp and pipeline groups see."""

    model: ModelSpec
    training: TrainingSpec
    cluster: ClusterSpec
    measured: ProfileCosts | None  # the request's profile (planner/request.py), or None: the analytic model only
    pp: int
    dp: np.ndarray
    tp: np.ndarray
    cp: np.ndarray
    zero_stage: np.ndarray
    micro_batch_size: np.ndarray
    schedule: np.ndarray  # strings
    virtual_stages: np.ndarray
    overlap_grad_reduce: np.ndarray  # bools
    microbatches: np.ndarray
    blocks: np.ndarray  # (N, pp): blocks on each device, all of its chunks together
    embedding: KindColumns
    block: KindColumns
    head: KindColumns
    dp_channel: DpChannels  # bus bandwidths and latencies as (N, 1) columns
    pp_channel: Channel
    tp_channel: Channel

    @classmethod
    def of_plan(
        cls,
        model: ModelSpec,
        training: TrainingSpec,
        cluster: ClusterSpec,
        plan: ParallelPlan,
        kinds: LayerKinds | None = None,
        measured: ProfileCosts | None = None,
    ) -> PlanBatch:
        """A batch of one, for `estimate_step` (`kinds`: the plan's layer costs, if already computed)."""
        kinds = kinds or layer_kinds(model, training, cluster, plan, measured=measured)
        degrees = (plan.pp, plan.dp, plan.cp, plan.tp, cluster.gpus_per_node)
        dp_channel = DpChannels.of(cluster, placement("dp_cp", *degrees), measured)
        pp_channel = comm.p2p_channel(cluster, placement("pp", *degrees), measured)
        tp_channel = comm.group_channel(cluster, placement("tp", *degrees), measured)
        return cls(
            model=model,
            training=training,
            cluster=cluster,
            measured=measured,
            pp=plan.pp,
            dp=_column(plan.dp),
            tp=_column(plan.tp),
            cp=_column(plan.cp),
            zero_stage=_column(plan.zero_stage),
            micro_batch_size=_column(plan.micro_batch_size),
            schedule=_column(plan.schedule),
            virtual_stages=_column(plan.virtual_stages),
            overlap_grad_reduce=_column(plan.overlap_grad_reduce),
            microbatches=_column(plan.num_microbatches(training)),
            blocks=blocks_per_device(plan.stage_layer_counts(model.num_layers), plan.pp)[None, :],
            **kind_columns([kinds], _column(plan.tp)),
            dp_channel=dp_channel_columns([dp_channel]),
            pp_channel=channel_columns([pp_channel]),
            tp_channel=channel_columns([tp_channel]),
        )

    @property
    def shard_degree(self) -> np.ndarray:
        """ZeRO partitions over the gradient-reduction group: dp x cp (Megatron-LM, FSDP over dp_cp)."""
        return self.dp * self.cp

    @property
    def weight_bytes(self) -> int:
        return memory.weight_bytes_per_param(self.training.precision)

    @property
    def executor_memory(self) -> bool:
        """Memory as paraplan's executor holds it (memory.py's `fp32_weights`, torch.optim's step): the cluster's
        profile measured the layers' memory on CUDA, where the profiler runs the executor's layers."""
        return self.measured is not None and self.measured.measures_memory

    @property
    def tied_copy(self) -> bool:
        """With tied embeddings and pp > 1 the last device keeps its own copy of the word embedding, kept in
        sync by an all-reduce of its gradient with the first device (Megatron-LM, Shoeybi et al. 2019)."""
        return self.model.tie_embeddings and self.pp > 1

    def per_device(self, quantity: str) -> np.ndarray:
        """A KindColumns quantity summed over each device's layers: (N, pp)."""
        has_embedding, has_head = edge_masks(self.pp)
        return (
            self.blocks * getattr(self.block, quantity)
            + has_embedding * getattr(self.embedding, quantity)
            + has_head * getattr(self.head, quantity)
        )

    def device_params(self) -> np.ndarray:
        """Parameters each device holds per GPU (its tp shard): (N, pp)."""
        count = self.per_device("params_per_gpu")
        if self.tied_copy:
            _, has_head = edge_masks(self.pp)
            count = count + has_head * self.model.vocab_size * self.model.hidden_size / self.tp
        return count

    def layers_on_device(self) -> np.ndarray:
        has_embedding, has_head = edge_masks(self.pp)
        return self.blocks + has_embedding + has_head


def kind_columns(kinds: list[LayerKinds], tp: np.ndarray) -> dict[str, KindColumns]:
    """Per-row LayerKinds -> the batch's `embedding`, `block` and `head` columns."""
    return {kind: KindColumns.of([getattr(row, kind) for row in kinds], tp) for kind in ("embedding", "block", "head")}


def dp_channel_columns(channels: list[DpChannels]) -> DpChannels:
    return DpChannels(*(channel_columns([getattr(c, f.name) for c in channels]) for f in fields(DpChannels)))


def channel_columns(channels: list[Channel]) -> Channel:
    return Channel(
        bus_bandwidth_Bps=_column([c.bus_bandwidth_Bps for c in channels], float),
        latency_s=_column([c.latency_s for c in channels], float),
    )


@dataclass(frozen=True)
class BatchEstimate:
    """The cost model's answer for every row of a PlanBatch: time terms (N,), memory per device (N, pp)."""

    time_s: dict[str, np.ndarray]  # TIME_TERMS -> (N,)
    memory_bytes: dict[str, np.ndarray]  # MEMORY_TERMS -> (N, pp)

    @property
    def step_time_s(self) -> np.ndarray:
        return sum(self.time_s[term] for term in TIME_TERMS)  # type: ignore[return-value]

    @property
    def device_total_bytes(self) -> np.ndarray:
        return sum(self.memory_bytes[term] for term in MEMORY_TERMS)  # type: ignore[return-value]

    @property
    def peak_bytes(self) -> np.ndarray:
        return self.device_total_bytes.max(axis=1)

    @property
    def peak_stage(self) -> np.ndarray:
        return self.device_total_bytes.argmax(axis=1)


def evaluate(batch: PlanBatch) -> BatchEstimate:
    """Every term of the step time and of each device's memory, for every row."""
    time_s = {term: np.broadcast_to(value, (len(batch.dp), 1))[:, 0] for term, value in step_times(batch).items()}
    return BatchEstimate(time_s=time_s, memory_bytes=device_memory(batch))


def estimate_request(
    request: dict[str, Any] | EstimateRequest, resolve_profile: ProfileResolver | None = None
) -> StepEstimate:
    """The contract's estimate; `resolve_profile` finds `cluster.profile` (default: a file path)."""
    req = parse_estimate_request(request, resolve_profile)
    require_valid(req.plan, req.model, req.training, req.cluster)
    return estimate_step(req.model, req.training, req.cluster, req.plan, measured=req.measured)


def estimate_step(
    model: ModelSpec,
    training: TrainingSpec,
    cluster: ClusterSpec,
    plan: ParallelPlan,
    measured: ProfileCosts | None = None,
) -> StepEstimate:
    """Predict one step of a structurally valid plan (see planner.rules); `measured`: what a profile of the
    cluster measured (planner/request.py `profile_costs`), or None for the analytic model only."""
    kinds = layer_kinds(model, training, cluster, plan, measured=measured)
    batch = PlanBatch.of_plan(model, training, cluster, plan, kinds, measured)
    estimate = summarise(batch, evaluate(batch), row=0, plan=plan)
    if measured is None:
        return estimate
    sources, notes = profile_sources(kinds, batch, plan)
    return estimate.model_copy(update={"sources": sources, "assumptions": notes + estimate.assumptions})


# --------------------------------------------------------------------------------------------- time


def step_times(batch: PlanBatch) -> dict[str, np.ndarray]:
    overhead = microbatch_overhead_s(batch.measured)
    busy = batch.per_device("busy_s") + overhead
    slowest = busy.argmax(axis=1)[:, None]
    m = batch.microbatches
    alone = microbatches_alone(batch.pp, batch.virtual_stages, m)

    def on_slowest(quantity: str, count: np.ndarray = m) -> np.ndarray:
        return count * np.take_along_axis(batch.per_device(quantity), slowest, axis=1)

    return {
        "compute_s": on_slowest("work_s", m - alone) + on_slowest("alone_work_s", alone) + m * overhead
        + step_overhead_s(batch.measured),
        "tp_comm_s": on_slowest("tp_comm_s") + tp_step_comm_s(batch),
        "cp_comm_s": on_slowest("cp_comm_s"),
        "pp_comm_s": pp_comm_s(batch) + pp_meetings(batch) * meeting_wait_s(batch),
        "dp_comm_s": (dp_comm_exposed_s(batch) + dp_meetings(batch) * meeting_wait_s(batch)).max(axis=1, keepdims=True),
        "bubble_s": pipeline_bubble_s(batch.per_device("alone_busy_s") + overhead, batch.virtual_stages),
        "optimizer_s": optimizer_step_s(batch).max(axis=1, keepdims=True),
    }


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


def tp_step_comm_s(batch: PlanBatch) -> np.ndarray:
    """Tensor-parallel work once per step, outside the layers' times: the one all-reduce of the gradients that
    sequence parallelism leaves partial (`partial_grad_params`; Megatron-LM's finalize_model_grads, the executor's
    `align_grads_with_params`), and the waits at the tp ranks' meetings (`tp_meetings`). (N, 1)."""
    partial_bytes = batch.per_device("partial_grad_params") * GRADIENT_BYTES
    reduce = np.where(partial_bytes > 0, comm.all_reduce_s(partial_bytes, batch.tp, batch.tp_channel), 0.0)
    return (reduce + tp_meetings(batch) * meeting_wait_s(batch)).max(axis=1, keepdims=True)


# The gradient norm reduces each DTensor layout of the gradients once (executor/apply.py `clip_grad_norm`); tp
# gives two that are split over its ranks, the column-parallel and the row-parallel matrices.
CLIP_TP_LAYOUTS = 2


def tp_meetings(batch: PlanBatch) -> np.ndarray:
    """Meetings of the tp ranks per step besides the layers' own collectives (which the layers' times hold): the
    gradient norm's reductions (`CLIP_TP_LAYOUTS`) and, under sequence parallelism, the partial gradients'
    all-reduce. (N, pp); 0 without tensor parallelism."""
    sequence_parallel = batch.per_device("partial_grad_params") > 0
    return (batch.tp > 1) * (CLIP_TP_LAYOUTS + sequence_parallel)


def pp_comm_s(batch: PlanBatch) -> np.ndarray:
    """Activations (forward) and their gradients (backward) between pipeline neighbours. Each TP rank sends
    only its 1/tp share: the sequence-parallel shard, or Megatron's scatter/gather optimisation (Narayanan et
    al. 2021, sec. 4.1). Plus the tied word-embedding gradient all-reduce between first and last device."""
    if batch.pp == 1:
        return np.zeros_like(batch.dp, dtype=float)
    model, training = batch.model, batch.training
    tokens = training.seq_len / batch.cp * batch.micro_batch_size
    activation = ACTIVATION_BYTES[training.precision] * tokens * model.hidden_size / batch.tp
    transfers = p2p_transfers_on_critical_path(batch.pp, batch.virtual_stages, batch.microbatches)
    total = transfers * comm.p2p_s(activation, batch.pp_channel)
    if batch.tied_copy:
        grad = batch.weight_bytes * model.vocab_size * model.hidden_size / batch.tp
        total = total + comm.all_reduce_s(grad, 2, batch.pp_channel)
    return total


def meeting_wait_s(batch: PlanBatch) -> np.ndarray:
    """Seconds a rank waits for the latest of its peers each time they meet (profiler/meeting_wait.py), at each
    row's micro-batch size; 0 without a profile that measured it. (N, 1)."""
    if batch.measured is None:
        return np.zeros_like(batch.micro_batch_size, dtype=float)
    return batch.measured.meeting_wait_s(batch.micro_batch_size)


def pp_meetings(batch: PlanBatch) -> np.ndarray:
    """Meetings of pipeline neighbours per step on the critical path: each activation or gradient hand-off
    (`p2p_transfers_on_critical_path`), and the sums over stages of the loss and of the squared gradient norm
    (executor/apply.py). (N, 1)."""
    if batch.pp == 1:
        return np.zeros_like(batch.dp, dtype=float)
    return p2p_transfers_on_critical_path(batch.pp, batch.virtual_stages, batch.microbatches) + 2


# DDP's gradient buckets (torch.nn.parallel.DistributedDataParallel): the first holds 1 MiB
# (dist._DEFAULT_FIRST_BUCKET_BYTES), the others bucket_cap_mb = 25 MiB.
DDP_FIRST_BUCKET_BYTES, DDP_BUCKET_BYTES = 2**20, 25 * 2**20


def dp_meetings(batch: PlanBatch) -> np.ndarray:
    """Meetings of data-parallel peers per step, each a collective every rank of the group must reach: the loss's
    mean over dp, the gradient norm's reduction when the parameters are DTensor shards (executor/apply.py), and
    the gradient collectives: DDP's buckets, after which ZeRO-1's owners broadcast their shares (asynchronously,
    waited for together: one meeting); FSDP2 one collective per unit as `dp_comm_s` counts them (ZeRO-2: a
    gather per unit, a reduce-scatter per unit and micro-batch; ZeRO-3: two gathers and a reduce-scatter per unit
    and micro-batch; `replicate`: an all-reduce per unit). (N, pp); 0 with one data-parallel rank."""
    zero, m, units = batch.zero_stage, batch.microbatches, dp_units(batch)
    gradient_bytes = batch.device_params() * GRADIENT_BYTES
    ddp_buckets = 1 + np.ceil(np.maximum(gradient_bytes - DDP_FIRST_BUCKET_BYTES, 0) / DDP_BUCKET_BYTES)
    gradients = np.select(
        [on_fsdp2(batch) & (zero == 2), on_fsdp2(batch) & (zero == 3), on_fsdp2(batch)],
        [units * (m + 1), 3 * m * units, units],
        ddp_buckets + (zero == 1),
    )
    return (batch.shard_degree > 1) * (1 + holds_dtensors(batch) + gradients)


def dp_comm_s(batch: PlanBatch) -> np.ndarray:
    """Data-parallel traffic of each device per step (ZeRO sec. 7: all-reduce = reduce-scatter + all-gather).

    ZeRO 0: all-reduce of the gradients; 1: the same all-reduce (DDP) and, after the optimizer step, each
    owner's broadcast of its updated share (torch's ZeroRedundancyOptimizer, executor/parallel/data.py), which
    together move an all-gather's bytes; 2 (FSDP, no resharding until the last micro-batch's backward): a
    reduce-scatter per micro-batch + one all-gather; 3 (FSDP, resharding): per micro-batch, all-gathers in
    forward and backward and a reduce-scatter. Each collective is issued once per communication unit
    (`dp_units`): the volume is the same, the per-operation latency is paid per unit."""
    return dp_during_backward_s(batch) + dp_after_step_s(batch)


def dp_during_backward_s(batch: PlanBatch) -> np.ndarray:
    """The part of `dp_comm_s` issued while forward and backward run, which can overlap with them."""
    n, zero, m, channels = batch.shard_degree, batch.zero_stage, batch.microbatches, batch.dp_channel
    units = dp_units(batch)
    # Weights and gradients have the same size in bytes (both 16-bit in mixed precision, ZeRO sec. 3.1).
    unit_bytes = batch.device_params() * batch.weight_bytes / units
    # ZeRO 2/3 run on FSDP2: its per-unit collectives as measured, framework work included, where profiled.
    gather = units * comm.all_gather_s(unit_bytes, n, channels.fsdp_gather)
    scatter = units * comm.reduce_scatter_s(unit_bytes, n, channels.fsdp_scatter)
    return np.select(
        [zero <= 1, zero == 2],
        [units * comm.all_reduce_s(unit_bytes, n, channels.bare), m * scatter + gather],
        m * (2 * gather + scatter),
    )


def dp_after_step_s(batch: PlanBatch) -> np.ndarray:
    """ZeRO-1's gather of the updated weights (one broadcast per owner, same bytes as an all-gather): it runs
    after the optimizer step, so nothing overlaps with it."""
    weight_bytes = batch.device_params() * batch.weight_bytes
    gather = comm.all_gather_s(weight_bytes, batch.shard_degree, batch.dp_channel.bare)
    return np.where(batch.zero_stage == 1, gather, 0.0)


def dp_units(batch: PlanBatch) -> np.ndarray:
    """How many pieces a device's data-parallel collectives come in: FSDP2 (ZeRO 2/3, and `replicate` for
    ZeRO 0 under TP or PP) wraps every block and then the root, one collective each (Zhao et al. 2023, sec. 3.2;
    executor/parallel/data.py); DDP and ZeRO-1 reduce the whole gradient in one bucketed pass. (N, pp)."""
    return np.where(on_fsdp2(batch), batch.blocks + 1, 1)


def on_fsdp2(batch: PlanBatch) -> np.ndarray:
    """Rows whose data parallelism runs on FSDP2: `fully_shard` for ZeRO 2/3, `replicate` for ZeRO 0 under TP or
    PP (executor/parallel/data.py); the rest run DDP, or nothing with a single data-parallel rank. (N, 1)."""
    pure_dp = (batch.tp == 1) & (batch.pp == 1)
    fsdp2 = (batch.zero_stage >= 2) | ((batch.zero_stage == 0) & ~pure_dp)
    return fsdp2 & (batch.shard_degree > 1)


def dp_comm_exposed_s(batch: PlanBatch) -> np.ndarray:
    """Gradient reduction runs in buckets while backward goes on (PyTorch DDP, Li et al. 2020, sec. 3.2.3;
    FSDP prefetching, Zhao et al. 2023). ZeRO 0/1 reduce during the last micro-batch's backward; ZeRO 2/3
    communicate every micro-batch and overlap with all of the step's compute. The last bucket (one layer's
    share) can never overlap, nor can ZeRO-1's gather after the optimizer step. Without overlap (Megatron-LM
    before 2023) all of it is exposed."""
    hideable = dp_during_backward_s(batch)
    last_backward = batch.per_device("backward_s") + batch.per_device("recompute_s")
    every_microbatch = batch.microbatches * (batch.per_device("forward_s") + batch.per_device("backward_s"))
    window = np.where(batch.zero_stage <= 1, last_backward, every_microbatch)
    overlapped = np.maximum(hideable - window, hideable / batch.layers_on_device())
    # How much of what could be hidden a run does hide: calibrated, else measured by the profile (`calibrated_overlap`).
    hidden = calibrated_overlap(batch.measured) * (hideable - overlapped)
    can_hide = batch.overlap_grad_reduce & (hideable > 0) & ~blocking_fsdp2(batch)
    exposed = np.where(can_hide, hideable - hidden, hideable)
    return exposed + dp_after_step_s(batch)


def blocking_fsdp2(batch: PlanBatch) -> np.ndarray:
    """Rows whose FSDP2 collectives block the rank. FSDP2 overlaps its all-gathers and reduce-scatters with compute
    by issuing them on their own CUDA streams, as synchronous calls (torch/distributed/fsdp/_fully_shard/
    _fsdp_collectives.py `foreach_reduce`: the reduce-scatter without `async_op`; Zhao et al. 2023 sec. 4 on the
    streams); on a CPU, where streams are no-ops, a synchronous gloo collective holds the rank until it is done,
    so none of it hides. DDP's bucket all-reduces are asynchronous everywhere. (N, 1)."""
    return on_fsdp2(batch) & (batch.cluster.gpu.kind == "cpu")


def calibrated_overlap(measured: ProfileCosts | None) -> float:
    """The share of hideable gradient reduction that runs hide: fitted by a calibration, else measured by the
    profile (profiler/collectives.py measure_overlap), else 1."""
    return 1.0 if measured is None else measured.overlap


def step_overhead_s(measured: ProfileCosts | None) -> float:
    """Framework seconds per step beyond what its layers, collectives and optimizer account for, fitted by a
    calibrated profile (planner/calibration.py); 0 otherwise."""
    return 0.0 if measured is None else measured.step_overhead_s


def microbatch_overhead_s(measured: ProfileCosts | None) -> float:
    """Framework seconds per micro-batch on each device beyond its layers' time, fitted by a calibrated profile
    (planner/calibration.py); 0 otherwise. It lies on the micro-batch's critical path, so it adds to the busy
    time the pipeline bubble is made of."""
    return 0.0 if measured is None else measured.microbatch_overhead_s


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


def optimizer_step_s(batch: PlanBatch) -> np.ndarray:
    """The optimizer is memory-bound (roofline, Williams et al. 2009): bytes touched / achievable HBM
    bandwidth, on this rank's shard only under ZeRO >= 1 (Rajbhandari et al. 2020, sec. 5.1). (N, pp).
    With a profile that timed this optimizer: its measured seconds per parameter instead, as timed on DTensor
    shards for plans whose parameters are DTensors (`holds_dtensors`; profiler/compute.py `measure_optimizer`)."""
    training, gpu = batch.training, batch.cluster.gpu
    params = batch.device_params() / np.where(batch.zero_stage >= 1, batch.shard_degree, 1)
    plain_s = measured_optimizer_s_per_param(batch.cluster, batch.measured, training.optimizer)
    if plain_s is not None:
        sharded_s = measured_optimizer_s_per_param(batch.cluster, batch.measured, training.optimizer, sharded=True)
        return params * np.where(holds_dtensors(batch), sharded_s, plain_s)
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


def holds_dtensors(batch: PlanBatch) -> np.ndarray:
    """Rows whose parameters are DTensors: sharded by tensor parallelism or wrapped by FSDP2 (executor/apply.py).
    (N, 1)."""
    return (batch.tp > 1) | on_fsdp2(batch)


def profile_sources(kinds: LayerKinds, batch: PlanBatch, plan: ParallelPlan) -> tuple[dict[str, str], list[str]]:
    """Which model each time term came from with a profile attached ("profile", "analytic", or "profile+analytic"
    when its layers mixed both), and a note for every layer the profile could not answer."""
    layers = (kinds.embedding, kinds.block, kinds.head)
    layer_sources = {cost.time_source for cost in layers}
    compute = layer_sources.pop() if len(layer_sources) == 1 else "profile+analytic"
    cluster, measured = batch.cluster, batch.measured
    degrees = (plan.pp, plan.dp, plan.cp, plan.tp, cluster.gpus_per_node)
    optimizer = measured_optimizer_s_per_param(cluster, measured, batch.training.optimizer) is not None
    sources = {
        "compute_s": compute,
        "bubble_s": compute,
        "tp_comm_s": comm.channel_source(measured, placement("tp", *degrees)),
        "dp_comm_s": comm.channel_source(measured, placement("dp_cp", *degrees)),
        "cp_comm_s": comm.channel_source(measured, placement("cp", *degrees), p2p=True),
        "pp_comm_s": comm.channel_source(measured, placement("pp", *degrees), p2p=True),
        "optimizer_s": "profile" if optimizer else "analytic",
        "memory": "profile" if batch.executor_memory else "analytic",
    }
    notes = [cost.time_note for cost in layers if cost.time_note]
    if plan.tp > 1 and not np.any(kinds.block.tp_comm_s):
        sources["tp_comm_s"] = "profile"
        notes.append("tensor-parallel collectives were timed inside the layers, on tp ranks: compute_s holds them")
    return sources, notes


# ------------------------------------------------------------------------------------------- memory


def device_memory(batch: PlanBatch) -> dict[str, np.ndarray]:
    """Each device's peak bytes by what holds them: MEMORY_TERMS -> (N, pp). As the executor holds it
    (`executor_memory`), the peak is the larger of the forward/backward one, which may come before any gradient
    exists (`executor_gradients_at_activation_peak`), and the optimizer step's, which holds no activations but its
    own temporaries (memory.optimizer_step_extra_bytes); the terms are those of the phase that peaks."""
    training = batch.training
    executor = batch.executor_memory
    states = memory.model_state_bytes(
        batch.device_params(), training.precision, training.optimizer, batch.zero_stage, batch.shard_degree,
        fp32_weights=executor,
    )  # fmt: skip
    weights = states.weights + zero_working_copies(batch, "weights")
    grads = states.grads + zero_working_copies(batch, "grads")
    activations = activation_bytes(batch)
    optimizer = np.broadcast_to(states.optimizer, weights.shape)
    if executor:
        stepped = batch.device_params() / np.where(batch.zero_stage >= 1, batch.shard_degree, 1)
        extra = memory.optimizer_step_extra_bytes(stepped, training.optimizer)
        held = np.where(executor_gradients_at_activation_peak(batch), grads, 0.0)
        in_step = grads + extra > held + activations
        activations, optimizer = np.where(in_step, 0.0, activations), np.where(in_step, optimizer + extra, optimizer)
        grads = np.where(in_step, grads, held)
    allocated = weights + grads + optimizer + activations
    other = memory.overhead_bytes(allocated, communicators(batch), batch.cluster.gpu.kind)
    return {
        "params_bytes": weights,
        "grads_bytes": grads,
        "optimizer_bytes": optimizer,
        "activations_bytes": activations,
        "other_bytes": other,
    }


def executor_gradients_at_activation_peak(batch: PlanBatch) -> np.ndarray:
    """Whether each device holds its gradients at its activation peak as the executor trains
    (memory.gradients_at_activation_peak); DDP's buckets hold them throughout. (N, pp)."""
    device = np.arange(batch.pp)[None, :]
    ddp = (batch.shard_degree > 1) & ~on_fsdp2(batch)
    return memory.gradients_at_activation_peak(batch.schedule, device, batch.pp, batch.microbatches, ddp)


def zero_working_copies(batch: PlanBatch, kind: str) -> np.ndarray:
    """FSDP's unsharded working copies: ZeRO-3 gathers the block in use and prefetches the next (2 blocks of
    16-bit weights); ZeRO-2/3 hold one block's full gradient until its reduce-scatter (Zhao et al. 2023)."""
    weight_bytes = memory.weight_bytes_per_param(batch.training.precision, batch.executor_memory)
    block_bytes = (batch.blocks > 0) * batch.block.params_per_gpu * weight_bytes
    if kind == "weights":
        return np.where(batch.zero_stage == 3, 2 * block_bytes, 0.0)
    return np.where(batch.zero_stage >= 2, block_bytes, 0.0)


def activation_bytes(batch: PlanBatch) -> np.ndarray:
    """Saved activations of every micro-batch in flight, plus what layers hold once whatever is in flight
    (`LayerCost.cached_bytes`), plus one layer's rematerialised working set."""
    device = np.arange(batch.pp)[None, :]
    has_embedding, has_head = edge_masks(batch.pp)

    def held(kind: str, count: np.ndarray) -> np.ndarray:
        inflight = memory.layer_inflight(
            kind, batch.schedule, device, batch.pp, batch.virtual_stages, batch.microbatches
        )
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
    """NCCL communicators a rank joins: one per group of size > 1, two for its pipeline neighbours."""
    groups = (batch.tp > 1).astype(int) + (batch.cp > 1) + (batch.shard_degree > 1)
    return groups + (2 if batch.pp > 1 else 0) + int(batch.tied_copy)


# ------------------------------------------------------------------------------------------ summary


def summarise(batch: PlanBatch, result: BatchEstimate, row: int, plan: ParallelPlan) -> StepEstimate:
    """Row `row` of a batch result as the contract's StepEstimate (`plan` is that row's plan)."""
    model, training, cluster = batch.model, batch.training, batch.cluster
    breakdown = TimeBreakdown(**{term: float(result.time_s[term][row]) for term in TIME_TERMS})
    mem = memory_of_row(batch, result, row)
    step_s = breakdown.total_s
    gpus = cluster.num_gpus
    peak = cluster.gpu.peak_tflops[training.precision] * 1e12
    model_flops = flops.model_flops_per_step(model, training)
    hardware_flops = flops.hardware_flops_per_step(model, training, plan.recompute)
    over = [stage for stage in mem.by_stage if stage.over_bytes > 0]
    return StepEstimate(
        step_time_s=step_s,
        tokens_per_s=training.tokens_per_step / step_s,
        tokens_per_s_per_gpu=training.tokens_per_step / step_s / gpus,
        model_tflops_per_gpu=model_flops / step_s / gpus / 1e12,
        hardware_tflops_per_gpu=hardware_flops / step_s / gpus / 1e12,
        mfu=model_flops / step_s / gpus / peak,
        hfu=hardware_flops / step_s / gpus / peak,
        fits=not over,
        num_microbatches=int(batch.microbatches[row, 0]),
        memory=mem,
        breakdown=breakdown,
        sources={term: "analytic" for term in TimeBreakdown.model_fields} | {"memory": "analytic"},
        why_not_fits=[_over_message(stage) for stage in over],
        assumptions=_assumptions(cluster, batch.measured, training, plan),
    )


def memory_of_row(batch: PlanBatch, result: BatchEstimate, row: int) -> MemoryEstimate:
    capacity = float(batch.cluster.gpu.memory_bytes)
    stages = []
    for device in range(batch.pp):
        terms = {term: float(result.memory_bytes[term][row, device]) for term in MEMORY_TERMS}
        total = sum(terms.values())
        stages.append(
            StageMemory(
                stage=device,
                layers=int(batch.blocks[row, device]),
                **terms,
                total_bytes=total,
                capacity_bytes=capacity,
                over_bytes=max(0.0, total - capacity),
            )
        )
    peak = max(stages, key=lambda s: s.total_bytes)
    return MemoryEstimate(peak_bytes=peak.total_bytes, peak_stage=peak.stage, capacity_bytes=capacity, by_stage=stages)


def _over_message(stage: StageMemory) -> str:
    return (
        f"stage {stage.stage} needs {stage.total_bytes / GiB:.2f} GiB but the GPU has "
        f"{stage.capacity_bytes / GiB:.2f} GiB: over by {stage.over_bytes:,.0f} bytes "
        f"({stage.over_bytes / GiB:.2f} GiB)"
    )


def _memory_assumption(measured: bool) -> str:
    if not measured:
        return "memory is analytic"
    return ("activation memory as measured, with the executor's fp32 weights (4 + 4 bytes a parameter for weights "
            "and gradients, the optimizer's own state, AdamW's step temporaries)")  # fmt: skip


def _assumptions(
    cluster: ClusterSpec, measured: ProfileCosts | None, training: TrainingSpec, plan: ParallelPlan
) -> list[str]:
    gpu = cluster.gpu
    if measured is None:
        speeds = (
            f"matmuls at {gpu.matmul_efficiency:.0%} of {gpu.name} peak, element-wise ops at "
            f"{gpu.memory_efficiency:.0%} of its HBM bandwidth (GPU preset)"
        )
    else:
        profile = measured.profile
        speeds = (
            f"times measured on {profile.device_name} ({profile.created}, torch {profile.torch_version}); "
            "terms the profile cannot answer use the GPU preset's speeds; "
            + _memory_assumption(measured.measures_memory)
        )
        if profile.calibration is not None:
            fitted = profile.calibration
            speeds += (
                f"; calibrated on {fitted.num_runs} measured runs ({fitted.created}, step-time error "
                f"{fitted.fit_mape:.0%} on them)"
            )
    notes = [speeds, f"{training.attention_kernel} attention"]
    if plan.tp > 1:
        notes.append("tensor-parallel collectives are not overlapped with compute (Megatron-LM default)")
    if plan.dp * plan.cp > 1:
        overlap = "overlaps" if plan.overlap_grad_reduce else "does not overlap"
        notes.append(f"gradient reduction {overlap} with backward")
    return notes


def layer_costs(
    request: dict[str, Any] | EstimateRequest, resolve_profile: ProfileResolver | None = None
) -> list[LayerCost]:
    """The per-layer records behind an estimate (for explanations and for comparing with a profile)."""
    req = parse_estimate_request(request, resolve_profile)
    require_valid(req.plan, req.model, req.training, req.cluster)
    return layers_in_order(layer_graph(req.model, req.training, req.cluster, req.plan, req.measured))
