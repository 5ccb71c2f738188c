"""Expert parallelism in the cost model: the dispatch and combine all-to-alls, the experts' share of memory and
of the gradient reduction, against numbers computed by hand from the formulas' sources (planner/cost/expert.py)."""

from __future__ import annotations

import numpy as np
import pytest

import planner
from planner.cost import comm, data
from planner.cost.batch import PlanBatch
from planner.cost.step import estimate_step
from planner.errors import InfeasiblePlanError
from planner.request import parse_estimate_request, parse_plan_request
from planner.rules import plan_violations
from planner.search.evaluate import CandidateCosts
from planner.search.space import search_space

# Mixtral 8x7B (planner/presets.py): one expert's SwiGLU MLP is 3 x 4096 x 14336; a block's dense part is its
# attention (4096 x (4096 + 2 x 1024) + 4096 x 4096), the router (4096 x 8) and two RMSNorms.
EXPERT = 3 * 4096 * 14336
EXPERTS_PER_BLOCK = 8 * EXPERT
DENSE_PER_BLOCK = 4096 * 6144 + 4096 * 4096 + 4096 * 8 + 2 * 4096
EDGES = 2 * 32000 * 4096 + 4096  # embedding, LM head, final norm
LAYERS = 32


def mixtral(nodes: int = 1, framework: str = "megatron", **plan):
    req = parse_estimate_request({
        "model": {"name": "mixtral-8x7b"},
        "training": {"seq_len": 4096, "global_batch_size": 64, "framework": framework},
        "cluster": {"gpu": "h100-sxm", "num_nodes": nodes, "gpus_per_node": 8},
        "plan": plan,
    })  # fmt: skip
    return req


def estimate(req):
    return estimate_step(req.model, req.training, req.cluster, req.plan)


def batch_of(req) -> PlanBatch:
    return PlanBatch.of_plan(req.model, req.training, req.cluster, req.plan)


# ------------------------------------------------------------------------------------------- all-to-all


def test_all_to_all_inside_a_node_by_hand():
    """dp8 ep8 on one node: per layer and micro-batch 4 all-to-alls of 4096 tokens x top-2 x 4096 x 2 bytes, 7/8
    of it off-rank, over NVLink; 64 / 8 = 8 micro-batches of 32 layers."""
    req = mixtral(dp=8, ep=8)
    link = req.cluster.intra_link
    size = 4096 * 2 * 4096 * 2
    one = link.latency_s + 7 / 8 * size / link.bus_bandwidth_Bps
    assert estimate(req).breakdown.ep_comm_s == pytest.approx(8 * LAYERS * 4 * one, rel=1e-12)


def test_all_to_all_across_nodes_goes_through_each_gpu_s_network_link():
    """ep16 over 2 nodes (8 members each): each rank sends 8/16 of its bytes to the other node over its own NIC."""
    req = mixtral(nodes=2, dp=16, ep=16)
    size = 4096 * 2 * 4096 * 2
    link = req.cluster.inter_link
    one = link.latency_s + 8 / 16 * size / link.bus_bandwidth_Bps
    assert estimate(req).breakdown.ep_comm_s == pytest.approx(4 * LAYERS * 4 * one, rel=1e-12)


def test_full_recompute_repeats_the_forward_pair_and_ep1_sends_nothing():
    four, six = (estimate(mixtral(dp=8, ep=8, recompute=r)).breakdown.ep_comm_s for r in ("none", "full"))
    assert six == pytest.approx(1.5 * four, rel=1e-12)
    assert estimate(mixtral(dp=8, ep=1)).breakdown.ep_comm_s == 0.0


def test_tokens_are_split_over_tp_and_cp():
    """tp2 (sequence parallel) x cp2: a rank routes 4096 / 4 tokens. Its ep group, 8 consecutive members of a dp x cp
    group whose members are tp = 2 ranks apart, spans 16 ranks: 2 nodes, 4 members on each, so 4/8 of the bytes
    leave the node."""
    req = mixtral(nodes=4, dp=8, ep=8, tp=2, cp=2, sequence_parallel=True)
    link = req.cluster.inter_link
    size = 1024 * 2 * 4096 * 2
    one = link.latency_s + 4 / 8 * size / link.bus_bandwidth_Bps
    assert estimate(req).breakdown.ep_comm_s == pytest.approx(8 * LAYERS * 4 * one, rel=1e-12)


def test_all_to_all_s_is_nccl_tests_alltoall_bus_bandwidth():
    channel = comm.Channel(bus_bandwidth_Bps=100e9, latency_s=10e-6)
    assert comm.all_to_all_s(8e9, 4, channel) == pytest.approx(10e-6 + 0.75 * 8e9 / 100e9, rel=1e-12)


# ---------------------------------------------------------------------------------------------- memory


