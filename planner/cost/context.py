"""Context parallelism's cost: what ring attention adds to a block beyond the attention compute itself.

Context parallelism splits every activation along the sequence over cp ranks (ops.Shape: s/cp tokens per rank);
only attention mixes tokens, so only attention communicates. This module follows the implementation Megatron-Core
runs by default (cp_comm_type "p2p"): TransformerEngine's `AttnFuncWithCPAndKVP2P`
(transformer_engine/pytorch/attention/dot_product_attention/context_parallel.py), which is ring attention (Liu et
al. 2023, "Ring Attention with Blockwise Transformers") with Megatron's causal load balancing:

- The sequence is cut into 2 x cp chunks and rank r holds chunks r and 2cp-1-r (`get_seq_chunk_ids_for_reordering_
  before_attn`, the "zigzag"). Each rank then runs cp steps, one per K/V shard of the ring: step 0 its own shard with
  a causal kernel (half of its 2 x 2 chunk products), every other step either its whole Q against the first half of
  the visiting K/V or the second half of its Q against all of it, non-causal: 2 chunk products each. Every step
  and every rank does the same work, 1/cp of the rank's causal attention (the per-step section table in
  `AttnFuncWithCPAndKVP2P.forward`; torch's `_templated_ring_attention` documents the same round-robin split). The
  FLOPs are those ops.py already counts for the rank's s/cp queries against all s keys, halved by the causal mask.
- Forward: while step i computes, the K/V shard of step i+1 is already on its way (`flash_attn_p2p_communicate`,
  issued before step i's kernel on a second stream): cp - 1 hops of one K/V shard, each hidden behind one step's
  attention kernel, exposed only by what it takes beyond it.
- Backward: while step i's backward kernel runs, the visiting K/V shard moves on round the ring together with the
  dK/dV accumulated for it so far, which the step waits for before adding its own: step 0 sends K/V only, the last
  step dK/dV only (home to the shard's owner), the cp - 2 in between both (`AttnFuncWithCPAndKVP2P.backward`).
- Merging: each forward step's partial output is rescaled by the running log-sum-exp and added into the output
  (`flash_attn_fwd_out_correction`); each backward step adds its dQ into dQ and its dK/dV into the travelling
  buffer. These element-wise passes are work a single-rank attention kernel does inside its registers.
- Recompute: Megatron checkpoints the attention core (selective) or the whole block (full); either reruns the core's
  forward, ring and merge included, during backward (Korthikanti et al. 2022 sec. 5).

Not modelled here: attention kernels on shards run on shorter sequences (s/cp queries against s/(2cp) keys per
step), where fused attention reaches less of its peak (Dao 2023, FlashAttention-2 sec. 4.1: throughput grows with
sequence length). The cost model has no shape-dependent attention efficiency yet (planner/cost/compute.py runs every
matmul at one efficiency); once it has, `ring_step` is where the per-step kernel shape would be costed. Nor are the
ring's transient buffers (cp received K/V shards and cp partial outputs alive until the merge) counted in memory,
nor Ulysses-style all-to-all context parallelism (cp_comm_type "a2a"), nor torch's experimental context parallel,
whose default rotater all-gathers K/V once instead of passing it round the ring.

paraplan's executor (executor/parallel/context.py) runs this variant: the same zigzag split, the same ring of
point-to-point K/V hops started before a step's attention and waited for after it, dK/dV travelling home in
backward (there cp - 1 hops, each carrying the K/V gradient alone: it keeps the visiting K/V of every step for
backward instead of passing them on again). Not costed here: its block attention is fp32 matmuls rather than a
fused kernel, slower and holding a [s/cp, s/cp] probability matrix per head and step; no profile measures it yet.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from planner.cost import comm, ops
from planner.cost.compute import Speeds, backward_s, forward_s
from planner.specs import ModelSpec, ParallelPlan

# One merge pass over a tensor: read the step's partial result, read the running sum, write it back
# (`flash_attn_fwd_out_correction`'s `out.add_(out_per_step * exp(lse_step - lse))`; `dq.add_(dq_)`, `dk.add_(dk_)`).
# The per-row log-sum-exp corrections are 1/head_size of that and are left out.
MERGE_PASSES = 3


@dataclass(frozen=True)
class RingStep:
    """One step of the ring for one micro-batch on one GPU (numbers, or arrays over micro-batch sizes)."""

    kv_bytes: Any  # this rank's K and V shard: what one hop carries (dK/dV hops carry as much)
    forward_s: Any  # the attention kernel of one step, forward: the window a forward hop hides behind
    backward_s: Any  # the same, backward
    output_bytes: Any  # this rank's attention output (and dQ): what each step merges, with the K/V gradients


def ring_step(
    model: ModelSpec, plan: ParallelPlan, shape: ops.Shape, speeds: Speeds, block: list[ops.OpCost]
) -> RingStep:
    """Every step does 1/cp of the rank's attention work (the load-balanced split, module docstring), so one step's
    kernel time is the attention core's time over cp."""
    core = [op for op in block if op.attention_core]
    return RingStep(
        kv_bytes=shape.elem * shape.tokens * 2 * model.kv_size / plan.tp,
        forward_s=sum(forward_s(op, speeds) for op in core) / plan.cp,
        backward_s=sum(backward_s(op, speeds) for op in core) / plan.cp,
        output_bytes=shape.elem * shape.tokens * model.q_size / plan.tp,
    )


