"""Context parallelism's cost (planner/cost/context.py) against hand-computed values, and what the search makes of it:
CP where nothing needs it loses to a simpler layout, CP where memory forces it is still chosen; near ties go to the
simpler layout (planner/search/rank.py)."""

from __future__ import annotations

import numpy as np
import pytest

import planner
from planner.cost import comm, context, ops
from planner.cost.compute import Speeds
from planner.cost.runtime import OVERLAPPED_COLLECTIVE_HIDDEN_SHARE
from planner.cost.step import estimate_step
from planner.request import parse_estimate_request
from planner.search.rank import LAYOUT_TIE_TOLERANCE, simplest_first
from planner.search.solve import _runner_up
from planner.specs import ModelSpec, ParallelPlan

# A small GQA model: q_size = 8 x 128 = 1024, kv_size = 2 x 128 = 256.
MODEL = ModelSpec(num_layers=2, hidden_size=1024, num_attention_heads=8, num_kv_heads=2, vocab_size=1000, mlp="swiglu")
SEQ, CP = 4096, 4
TOKENS = SEQ // CP  # one sequence (micro-batch 1), this rank's quarter
SHAPE = ops.Shape(tokens=TOKENS, seq=TOKENS, key_len=SEQ, heads=8, tp=1, sp_div=1, elem=2, mask=1)
SPEEDS = Speeds(matmul_flops_per_s=100e12, memory_bytes_per_s=1e12)
RING = comm.Channel(bus_bandwidth_Bps=40e9, latency_s=10e-6)
# The flash attention core: 4 x tokens x key_len x q_size FLOPs (ops._core_flops); a projection beside it that the
# ring ignores (not attention_core).
CORE_FLOPS = 4 * TOKENS * SEQ * 1024
BLOCK = [
    ops.OpCost("qkv_proj", 1e12, 0.0, 0.0),
    ops.OpCost("flash_attention", CORE_FLOPS, 0.0, 0.0, attention_core=True, flash=True),
]

KV_BYTES = 2 * TOKENS * 2 * 256  # bf16 K and V of 1,024 tokens: 1,048,576 bytes
OUTPUT_BYTES = 2 * TOKENS * 1024  # bf16 attention output: 2,097,152 bytes
STEP_FORWARD_S = CORE_FLOPS * 0.5 / 100e12 / CP  # causal half, one step of four: 21.47 us
STEP_BACKWARD_S = STEP_FORWARD_S * 2.5  # FlashAttention-2's backward: 53.69 us
HOP_S = 10e-6 + KV_BYTES / 40e9  # 36.21 us
DOUBLE_HOP_S = 10e-6 + 2 * KV_BYTES / 40e9  # K/V and dK/dV: 62.43 us


def plan(**fields) -> ParallelPlan:
    return ParallelPlan(**{"dp": 1, "tp": 1, "pp": 1, "cp": CP, "schedule": "1f1b", **fields})


def test_one_ring_step_by_hand():
    step = context.ring_step(MODEL, plan(), SHAPE, SPEEDS, BLOCK)
    assert step.kv_bytes == KV_BYTES == 1_048_576
    assert step.output_bytes == OUTPUT_BYTES
    assert step.forward_s == pytest.approx(STEP_FORWARD_S)
    assert step.forward_s == pytest.approx(21.47e-6, rel=1e-3)
    assert step.backward_s == pytest.approx(STEP_BACKWARD_S)


def test_exposed_hops_by_hand():
    step = context.ring_step(MODEL, plan(), SHAPE, SPEEDS, BLOCK)
    # Forward: 3 hops of 36.21 us, each behind a 21.47 us kernel: 3 x 14.74 us exposed.
    assert context.forward_hops_exposed_s(step, CP, RING) == pytest.approx(3 * (HOP_S - STEP_FORWARD_S))
    assert context.forward_hops_exposed_s(step, CP, RING) == pytest.approx(44.2e-6, rel=1e-3)
    # Backward: the first and last hops (36.21 us) hide behind the 53.69 us kernel; the 2 double hops of 62.43 us
    # leave 8.74 us each.
    assert context.backward_hops_exposed_s(step, CP, RING) == pytest.approx(2 * (DOUBLE_HOP_S - STEP_BACKWARD_S))
    assert context.backward_hops_exposed_s(step, CP, RING) == pytest.approx(17.5e-6, rel=1e-2)