def test_experts_are_split_over_ep_and_their_states_sharded_over_edp():
    """ZeRO-1, dp8: with ep = 8 a GPU holds 1/8 of the experts and, edp being 1, all of their optimizer states;
    the dense parameters' states are sharded over all 8."""
    req = mixtral(dp=8, ep=8, zero_stage=1)
    batch = batch_of(req)
    runtime, precision = batch.runtime, req.training.precision
    dense = LAYERS * DENSE_PER_BLOCK + EDGES
    experts = LAYERS * EXPERTS_PER_BLOCK / 8
    assert batch.device_params()[0, 0] == pytest.approx(dense + experts, rel=1e-12)
    stage = estimate(req).memory.by_stage[0]
    assert stage.params_bytes == pytest.approx((dense + experts) * runtime.weight_bytes(precision), rel=1e-12)
    optimizer_per_param = runtime.master_weight_bytes(precision) + 8  # AdamW's two fp32 moments
    assert stage.optimizer_bytes == pytest.approx((dense / 8 + experts / 1) * optimizer_per_param, rel=1e-12)


def test_with_ep1_every_gpu_holds_every_expert():
    batch = batch_of(mixtral(dp=8, ep=1, zero_stage=1))
    assert batch.device_params()[0, 0] == pytest.approx(LAYERS * (DENSE_PER_BLOCK + EXPERTS_PER_BLOCK) + EDGES)


def test_zero3_shards_experts_over_edp_like_ep1_does_over_dp():
    """Sharded states per GPU do not depend on ep: E/ep experts over dp/ep ranks = E over dp."""
    one, four = (estimate(mixtral(dp=8, ep=ep, zero_stage=3)).memory.by_stage[0] for ep in (1, 4))
    assert four.optimizer_bytes == pytest.approx(one.optimizer_bytes, rel=1e-12)


# ------------------------------------------------------------------------------------ gradient reduction


def test_expert_gradients_are_reduced_over_edp_not_dp():
    """DDP (ZeRO-0): with ep = dp = 8 each expert lives on one rank, so only the dense gradients are all-reduced;
    with ep = 4 the experts' are all-reduced over edp = 2 ranks on their own ring."""
    batch = batch_of(mixtral(dp=8, ep=8, zero_stage=0))
    grad_bytes = batch.runtime.data_parallel_bytes("bf16")
    dense = (LAYERS * DENSE_PER_BLOCK + EDGES) * grad_bytes
    expected = comm.all_reduce_s(dense, 8, batch.dp_channel.bare)
    assert data.dp_during_backward_s(batch)[0, 0] == pytest.approx(float(expected[0, 0]), rel=1e-9)
    batch = batch_of(mixtral(dp=8, ep=4, zero_stage=0))
    experts = LAYERS * EXPERTS_PER_BLOCK / 4 * grad_bytes
    expected = comm.all_reduce_s(dense, 8, batch.dp_channel.bare) + comm.all_reduce_s(experts, 2, batch.edp_channel)
    assert data.dp_during_backward_s(batch)[0, 0] == pytest.approx(float(expected[0, 0]), rel=1e-9)


def test_dense_models_are_unchanged_by_the_expert_terms():
    req = parse_estimate_request({
        "model": {"name": "llama3-8b"},
        "training": {"seq_len": 4096, "global_batch_size": 64},
        "cluster": {"gpu": "h100-sxm", "num_nodes": 1},
        "plan": {"dp": 8},
    })  # fmt: skip
    batch = batch_of(req)
    assert not np.any(batch.device_expert_params())
    assert estimate(req).breakdown.ep_comm_s == 0.0


# ---------------------------------------------------------------------------------------------- search


def mixtral_search(**search):
    return parse_plan_request({
        "model": {"name": "mixtral-8x7b"},
        "training": {"seq_len": 4096, "global_batch_size": 256},
        "cluster": {"gpu": "h100-sxm", "num_nodes": 4},
        "search": {"top_k": 8, **search},
    })  # fmt: skip


def test_every_mixtral_plan_is_valid_and_ep_is_searched():
    req = mixtral_search()
    candidates, _ = search_space(req.model, req.training, req.cluster, req.search)
    assert set(np.unique(candidates.ep)) == {1, 2, 4, 8}
    assert not np.any((candidates.dp * candidates.cp) % candidates.ep)
    result = planner.search(req)
    assert result.plans
    for ranked in result.plans:
        plan = ranked.plan
        assert plan_violations(plan, req.model, req.training, req.cluster) == []
        assert req.model.num_experts % plan.ep == 0 and (plan.dp * plan.cp) % plan.ep == 0
        assert ranked.estimate == estimate_step(req.model, req.training, req.cluster, plan)
    assert any(ranked.plan.ep > 1 for ranked in result.plans)


