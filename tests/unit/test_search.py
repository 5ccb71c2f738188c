"""The plan search: its space against an independent brute force, its answers against the scalar cost model,
its handling of options, of nothing fitting, and of the published layouts."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

import planner
from planner.cost.step import estimate_step
from planner.errors import InfeasiblePlanError
from planner.request import parse_plan_request
from planner.rules import OFFLOAD_MIN_ZERO_STAGE, plan_violations
from planner.search.evaluate import CandidateCosts
from planner.search.rank import LAYOUT_TIE_TOLERANCE
from planner.search.space import search_space
from planner.specs import ParallelPlan

GiB = 1024**3

SMALL_GPT = {"name": "gpt3-1.7b", "num_layers": 4, "hidden_size": 512, "num_attention_heads": 8,
             "vocab_size": 8192, "max_position_embeddings": 4096}  # fmt: skip
SMALL_LLAMA = {"name": "llama3-8b", "num_layers": 6, "hidden_size": 1024, "num_attention_heads": 16,
               "num_kv_heads": 4, "ffn_hidden_size": 2816, "vocab_size": 16000}  # fmt: skip
SMALL_MOE = {**SMALL_LLAMA, "name": "mixtral-8x7b", "num_experts": 8, "experts_per_token": 2}

# (model, seq_len, batch, gpu, nodes, gpus per node, memory fraction): small enough for brute force, shaped so
# that memory binds in some (the 2 GiB L4-like cap) and not in others.
SMALL_CASES = [
    (SMALL_GPT, 1024, 8, "a100-80gb", 1, 4, 0.9),
    (SMALL_LLAMA, 2048, 12, "h100-sxm", 2, 2, 0.9),
    (SMALL_LLAMA, 4096, 16, "a100-40gb", 1, 8, 0.05),
]


def small_request(case, **search) -> dict:
    model, seq, batch, gpu, nodes, per_node, fraction = case
    return {
        "model": model,
        "training": {"seq_len": seq, "global_batch_size": batch},
        "cluster": {"gpu": gpu, "num_nodes": nodes, "gpus_per_node": per_node},
        "search": {"max_memory_fraction": fraction, **search},
    }


def brute_force_plans(req) -> list[ParallelPlan]:
    """Every valid plan, enumerated field by field with no help from planner/search, in canonical form: one
    schedule without a pipeline and, without replicas (where every stage is ZeRO 0 plus buffers), the least ZeRO
    stage the plan's offload needs."""
    model, training, cluster = req.model, req.training, req.cluster
    n = cluster.num_gpus
    found = set()
    divisors = [d for d in range(1, n + 1) if n % d == 0]
    for dp, tp, pp, cp in itertools.product(divisors, repeat=4):
        if dp * tp * pp * cp != n or cluster.gpus_per_node % tp:
            continue
        for zero, mbs, sp, recompute, schedule, v, offload in itertools.product(
            range(4), range(1, training.global_batch_size + 1), (False, True), ("none", "selective", "full"),
            ("gpipe", "1f1b", "interleaved_1f1b"), range(1, model.num_layers + 1),
            ("none", "optimizer", "optimizer_and_params"),
        ):  # fmt: skip
            try:
                plan = ParallelPlan(
                    dp=dp, tp=tp, pp=pp, cp=cp, zero_stage=zero, micro_batch_size=mbs, sequence_parallel=sp,
                    recompute=recompute, schedule=schedule, virtual_stages=v, offload=offload,
                )  # fmt: skip
            except ValueError:
                continue
            if plan_violations(plan, model, training, cluster):
                continue
            if pp == 1:
                plan = plan.model_copy(update={"schedule": "1f1b"})
            if dp * cp == 1:
                plan = plan.model_copy(update={"zero_stage": OFFLOAD_MIN_ZERO_STAGE[offload]})
            found.add(plan)
    return sorted(found, key=repr)


def space_plans(req) -> list[ParallelPlan]:
    candidates, _ = search_space(req.model, req.training, req.cluster, req.search)
    return [candidates.plan(row) for row in range(len(candidates))]


def rank_by_hand(scored: list[tuple[float, float, int, int, int]], k: int) -> list[tuple]:
    """The search's rank rule written out on (step time, peak bytes, cp, tp, pp) rows: each rank goes to the plan
    with the fewest model-parallel axes, then the smallest cp, tp, pp, then the fastest, then the least memory,
    among those within the tie tolerance of the fastest plan left."""
    left, ranked = list(scored), []
    while left and len(ranked) < k:
        fastest = min(row[0] for row in left)
        tied = [row for row in left if row[0] <= fastest * (1 + LAYOUT_TIE_TOLERANCE)]
        pick = min(tied, key=lambda r: ((r[2] > 1) + (r[3] > 1) + (r[4] > 1), r[2], r[3], r[4], r[0], r[1]))
        ranked.append(pick)
        left.remove(pick)
    return ranked