def test_a_hop_slows_the_kernel_it_overlaps_by_the_share_that_does_not_hide():
    """On a GPU 18.9% of an overlapped transfer's time is lost to the kernel beside it (Runtime.overlap_hidden_share):
    a forward hop of 36.21 us behind a 21.47 us kernel shows its 14.74 us excess and 18.9% of the 21.47 us overlap;
    the backward's single hops, wholly overlapped, show 18.9% of their 36.21 us."""
    step = context.ring_step(MODEL, plan(), SHAPE, SPEEDS, BLOCK)
    share = OVERLAPPED_COLLECTIVE_HIDDEN_SHARE
    forward = 3 * (HOP_S - STEP_FORWARD_S + (1 - share) * STEP_FORWARD_S)
    assert context.forward_hops_exposed_s(step, CP, RING, share) == pytest.approx(forward)
    backward = 2 * (1 - share) * HOP_S + 2 * (DOUBLE_HOP_S - share * STEP_BACKWARD_S)
    assert context.backward_hops_exposed_s(step, CP, RING, share) == pytest.approx(backward)


def test_merges_by_hand():
    step = context.ring_step(MODEL, plan(), SHAPE, SPEEDS, BLOCK)
    # 4 steps x 3 passes over the 2 MiB output at 1 TB/s; backward also over the 1 MiB of dK/dV.
    assert context.forward_merge_s(step, CP, SPEEDS) == pytest.approx(4 * 3 * 2_097_152 / 1e12)
    assert context.backward_merge_s(step, CP, SPEEDS) == pytest.approx(4 * 3 * (2_097_152 + 1_048_576) / 1e12)


@pytest.mark.parametrize("recompute, forwards", [("none", 1), ("selective", 2), ("full", 2)])
def test_recompute_reruns_the_forward_ring(recompute, forwards):
    step = context.ring_step(MODEL, plan(), SHAPE, SPEEDS, BLOCK)
    forward = context.forward_hops_exposed_s(step, CP, RING) + context.forward_merge_s(step, CP, SPEEDS)
    backward = context.backward_hops_exposed_s(step, CP, RING) + context.backward_merge_s(step, CP, SPEEDS)
    total = context.ring_attention_s(MODEL, plan(recompute=recompute), SHAPE, SPEEDS, RING, BLOCK)
    assert total == pytest.approx(forwards * forward + backward)


def test_no_context_parallelism_costs_nothing():
    assert context.ring_attention_s(MODEL, plan(cp=1), SHAPE, SPEEDS, RING, BLOCK) == 0.0


def test_hops_hide_behind_long_enough_kernels():
    """At 4x the sequence each step's kernel is 4x longer and each hop carries 1/4 as much per unit of kernel time:
    nothing is exposed, only the merges remain."""
    long_block = [ops.OpCost("flash_attention", 4 * CORE_FLOPS, 0.0, 0.0, attention_core=True, flash=True)]
    step = context.ring_step(MODEL, plan(), SHAPE, SPEEDS, long_block)
    assert context.forward_hops_exposed_s(step, CP, RING) == 0.0
    assert context.backward_hops_exposed_s(step, CP, RING) == 0.0


def test_two_ranks_send_no_double_hop():
    """cp = 2: backward's first hop carries K/V and its last dK/dV; none carries both."""
    slow = comm.Channel(bus_bandwidth_Bps=1e9, latency_s=0.0)
    step = context.ring_step(MODEL, plan(cp=2), SHAPE, SPEEDS, BLOCK)
    expected = 2 * (KV_BYTES / 1e9 - step.backward_s)
    assert context.backward_hops_exposed_s(step, 2, slow) == pytest.approx(expected)


def test_micro_batch_sizes_broadcast():
    sizes = np.array([1, 2])
    shape = ops.Shape(tokens=TOKENS * sizes, seq=TOKENS, key_len=SEQ, heads=8, tp=1, sp_div=1, elem=2, mask=1)
    block = [ops.OpCost("flash_attention", CORE_FLOPS * sizes, 0.0, 0.0, attention_core=True, flash=True)]
    both = context.ring_attention_s(MODEL, plan(), shape, SPEEDS, RING, block)
    assert both.shape == (2,) and both[0] == pytest.approx(
        context.ring_attention_s(MODEL, plan(), SHAPE, SPEEDS, RING, BLOCK)
    )


# ------------------------------------------------------------------------------------------- whole steps

QWEN_8K = {
    "model": {"name": "qwen2.5-7b"},
    "training": {"seq_len": 8192, "global_batch_size": 64},
    "cluster": {"gpu": "h100-sxm", "num_nodes": 1},
}


def qwen_estimate(**fields):
    req = parse_estimate_request({**QWEN_8K, "plan": {"zero_stage": 3, "micro_batch_size": 1, **fields}})
    return estimate_step(req.model, req.training, req.cluster, req.plan)