def test_the_paraplan_regime_offers_only_the_expert_layouts_its_executor_runs():
    """paraplan's executor runs experts with tp = 1 and shards them at ZeRO 0, 2 or 3 (executor/support.py);
    Megatron-LM splits experts under tensor parallelism and with its distributed optimizer (ZeRO-1)."""
    own = mixtral_search()
    candidates, rejected = search_space(own.model, own.training, own.cluster, own.search)
    assert not np.any(candidates.tp > 1) and not np.any((candidates.ep > 1) & (candidates.zero_stage == 1))
    assert {"executor_tp_moe", "executor_ep_zero1"} <= {code for _, code in rejected.counts}
    megatron = parse_plan_request({**own.model_dump(mode="json"), "training": {
        **own.training.model_dump(mode="json"), "framework": "megatron"}})  # fmt: skip
    candidates, _ = search_space(megatron.model, megatron.training, megatron.cluster, megatron.search)
    assert np.any(candidates.tp > 1) and np.any((candidates.ep > 1) & (candidates.zero_stage == 1))


def test_a_fixed_ep_is_kept_and_a_dense_space_does_not_grow():
    result = planner.search(mixtral_search(fixed={"ep": 4}))
    assert result.plans and {ranked.plan.ep for ranked in result.plans} == {4}
    dense = parse_plan_request({"model": {"name": "llama3-8b"}, "training": {"seq_len": 4096, "global_batch_size": 64},
                                "cluster": {"gpu": "h100-sxm", "num_nodes": 2, "gpus_per_node": 8}})  # fmt: skip
    candidates, _ = search_space(dense.model, dense.training, dense.cluster, dense.search)
    assert set(np.unique(candidates.ep)) == {1}
    assert len(candidates) == 27_660  # the size of this space before ep was searched (main at 1afeff3)


def test_an_ep_the_experts_cannot_split_into_is_refused_naming_the_field():
    with pytest.raises(InfeasiblePlanError) as refused:
        planner.search(mixtral_search(fixed={"ep": 3}))
    assert "search.fixed.ep" in {v.field for v in refused.value.violations}


def test_batched_moe_costs_equal_the_scalar_estimate():
    req = parse_plan_request({"model": {**SMALL_MOE}, "training": {"seq_len": 1024, "global_batch_size": 16},
                              "cluster": {"gpu": "h100-sxm", "num_nodes": 2, "gpus_per_node": 4}})  # fmt: skip
    candidates, _ = search_space(req.model, req.training, req.cluster, req.search)
    assert set(np.unique(candidates.ep)) == {1, 2, 4, 8}
    costs = CandidateCosts(req.model, req.training, req.cluster, candidates)
    rows = np.random.default_rng(0).choice(len(candidates), size=80, replace=False)
    batched = costs.cost(rows, overlap_grad_reduce=True)
    bound = costs.lower_bound_s()
    for i, row in enumerate(rows):
        est = estimate_step(req.model, req.training, req.cluster, candidates.plan(int(row)))
        assert batched.step_time_s[i] == pytest.approx(est.step_time_s, rel=1e-12)
        assert batched.peak_bytes[i] == pytest.approx(est.memory.peak_bytes, rel=1e-12)
        assert bound[row] <= est.step_time_s * (1 + 1e-12)


SMALL_MOE = {
    "num_layers": 4, "hidden_size": 512, "num_attention_heads": 8, "num_kv_heads": 2, "ffn_hidden_size": 1024,
    "vocab_size": 8000, "mlp": "swiglu", "norm": "rmsnorm", "num_experts": 8, "experts_per_token": 2,
}  # fmt: skip


def test_zero3_gathers_each_expert_as_its_own_unit_over_edp():
    """FSDP2 (the executor's ZeRO-3): a block's dense parameters are one unit over dp x cp; with ep = 4 of dp 8 each
    of a rank's 2 experts is a unit of its own over its edp = 2 ranks; with ep = 8 no other rank holds them."""
    for ep in (4, 8):
        batch = batch_of(mixtral(dp=8, ep=ep, zero_stage=3, framework="paraplan"))
        runtime = batch.runtime
        gather_bytes, efficiency = runtime.unsharded_bytes("bf16"), runtime.zero3_bandwidth_efficiency
        assert not runtime.zero3_collective_per_tensor
        dense = comm.all_gather_s(DENSE_PER_BLOCK * gather_bytes / efficiency, 8, batch.dp_channel.fsdp_gather)
        experts = 8 // ep * comm.all_gather_s(EXPERT * gather_bytes / efficiency, 8 // ep, batch.edp_channel)
        got = data.sharded_collectives(batch).block_gather_s
        assert float(got[0, 0]) == pytest.approx(float((dense + experts)[0, 0]), rel=1e-12)