@pytest.mark.parametrize("case", SMALL_CASES)
def test_space_is_exactly_the_valid_plans(case):
    req = parse_plan_request(small_request(case))
    space = space_plans(req)
    assert len(space) == len(set(space)), "no candidate twice"
    assert set(space) == set(brute_force_plans(req))


@pytest.mark.parametrize("case", SMALL_CASES)
def test_search_misses_no_faster_plan_than_brute_force(case):
    """Without the ILP the search must return exactly the first k fitting plans of the whole space in rank order."""
    req = parse_plan_request(small_request(case, partition=False, top_k=5))
    limit = req.search.max_memory_fraction * req.cluster.gpu.memory_bytes
    scored = []
    for plan in brute_force_plans(req):
        est = estimate_step(req.model, req.training, req.cluster, plan)
        if est.memory.peak_bytes <= limit:
            scored.append((est.step_time_s, est.memory.peak_bytes, plan.cp, plan.tp, plan.pp))
    result = planner.search(req)
    expected = rank_by_hand(scored, 5)
    got = [
        (p.estimate.step_time_s, p.estimate.memory.peak_bytes, p.plan.cp, p.plan.tp, p.plan.pp) for p in result.plans
    ]
    np.testing.assert_allclose(np.array(got), np.array(expected), rtol=1e-12)
    assert result.counts.fits + result.counts.out_of_memory == result.counts.evaluated


# A mixture of experts, whose layer costs also depend on ep (the experts a rank holds and casts).
MOE_CASE = (SMALL_MOE, 2048, 16, "h100-sxm", 1, 8, 0.9)


@pytest.mark.parametrize("case", [*SMALL_CASES, MOE_CASE])
def test_batched_costs_equal_the_scalar_estimate(case):
    req = parse_plan_request(small_request(case))
    candidates, _ = search_space(req.model, req.training, req.cluster, req.search)
    costs = CandidateCosts(req.model, req.training, req.cluster, candidates)
    rows = np.random.default_rng(0).choice(len(candidates), size=min(60, len(candidates)), replace=False)
    batched = costs.cost(rows, overlap_grad_reduce=True)
    bound = costs.lower_bound_s()
    for i, row in enumerate(rows):
        est = estimate_step(req.model, req.training, req.cluster, candidates.plan(int(row)))
        assert batched.step_time_s[i] == pytest.approx(est.step_time_s, rel=1e-12)
        assert batched.peak_bytes[i] == pytest.approx(est.memory.peak_bytes, rel=1e-12)
        assert batched.peak_stage[i] == est.memory.peak_stage
        assert bound[row] <= est.step_time_s * (1 + 1e-12)


@pytest.mark.parametrize(
    "model, seq, batch, gpu, nodes",
    [
        ("llama3-8b", 8192, 64, "h100-sxm", 1),
        ("llama3-70b", 8192, 256, "h100-sxm", 8),
        ("gpt3-18.4b", 2048, 512, "a100-80gb", 4),
        ("qwen2.5-7b", 4096, 96, "a100-40gb", 2),
        ("mistral-7b", 4096, 30, "l4", 3),
    ],
)
def test_every_returned_plan_is_valid_fits_and_is_ranked(model, seq, batch, gpu, nodes):
    request = {"model": model, "training": {"seq_len": seq, "global_batch_size": batch},
               "cluster": {"gpu": gpu, "num_nodes": nodes}, "search": {"top_k": 8}}  # fmt: skip
    req = parse_plan_request(request)
    result = planner.search(req)
    limit = result.memory_limit_bytes
    assert result.plans, result.closest
    times = [p.estimate.step_time_s for p in result.plans]
    for rank, time_s in enumerate(times):  # each within the tie tolerance of the fastest of those after it
        assert time_s <= min(times[rank:]) * (1 + LAYOUT_TIE_TOLERANCE)
    for ranked in result.plans:
        plan, est = ranked.plan, ranked.estimate
        assert plan.num_gpus == req.cluster.num_gpus
        assert plan_violations(plan, req.model, req.training, req.cluster) == []
        assert est.memory.peak_bytes <= limit
        assert est == estimate_step(req.model, req.training, req.cluster, plan)
    assert result.explanation is not None and result.explanation.binding_constraint


