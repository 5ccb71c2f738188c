"""Candidate plans as numpy columns: the one input every cost term reads.

A `PlanBatch` holds candidate plans that share a pipeline depth, one row each; per-row columns are (N, 1) arrays
so they broadcast against per-device values (N, pp). `estimate_step` builds a batch of one (planner/cost/step.py);
the search builds batches of hundreds of thousands of rows (planner/search/evaluate.py). The batch carries the
request's measured profile and its training-stack regime (planner/cost/runtime.py) explicitly.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from functools import cached_property
from typing import Any

import numpy as np

from planner.cost import comm, params
from planner.cost.comm import Channel, DpChannels
from planner.cost.layers import LayerCost, LayerKinds, layer_kinds
from planner.cost.measured import ProfileCosts
from planner.cost.pipeline import blocks_per_device, edge_masks
from planner.cost.runtime import Runtime, runtime_for
from planner.layout import GroupAxis, GroupPlacement, placement
from planner.specs import ClusterSpec, Degrees, ModelSpec, ParallelPlan, TrainingSpec


def _column(values: Any, dtype: Any = None) -> np.ndarray:
    return np.asarray(values, dtype=dtype).reshape(-1, 1)


KIND_COLUMNS_DERIVED = ("params_per_gpu",)  # KindColumns fields that are not LayerCost's, matched by name


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
    forward_slack_s: np.ndarray
    backward_slack_s: np.ndarray
    params_per_gpu: np.ndarray  # derived by `of`; every other field is the LayerCost field of its name

    @classmethod
    def of(cls, costs: list[LayerCost], tp: np.ndarray) -> KindColumns:
        """Stack LayerCosts (`tp`: each one's tp degree). A cost whose fields are arrays over W micro-batch
        sizes (layers.layer_kinds) contributes W consecutive rows."""
        width = max(np.size(cost.forward_s) for cost in costs)

        def stacked(values: list[Any]) -> np.ndarray:
            rows = np.empty((len(values), width))
            for row, value in zip(rows, values, strict=True):
                row[:] = value  # a number fills the row; an array over the sizes is copied
            return rows.reshape(-1, 1)

        copied = [f.name for f in fields(cls) if f.name not in KIND_COLUMNS_DERIVED]
        column = {name: stacked([getattr(cost, name) for cost in costs]) for name in copied}
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
    runtime: Runtime  # the training stack that runs the plans (planner/cost/runtime.py `runtime_for`)
    pp: int
    dp: np.ndarray
    tp: np.ndarray
    cp: np.ndarray
    ep: np.ndarray  # expert parallelism: experts split over ep ranks of the dp x cp group (1 for a dense model)
    zero_stage: np.ndarray
    micro_batch_size: np.ndarray
    schedule: np.ndarray  # strings
    recompute: np.ndarray  # strings: "none", "selective" or "full"
    virtual_stages: np.ndarray
    overlap_grad_reduce: np.ndarray  # bools
    offload: np.ndarray  # strings: the plan's `offload` (planner/cost/offload.py)
    microbatches: np.ndarray
    blocks: np.ndarray  # (N, pp): blocks on each device, all of its chunks together
    embedding: KindColumns
    block: KindColumns
    head: KindColumns
    dp_channel: DpChannels  # bus bandwidths and latencies as (N, 1) columns
    pp_channel: Channel
    tp_channel: Channel
    ep_channel: Channel  # the all-to-all's channel over each row's ep group (comm.all_to_all_channel)
    edp_channel: Channel  # the ring channel over the ranks holding the same experts (their gradients' reduction)

    @classmethod
    def of_plan(
        cls,
        model: ModelSpec,
        training: TrainingSpec,
        cluster: ClusterSpec,
        plan: ParallelPlan,
        kinds: LayerKinds | None = None,
        measured: ProfileCosts | None = None,
        runtime: Runtime | None = None,
    ) -> PlanBatch:
        """A batch of one, for `estimate_step` (`kinds`: the plan's layer costs, if already computed; `runtime`:
        the request's regime, by default `runtime_for` the cluster and profile)."""
        kinds = kinds or layer_kinds(model, training, cluster, plan, measured=measured, runtime=runtime)
        return cls(
            model=model,
            training=training,
            cluster=cluster,
            measured=measured,
            runtime=runtime or runtime_for(cluster, measured, training.framework),
            pp=plan.pp,
            dp=_column(plan.dp),
            tp=_column(plan.tp),
            cp=_column(plan.cp),
            ep=_column(plan.ep),
            zero_stage=_column(plan.zero_stage),
            micro_batch_size=_column(plan.micro_batch_size),
            schedule=_column(plan.schedule),
            recompute=_column(plan.recompute),
            virtual_stages=_column(plan.virtual_stages),
            overlap_grad_reduce=_column(plan.overlap_grad_reduce),
            offload=_column(plan.offload),
            microbatches=_column(plan.num_microbatches(training)),
            blocks=blocks_per_device(plan.stage_layer_counts(model.num_layers), plan.pp)[None, :],
            **kind_columns([kinds], _column(plan.tp)),
            **group_channels(cluster, [plan.degrees], measured, [plan.ep]),
        )

    @property
    def shard_degree(self) -> np.ndarray:
        """ZeRO partitions over the gradient-reduction group: dp x cp (Megatron-LM, FSDP over dp_cp)."""
        return self.dp * self.cp

    @property
    def expert_shard_degree(self) -> np.ndarray:
        """The ranks an expert's gradients are reduced and its ZeRO states sharded over: edp = dp x cp / ep
        (ParallelPlan.expert_data_parallel; Megatron-Core's expert data-parallel group). (N, 1)."""
        return self.shard_degree // self.ep

    @cached_property
    def on_fsdp2(self) -> np.ndarray:
        """Rows whose data parallelism runs on FSDP2 in this regime (Runtime.on_fsdp2). (N, 1). Computed once per
        batch: the memory, communication and offload terms all ask."""
        return self.runtime.on_fsdp2(self.zero_stage, self.tp, self.pp, self.shard_degree)

    @property
    def fsdp2_pipelined(self) -> np.ndarray:
        """Rows whose FSDP2 units run inside torch.distributed.pipelining, reducing their gradients once a step
        (Runtime.fsdp2_in_torch_pipelining). (N, 1)."""
        return self.on_fsdp2 & (self.pp > 1) & self.runtime.fsdp2_in_torch_pipelining

    @property
    def weights_sharded(self) -> np.ndarray:
        """Rows whose weights ZeRO shards: ZeRO-3, and ZeRO-2 on FSDP2's `fully_shard` (Runtime.zero2_shards_weights),
        which gathers a copy to compute with (planner/cost/memory.py `zero_working_copies`). (N, 1)."""
        fsdp2_zero2 = (self.zero_stage == 2) & self.on_fsdp2 & self.runtime.zero2_shards_weights
        return (self.zero_stage >= 3) | fsdp2_zero2

    @property
    def holds_dtensors(self) -> np.ndarray:
        """Rows whose parameters are DTensors: sharded by tensor parallelism or wrapped by FSDP2 (executor/apply.py),
        where the regime's parameters are DTensors at all (Runtime.dtensor_parameters). (N, 1)."""
        return ((self.tp > 1) | self.on_fsdp2) & self.runtime.dtensor_parameters

    @property
    def tied_copy(self) -> bool:
        """With tied embeddings and pp > 1 the last device keeps its own copy of the word embedding, kept in
        sync by an all-reduce of its gradient with the first device (Megatron-LM, Shoeybi et al. 2019)."""
        return self.model.tie_embeddings and self.pp > 1

    def per_device(self, quantity: str) -> np.ndarray:
        """A KindColumns quantity summed over each device's layers: (N, pp), read-only. Computed once per batch
        and quantity (kept in the instance's __dict__, which `dataclasses.replace` does not carry over): the time,
        memory and communication terms read the same sums."""
        cache = self.__dict__.setdefault("_per_device", {})
        if quantity not in cache:
            # The embedding sits on the first device, the head on the last (pipeline.edge_masks): added in place
            # to those columns, in the order the masked sum blocks + embedding + head would add them.
            total = self.blocks * getattr(self.block, quantity)
            total[:, 0] += getattr(self.embedding, quantity)[:, 0]
            total[:, -1] += getattr(self.head, quantity)[:, 0]
            total.flags.writeable = False
            cache[quantity] = total
        return cache[quantity]

    def device_params(self) -> np.ndarray:
        """Parameters each device holds per GPU (its tp shard, and its 1/ep of the experts): (N, pp). Computed once
        per batch: the memory, optimizer and offload terms all read it."""
        return self._device_params

    @cached_property
    def _device_params(self) -> np.ndarray:
        count = self.per_device("params_per_gpu")
        if self.has_experts:
            count = count - self.blocks * self._experts_elsewhere_per_block
        if self.tied_copy:
            _, has_head = edge_masks(self.pp)
            count = count + has_head * self.model.vocab_size * self.model.hidden_size / self.tp
        return count

    @property
    def has_experts(self) -> bool:
        """A mixture of experts: a dense model skips the expert terms below, which would all be zero (the search
        costs hundreds of thousands of rows, most of them dense)."""
        return self.model.num_experts > 1

    @cached_property
    def expert_params_per_block(self) -> np.ndarray:
        """One block's experts a GPU holds: all experts' MLPs over tp (Megatron-Core's default expert tensor
        parallelism is tp) and over ep; the router is dense, replicated. (N, 1)."""
        experts = params.experts_params(self.model)
        return (experts.sharded / self.tp + experts.replicated) / self.ep

    @property
    def _experts_elsewhere_per_block(self) -> np.ndarray:
        """The experts of a block the KindColumns count per GPU (all of them) that live on the other ep ranks."""
        return self.expert_params_per_block * (self.ep - 1)

    @property
    def block_params_per_gpu(self) -> np.ndarray:
        """One block's parameters on a GPU, its share of the experts only. (N, 1)."""
        return self.block.params_per_gpu - self._experts_elsewhere_per_block

    def device_expert_params(self) -> np.ndarray:
        """The experts' parameters each device holds per GPU (in `device_params`): (N, pp)."""
        return self.blocks * self.expert_params_per_block

    def params_per_shard(self, sharded: np.ndarray) -> np.ndarray:
        """Parameters a device keeps of what ZeRO shards where `sharded` ((N, 1) bools): the dense ones over dp x cp,
        the experts over edp (each edp group holds its own experts; Megatron-Core's distributed optimizer shards
        expert states over the expert data-parallel group). Elsewhere all of `device_params`. (N, pp)."""
        if not self.has_experts:
            return self.device_params() / np.where(sharded, self.shard_degree, 1)
        experts = self.device_expert_params()
        dense = self.device_params() - experts
        dense_shards = np.where(sharded, self.shard_degree, 1)
        return dense / dense_shards + experts / np.where(sharded, self.expert_shard_degree, 1)

    def layers_on_device(self) -> np.ndarray:
        has_embedding, has_head = edge_masks(self.pp)
        return self.blocks + has_embedding + has_head


def kind_columns(kinds: list[LayerKinds], tp: np.ndarray) -> dict[str, KindColumns]:
    """Per-row LayerKinds -> the batch's `embedding`, `block` and `head` columns."""
    return {kind: KindColumns.of([getattr(row, kind) for row in kinds], tp) for kind in ("embedding", "block", "head")}


def group_channels(
    cluster: ClusterSpec, layouts: list[Degrees], measured: ProfileCosts | None, eps: list[int]
) -> dict[str, DpChannels | Channel]:
    """The batch's `dp_channel`, `pp_channel`, `tp_channel`, `ep_channel` and `edp_channel`: what the
    gradient-reduction (dp x cp), pipeline, tensor-parallel and expert groups of each layout (with its ep, `eps`)
    see, placed on the cluster's nodes by planner/layout.py."""

    def groups(axis: GroupAxis) -> list[GroupPlacement]:
        return [placement(axis, degrees, cluster.gpus_per_node, ep) for degrees, ep in zip(layouts, eps, strict=True)]

    return {
        "dp_channel": dp_channel_columns([DpChannels.of(cluster, g, measured) for g in groups("dp_cp")]),
        "pp_channel": channel_columns([comm.p2p_channel(cluster, g, measured) for g in groups("pp")]),
        "tp_channel": channel_columns([comm.group_channel(cluster, g, measured) for g in groups("tp")]),
        "ep_channel": channel_columns([comm.all_to_all_channel(cluster, g, measured) for g in groups("ep")]),
        "edp_channel": channel_columns([comm.group_channel(cluster, g, measured) for g in groups("edp")]),
    }


def dp_channel_columns(channels: list[DpChannels]) -> DpChannels:
    return DpChannels(*(channel_columns([getattr(c, f.name) for c in channels]) for f in fields(DpChannels)))


def channel_columns(channels: list[Channel]) -> Channel:
    return Channel(
        bus_bandwidth_Bps=_column([c.bus_bandwidth_Bps for c in channels], float),
        latency_s=_column([c.latency_s for c in channels], float),
        ring_step_latency_s=_column([c.ring_step_latency_s for c in channels], float),
    )
