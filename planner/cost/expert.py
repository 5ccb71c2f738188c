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
from planner.specs import ModelSpec

if TYPE_CHECKING:
    from planner.cost.batch import PlanBatch

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


def tokens_per_rank(batch: PlanBatch) -> np.ndarray:
    """Tokens one rank routes per micro-batch: its sequence shard (s / cp) of the micro-batch, split over tp, since
    Megatron-Core runs MoE with tensor parallelism only under sequence parallelism (its arguments check: "sequence
    parallelism must be enabled" with MoE and tp > 1). (N, 1)."""
    return batch.micro_batch_size * batch.training.seq_len / (batch.cp * batch.tp)


def ep_layer_comm_s(batch: PlanBatch) -> np.ndarray:
    """One MoE layer's all-to-alls for one micro-batch on one rank (`comm.all_to_all_s` over the ep group's channel).
    0 where ep = 1 or the model is dense. (N, 1)."""
    if batch.model.num_experts == 1:
        return np.zeros_like(batch.ep, dtype=float)
    elem = ops.ACTIVATION_BYTES[batch.training.precision]
    size = dispatch_bytes(batch.model, tokens_per_rank(batch), elem)
    return all_to_alls_per_layer(batch.recompute) * comm.all_to_all_s(size, batch.ep, batch.ep_channel)


def ep_device_comm_s(batch: PlanBatch) -> np.ndarray:
    """Each device's all-to-all seconds per micro-batch: every block of a MoE model is a MoE layer. (N, pp)."""
    return batch.blocks * ep_layer_comm_s(batch)
