"""Expert parallelism's communication: the token dispatch and combine all-to-alls of every mixture-of-experts layer.

Each MoE layer sends every routed token to the rank that holds its expert and brings the expert's output back: an
all-to-all over the ep group each way in forward, and the two again (swapped) in backward (Lepikhin et al. 2020,
GShard, sec. 3.2; Fedus et al. 2021, Switch Transformer, sec. 2.2 and fig. 3; Rajbhandari et al. 2022,
DeepSpeed-MoE, sec. 5.1; Megatron-Core's `MoEAlltoAllTokenDispatcher`; executor/parallel/expert.py does the
same). A rank sends its tokens x k copies of a hidden vector, (ep - 1)/ep of them off-rank. Drop-less routing
(executor/models/routing.py, Megatron-Core's default) sends exactly the routed rows: a capacity factor of 1.0;
stacks that pad every expert to a fixed capacity send capacity_factor times as much (Switch sec. 2.2).

Per rank the experts' compute does not change with ep: ep ranks hold E/ep experts each and receive, on average,
the k x tokens the group routes to them, as many rows as one rank computes with ep = 1 (planner/cost/ops.py
`mlp_ops`). Balanced routing is assumed (the Switch load-balancing loss's aim); a skewed router makes the busiest
rank slower, which this does not model. Per-row values are (N, 1), per-device ones (N, pp) (planner/cost/batch.py).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from planner.cost import comm, ops
from planner.layout import placement
from planner.specs import ClusterSpec, ModelSpec, ParallelPlan, TrainingSpec

if TYPE_CHECKING:
    from planner.cost.batch import PlanBatch
    from planner.cost.measured import ProfileCosts

# Drop-less routing sends exactly the rows routed (Megatron-Core's default, `--moe-expert-capacity-factor` unset,
# and the executor's routing): no padding.
DROPLESS_CAPACITY_FACTOR = 1.0


def dispatch_bytes(model: ModelSpec, tokens, elem_bytes: int, capacity_factor: float = DROPLESS_CAPACITY_FACTOR):
    """Bytes one rank's dispatch all-to-all takes in: each of its `tokens` goes to `experts_per_token` experts as a
    hidden vector (GShard sec. 3.2), times the capacity factor where experts are padded (Switch sec. 2.2)."""
    return tokens * model.experts_per_token * model.hidden_size * elem_bytes * capacity_factor


def all_to_alls_per_layer(recompute) -> np.ndarray:
    """All-to-alls per MoE layer and micro-batch: dispatch and combine in forward and in backward (4); full
    recomputation runs the forward pair again (Korthikanti et al. 2022, sec. 5, as for tensor parallelism)."""
    return np.where(np.asarray(recompute) == "full", 6, 4)


def tokens_per_rank(micro_batch_size, seq_len: int, cp, tp):
    """Tokens one rank routes per micro-batch: its sequence shard (s / cp) of the micro-batch, split over tp, since
    Megatron-Core runs MoE with tensor parallelism only under sequence parallelism (its arguments check: "sequence
    parallelism must be enabled" with MoE and tp > 1). Numbers or (N, 1) columns."""
    return micro_batch_size * seq_len / (cp * tp)


def layer_all_to_alls_s(model: ModelSpec, precision: str, tokens, recompute, ep, channel: comm.Channel):
    """One MoE layer's all-to-alls for one micro-batch on one rank that routes `tokens`: `all_to_alls_per_layer` of
    `dispatch_bytes` each over the ep group's channel (`comm.all_to_all_s`, 0 where ep = 1). Numbers or (N, 1)
    columns: the one formula the step's term (`ep_layer_comm_s`) and the pipeline schedule
    (`plan_ep_layer_comm_s`) share."""
    size = dispatch_bytes(model, tokens, ops.ACTIVATION_BYTES[precision])
    return all_to_alls_per_layer(recompute) * comm.all_to_all_s(size, ep, channel)


def ep_layer_comm_s(batch: PlanBatch) -> np.ndarray:
    """One MoE layer's all-to-alls for one micro-batch on one rank (`layer_all_to_alls_s` over each row's ep
    channel). 0 where ep = 1 or the model is dense. (N, 1)."""
    if batch.model.num_experts == 1:
        return np.zeros_like(batch.ep, dtype=float)
    model, training = batch.model, batch.training
    tokens = tokens_per_rank(batch.micro_batch_size, training.seq_len, batch.cp, batch.tp)
    return layer_all_to_alls_s(model, training.precision, tokens, batch.recompute, batch.ep, batch.ep_channel)


def ep_device_comm_s(batch: PlanBatch) -> np.ndarray:
    """Each device's all-to-all seconds per micro-batch: every block of a MoE model is a MoE layer. (N, pp)."""
    return batch.blocks * ep_layer_comm_s(batch)


def plan_ep_layer_comm_s(
    model: ModelSpec,
    training: TrainingSpec,
    cluster: ClusterSpec,
    plan: ParallelPlan,
    measured: ProfileCosts | None = None,
) -> float:
    """`ep_layer_comm_s` of one plan, as a number: what each block of the pipeline schedule (planner/cost/
    schedule.py) adds per micro-batch, over the channel the batch's `ep_channel` holds for it (planner/cost/batch.py
    `group_channels`). 0 where ep = 1 or the model is dense."""
    if model.num_experts == 1 or plan.ep == 1:
        return 0.0
    group = placement("ep", plan.degrees, cluster.gpus_per_node, plan.ep)
    channel = comm.all_to_all_channel(cluster, group, measured)
    tokens = tokens_per_rank(plan.micro_batch_size, training.seq_len, plan.cp, plan.tp)
    return float(layer_all_to_alls_s(model, training.precision, tokens, plan.recompute, plan.ep, channel))