def forward_hops_exposed_s(step: RingStep, cp: int, channel: comm.Channel, hidden_share: float = 1.0) -> Any:
    """cp - 1 hops of one K/V shard, each overlapping one step's kernel: only the excess is exposed, and the share of
    the overlapped time the kernel loses to the transfer (`_exposed`)."""
    return (cp - 1) * _exposed(comm.p2p_s(step.kv_bytes, channel), step.forward_s, hidden_share)


def backward_hops_exposed_s(step: RingStep, cp: int, channel: comm.Channel, hidden_share: float = 1.0) -> Any:
    """cp hops, each overlapping one step's backward kernel: the first carries K/V, the last dK/dV, the cp - 2
    between them both."""
    single = _exposed(comm.p2p_s(step.kv_bytes, channel), step.backward_s, hidden_share)
    double = _exposed(comm.p2p_s(2 * step.kv_bytes, channel), step.backward_s, hidden_share)
    return 2 * single + (cp - 2) * double


def forward_merge_s(step: RingStep, cp: int, speeds: Speeds) -> Any:
    """cp partial outputs merged into the output, one element-wise pass each (memory-bound: the roofline's HBM
    side, Williams et al. 2009)."""
    return cp * MERGE_PASSES * step.output_bytes / speeds.memory_bytes_per_s


def backward_merge_s(step: RingStep, cp: int, speeds: Speeds) -> Any:
    """cp partial dQ and dK/dV added up, one pass each. Counted at full size on every step: the last rank's steps all
    see its whole Q (its dQ is full-size), rank 0's all see whole K/V shards, so no rank merges more."""
    return cp * MERGE_PASSES * (step.output_bytes + step.kv_bytes) / speeds.memory_bytes_per_s


def ring_attention_s(
    model: ModelSpec,
    plan: ParallelPlan,
    shape: ops.Shape,
    speeds: Speeds,
    channel: comm.Channel,
    block: list[ops.OpCost],
    hidden_share: float = 1.0,
) -> Any:
    """Seconds one block spends per micro-batch on context parallelism beyond its attention compute: hops not hidden
    behind a step's kernel and the merges, forward (once more when recompute reruns the core) and backward. 0 at
    cp = 1. `channel`: the cp ring's point-to-point channel; `hidden_share`: the share of an overlapped transfer's
    time that stays hidden (planner/cost/measured.py `hidden_share`)."""
    if plan.cp == 1:
        return 0.0
    step = ring_step(model, plan, shape, speeds, block)
    forward = forward_hops_exposed_s(step, plan.cp, channel, hidden_share) + forward_merge_s(step, plan.cp, speeds)
    backward = backward_hops_exposed_s(step, plan.cp, channel, hidden_share) + backward_merge_s(step, plan.cp, speeds)
    return (1 + reruns_attention_core(plan.recompute)) * forward + backward


def reruns_attention_core(recompute: str) -> int:
    """Forward passes of the attention core repeated in backward: selective recompute reruns the core, full recompute
    the whole block (Korthikanti et al. 2022 sec. 5; compute.recompute_s)."""
    return int(recompute in ("selective", "full"))


def _exposed(hop_s: Any, window_s: Any, hidden_share: float = 1.0) -> Any:
    """A hop's time beyond the kernel it overlaps, plus what the kernel loses to it while they overlap: all but
    `hidden_share` of the overlapped time (NCCL's SMs and memory traffic beside the kernel)."""
    return hop_s - hidden_share * np.minimum(hop_s, window_s)