def test_nothing_fits_answers_the_closest_candidates():
    request = {"model": "llama3-405b", "training": {"seq_len": 8192, "global_batch_size": 16},
               "cluster": {"gpu": "a100-80gb", "num_nodes": 1}}  # fmt: skip
    result = planner.search(request)
    assert not result.found and result.plans == [] and result.explanation is None
    assert result.closest
    # Each is over the GPU memory limit or, offloading, over a node's RAM, nearest first by the fraction over.
    assert all(c.over_bytes > 0 or c.over_host_bytes > 0 for c in result.closest)
    limit = result.memory_limit_bytes
    fractions = [round(max(c.estimate.memory.peak_bytes / limit,
                           c.estimate.memory.host_bytes_per_node / c.estimate.memory.host_capacity_bytes), 3)
                 for c in result.closest]  # fmt: skip
    assert fractions == sorted(fractions) and fractions[0] > 1
    assert result.counts.fits == 0 and result.counts.pruned_by_bound == 0  # nothing to prune against
    assert result.closest[0].over_bytes == pytest.approx(
        result.closest[0].estimate.memory.peak_bytes - result.memory_limit_bytes
    )


def test_memory_binds_when_faster_layouts_do_not_fit():
    request = {"model": "gpt3-175b", "training": {"seq_len": 2048, "global_batch_size": 1536},
               "cluster": {"gpu": "a100-80gb", "num_nodes": 128}}  # fmt: skip
    result = planner.search(request)
    assert result.found
    assert result.explanation.binding_constraint.startswith("memory:")
    assert "over the limit" in result.explanation.binding_constraint
    codes = {r.code for r in result.rejected}
    assert {"out_of_memory", "pruned_by_bound", "tp_crosses_nodes"} <= codes


def test_fixed_fields_are_kept():
    request = {"model": "llama3-70b", "training": {"seq_len": 4096, "global_batch_size": 128},
               "cluster": {"gpu": "h100-sxm", "num_nodes": 4},
               "search": {"fixed": {"tp": 4, "pp": 4, "schedule": "1f1b"}, "recompute": ["full"]}}  # fmt: skip
    result = planner.search(request)
    assert result.found
    for ranked in result.plans:
        assert (ranked.plan.tp, ranked.plan.pp, ranked.plan.schedule, ranked.plan.recompute) == (4, 4, "1f1b", "full")


@pytest.mark.parametrize(
    "search, field, code",
    [
        ({"fixed": {"tp": 5}}, "search.fixed.tp", "tp_divides_num_attention_heads"),
        ({"fixed": {"tp": 16}}, "search.fixed.tp", "tp_crosses_nodes"),
        ({"fixed": {"dp": 5}}, "search.fixed", "degrees_product"),
        ({"fixed": {"schedule": "gpipe"}, "schedules": ["1f1b"]}, "search.fixed.schedule", "fixed_not_allowed"),
        ({"fixed": {"pp": 128}}, "search.fixed.pp", "too_many_stages"),
        ({"fixed": {"micro_batch_size": 7}}, "search.fixed", "batch_divisible"),
    ],
)
def test_contradictory_options_are_refused_naming_the_option(search, field, code):
    request = {"model": "gpt3-175b", "training": {"seq_len": 2048, "global_batch_size": 1536},
               "cluster": {"gpu": "a100-80gb", "num_nodes": 16}, "search": search}  # fmt: skip
    with pytest.raises(InfeasiblePlanError) as caught:
        planner.search(request)
    assert caught.value.reason == "contradictory_search_options"
    assert (field, code) in {(v.field, v.code) for v in caught.value.violations}


def test_a_plan_search_takes_no_plan():
    with pytest.raises(ValueError, match="search.fixed"):
        parse_plan_request({"model": "llama3-8b", "training": {"seq_len": 2048, "global_batch_size": 8},
                            "cluster": {"gpu": "h100-sxm"}, "plan": {"tp": 2}})  # fmt: skip


def test_no_valid_layout_at_all_is_an_answer_with_the_reasons():
    """5 GPUs per node, 8 heads, 4 layers, batch 4: dp 5 cannot split the batch, and tp, pp or cp of 5 break
    the heads, the layers or the sequence."""
    request = {"model": SMALL_GPT, "training": {"seq_len": 1024, "global_batch_size": 4},
               "cluster": {"gpu": "a100-80gb", "num_nodes": 1, "gpus_per_node": 5}}  # fmt: skip
    result = planner.search(request)
    assert not result.found and result.closest == [] and result.counts.enumerated == 0
    codes = {r.code for r in result.rejected}
    assert {"batch_divisible", "too_many_stages"} <= codes