def test_context_parallelism_is_not_free_where_nothing_needs_it():
    """Qwen2.5-7B at 8k tokens on 8 H100s: dp2 x cp4 does the same work per GPU as dp8 (in 4x the micro-batches,
    each a quarter of the sequence, so a little more of it waits for the host, and its GEMMs of 2048 rows fill
    their last wave of tiles less: 2048 x 4608 is 288 tiles, 3 waves of 132 SMs, 73% busy, where 8192 rows fill
    97%), plus the ring's cost. The executor's autocast casts its fp32 weights once a micro-batch each way, 4x as
    often under cp4: 12 bytes x 6.5B block weights, 27 ms a micro-batch at the H100's 3.35 TB/s x 0.88, 24
    micro-batches more (0.64 s, 10% of dp8's compute)."""
    dp8, cp4 = qwen_estimate(dp=8), qwen_estimate(dp=2, cp=4)
    assert dp8.breakdown.cp_comm_s == 0.0 and cp4.breakdown.cp_comm_s > 0.0
    assert dp8.breakdown.compute_s <= cp4.breakdown.compute_s <= 1.16 * dp8.breakdown.compute_s
    assert cp4.step_time_s > dp8.step_time_s * (1 + LAYOUT_TIE_TOLERANCE)


def test_search_prefers_no_context_parallelism_where_nothing_needs_it():
    result = planner.search({**QWEN_8K, "search": {"top_k": 10}})
    winner = result.plans[0].plan
    assert winner.cp == 1
    ranks = {(p.plan.dp, p.plan.cp): p.rank for p in reversed(result.plans)}  # each layout's best rank
    assert (2, 4) not in ranks or ranks[(8, 1)] < ranks[(2, 4)]


def test_search_still_chooses_context_parallelism_where_memory_forces_it():
    """Llama-3 8B at 128k tokens: no layout without CP fits 8 H100s, so the winner uses CP and memory binds."""
    request = {
        "model": {"name": "llama3-8b"},
        "training": {"seq_len": 131072, "global_batch_size": 8},
        "cluster": {"gpu": "h100-sxm", "num_nodes": 1},
    }
    result = planner.search(request)
    assert result.plans and result.plans[0].plan.cp > 1
    assert result.explanation.binding_constraint.startswith("memory:")


# ------------------------------------------------------------------------------------------- near ties


def test_near_ties_go_to_the_simpler_layout():
    #              cp4, 1.000 s  cp1, 1.005 s  tp2, 1.009 s  cp1, 1.020 s  cp2 tp2, 1.021 s
    times = np.array([1.000, 1.005, 1.009, 1.020, 1.021])
    peak = np.array([10.0, 20.0, 5.0, 1.0, 1.0])
    cp, tp, pp = np.array([4, 1, 1, 1, 2]), np.array([1, 1, 2, 1, 2]), np.array([1, 1, 1, 1, 1])
    # Rank 1: within 1% of 1.000 s (up to 1.010 s) the cp1 plan uses no model-parallel axis. Rank 2: the fastest
    # left is 1.000 s again; tp2 (one axis, cp 1) beats cp4 (one axis, cp 4). Rank 3: cp4 at 1.000 s is alone in its
    # window. Rank 4: from 1.020 s, the window reaches 1.0302 s: cp1 beats cp2 tp2.
    assert simplest_first(times, peak, cp, tp, pp, 5).tolist() == [1, 2, 0, 3, 4]


def test_in_a_near_tie_expert_parallelism_counts_as_a_model_parallel_axis():
    #              ep8, 1.000 s  ep1, 1.004 s  ep2 tp2, 1.006 s  ep2, 1.008 s
    times, peak = np.array([1.000, 1.004, 1.006, 1.008]), np.array([1.0, 1.0, 1.0, 1.0])
    ones = np.ones(4, dtype=int)
    ep, tp = np.array([8, 1, 2, 2]), np.array([1, 1, 2, 1])
    # Rank 1: ep1 uses no axis. Rank 2: ep8 and ep2 use one each, the smaller ep first. Then ep8; ep2 tp2 (two) last.
    assert simplest_first(times, peak, ones, tp, ones, 4, ep).tolist() == [1, 3, 0, 2]
    assert simplest_first(times, peak, ones, tp, ones, 4).tolist() == [0, 1, 3, 2]  # ep unknown: a dense model's


def test_without_near_ties_the_order_is_by_time_then_memory():
    times, peak = np.array([3.0, 1.0, 2.0, 1.0]), np.array([1.0, 2.0, 1.0, 1.0])
    layouts = np.array([1, 1, 1, 1])
    assert simplest_first(times, peak, layouts, layouts, layouts, 3).tolist() == [3, 1, 2]


def test_a_faster_runner_up_is_explained_by_the_tie():
    winner, runner = qwen_estimate(dp=8), qwen_estimate(dp=2, cp=4)
    runner = runner.model_copy(update={"step_time_s": winner.step_time_s * 0.995})
    line = _runner_up(ParallelPlan(dp=8), winner, ParallelPlan(dp=2, cp=4), runner)
    assert "faster (0.5%)" in line and "tie tolerance" in line and "cp4" in line
