"""planner/cost/schedule.py: the pipeline schedule as a task graph, against the closed form and by hand."""

from __future__ import annotations

import numpy as np
import pytest

from planner.cost.pipeline import p2p_transfers_on_critical_path, pipeline_bubble_s
from planner.cost.schedule import (
    ChunkTimes,
    critical_path,
    device_order,
    plan_chunk_times,
    plan_schedule_graph,
    schedule_graph,
    timeline,
)
from planner.cost.schedule import (
    pipeline_time_s as graph_time_s,
)
from planner.cost.step import PlanBatch, estimate_step
from planner.request import parse_estimate_request

# (schedule, pp, virtual stages, micro-batch counts): interleaving needs whole rounds of pp micro-batches.
SHAPES = [
    *[("gpipe", pp, 1, m) for pp in (1, 2, 4, 8) for m in (1, 3, 8, 16)],
    *[("1f1b", pp, 1, m) for pp in (1, 2, 3, 4, 8) for m in (1, 2, 5, 8, 32)],
    *[("interleaved_1f1b", pp, v, m) for pp in (2, 4, 8) for v in (2, 3, 4) for m in (pp, 2 * pp, 4 * pp)],
]


def even(pp: int, v: int, forward_s=1.0, backward_s=2.0, recompute_s=0.0) -> list[ChunkTimes]:
    """pp x v equal chunks making up a device's forward_s, backward_s and recompute_s."""
    return [ChunkTimes(forward_s / v, backward_s / v, recompute_s / v)] * (pp * v)


@pytest.mark.parametrize(("schedule", "pp", "v", "m"), SHAPES)
@pytest.mark.parametrize("recompute_s", [0.0, 0.7])
def test_even_stages_take_m_slots_plus_the_closed_form_bubble(schedule, pp, v, m, recompute_s):
    """Narayanan et al. SC'21 eq. 1-2: m x t + (p - 1) t / v, whatever the split of t into F, B and recompute."""
    per_device_s = 1.0 + 2.0 + recompute_s
    graph = schedule_graph(even(pp, v, recompute_s=recompute_s), pp, schedule, m, p2p_s=0.0)
    closed_form = m * per_device_s + pipeline_bubble_s(np.full((1, pp), per_device_s), v)[0, 0]
    assert graph_time_s(graph) == pytest.approx(closed_form, rel=1e-12)


@pytest.mark.parametrize(("schedule", "pp", "v", "m"), SHAPES[::3])
def test_the_timeline_keeps_every_dependency_and_ends_with_the_longest_path(schedule, pp, v, m):
    graph = schedule_graph(even(pp, v, recompute_s=0.5), pp, schedule, m, p2p_s=0.1)
    tasks = timeline(graph)
    assert len(tasks) == pp * v * m * 3  # forward, recompute, backward of every chunk and micro-batch
    assert max(t.end_s for t in tasks) == pytest.approx(graph_time_s(graph))
    for device in range(pp):
        mine = [t for t in tasks if t.device == device]
        assert all(a.end_s <= b.start_s + 1e-12 for a, b in zip(mine, mine[1:], strict=False))  # one at a time
    when = {(t.chunk, t.microbatch, t.kind): t for t in tasks}
    for chunk in range(1, pp * v):
        for i in range(m):
            hand_off = 0.1 if pp > 1 else 0.0
            assert when[chunk, i, "forward"].start_s >= when[chunk - 1, i, "forward"].end_s + hand_off - 1e-12
            assert when[chunk - 1, i, "recompute"].start_s >= when[chunk, i, "backward"].end_s + hand_off - 1e-12


def test_two_stages_one_microbatch_by_hand():
    """F on device 0, hand-off, F and B on device 1, hand-off back, B on device 0."""
    chunks = [ChunkTimes(1.0, 2.0), ChunkTimes(3.0, 5.0)]
    graph = schedule_graph(chunks, 2, "1f1b", 1, p2p_s=0.25)
    assert graph_time_s(graph) == pytest.approx(1 + 0.25 + 3 + 5 + 0.25 + 2)
    assert [(t.device, t.kind) for t in critical_path(graph)] == [
        (0, "forward"), (1, "forward"), (1, "backward"), (0, "backward"),
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("schedule", "pp", "v", "m"), [("gpipe", 4, 1, 8), ("1f1b", 8, 1, 32), ("interleaved_1f1b", 4, 2, 8)]
)
def test_transfers_on_the_path_lie_between_the_fill_and_the_cost_models_count(schedule, pp, v, m):
    """The first forward and the last backward cross all pp - 1 boundaries; cost/step.py's `pp_comm_s` charges
    every transfer `p2p_transfers_on_critical_path` counts, some of which the schedule hides behind compute."""
    p2p_s = 0.01
    without = graph_time_s(schedule_graph(even(pp, v), pp, schedule, m, p2p_s=0.0))
    exposed = graph_time_s(schedule_graph(even(pp, v), pp, schedule, m, p2p_s=p2p_s)) - without
    assert 2 * (pp - 1) * p2p_s - 1e-12 <= exposed <= p2p_transfers_on_critical_path(pp, v, m) * p2p_s


def test_uneven_stages_are_bounded_by_the_slowest_device_and_by_the_closed_form():
    """One slow stage: every micro-batch passes through it (m x its time is a floor), and 1F1B overlaps the fast
    stages' fill and drain with it, so the closed form's bubble is an upper bound here, not the answer."""
    per_device = [(1.0, 2.0), (1.5, 3.0), (1.0, 2.0), (0.8, 1.6)]
    chunks = [ChunkTimes(f, b) for f, b in per_device]
    busy = np.array([[f + b for f, b in per_device]])
    slowest = 8 * busy.max()
    closed_form = slowest + pipeline_bubble_s(busy, 1)[0, 0]
    one_f_one_b = graph_time_s(schedule_graph(chunks, 4, "1f1b", 8, p2p_s=0.0))
    assert slowest < one_f_one_b < closed_form
    assert graph_time_s(schedule_graph(chunks, 4, "gpipe", 8, p2p_s=0.0)) == pytest.approx(closed_form)


def test_device_orders_are_the_published_ones():
    """1F1B on the first of 4 devices: 3 warm-up forwards, then one forward one backward (SC'21 fig. 4);
    interleaved on the last of 2 devices with 2 chunks: chunk 1, then 3, in rounds of pp (fig. 4, bottom)."""
    first = device_order("1f1b", 4, 1, 5, device=0)
    assert [kind[0] + str(i) for kind, (_, i) in first] == ["f0", "f1", "f2", "f3", "b0", "f4", "b1", "b2", "b3", "b4"]
    last = device_order("interleaved_1f1b", 2, 2, 4, device=1)
    assert [(kind[0], chunk, i) for kind, (chunk, i) in last][:4] == [
        ("f", 1, 0),
        ("f", 1, 1),
        ("f", 3, 0),
        ("b", 3, 0),
    ]
    with pytest.raises(ValueError, match="rounds of pp=4"):
        device_order("interleaved_1f1b", 4, 2, 6, device=0)


def plan_request(gpt3_request: dict, schedule: str, virtual_stages: int):
    """The README's GPT-3 plan without sequence parallelism (whose once-a-step reduction is no pipeline task)."""
    plan = {**gpt3_request["plan"], "sequence_parallel": False, "schedule": schedule, "virtual_stages": virtual_stages}
    return parse_estimate_request({**gpt3_request, "plan": plan})


@pytest.mark.parametrize(("schedule", "virtual_stages"), [("gpipe", 1), ("1f1b", 1), ("interleaved_1f1b", 3)])
def test_a_plans_chunks_hold_the_cost_models_busy_time(gpt3_request, schedule, virtual_stages):
    req = plan_request(gpt3_request, schedule, virtual_stages)
    chunks = plan_chunk_times(req.model, req.training, req.cluster, req.plan)
    per_device = np.zeros(req.plan.pp)
    np.add.at(
        per_device, np.arange(len(chunks)) % req.plan.pp, [c.forward_s + c.backward_s + c.recompute_s for c in chunks]
    )
    batch = PlanBatch.of_plan(req.model, req.training, req.cluster, req.plan)
    np.testing.assert_allclose(per_device, batch.per_device("busy_s")[0], rtol=1e-12)


@pytest.mark.parametrize(
    ("schedule", "virtual_stages", "rel"), [("gpipe", 1, 1e-12), ("1f1b", 1, 1e-12), ("interleaved_1f1b", 3, 1e-3)]
)
def test_a_plans_graph_matches_its_estimate(gpt3_request, schedule, virtual_stages, rel):
    """Without transfers, the longest path is the estimate's compute, TP, CP and bubble terms: exactly where every
    chunk of a device is alike; interleaved, the embedding's and head's chunks differ from the others, and the
    closed form's bubble is close to, not exactly, the schedule's."""
    req = plan_request(gpt3_request, schedule, virtual_stages)
    chunks = plan_chunk_times(req.model, req.training, req.cluster, req.plan)
    graph = schedule_graph(chunks, req.plan.pp, schedule, req.plan.num_microbatches(req.training), p2p_s=0.0)
    terms = estimate_step(req.model, req.training, req.cluster, req.plan).breakdown
    assert graph_time_s(graph) == pytest.approx(
        terms.compute_s + terms.tp_comm_s + terms.cp_comm_s + terms.bubble_s, rel=rel
    )
    with_transfers = plan_schedule_graph(req.model, req.training, req.cluster, req.plan)
    assert graph_time_s(graph) < graph_time_s(with_transfers) < graph_time_s(graph) + terms.pp_comm_s


def test_a_plans_timeline_holds_every_task_once_without_overlap_on_a_device(gpt3_request):
    """planner/estimates.py `pipeline_timeline`: every (chunk, micro-batch) runs forward and backward once (and its
    recompute under full recompute), no device runs two tasks at once, and the last bar ends at the longest path."""
    from planner.estimates import pipeline_timeline

    plan = {**gpt3_request["plan"], "pp": 4, "dp": 32, "virtual_stages": 2, "recompute": "full"}
    request = {**gpt3_request, "training": {**gpt3_request["training"], "global_batch_size": 256}, "plan": plan}
    answer = pipeline_timeline(request)
    assert answer.num_microbatches == 8
    kinds = {(task.chunk, task.microbatch, task.kind) for task in answer.tasks}
    assert len(kinds) == len(answer.tasks) == 4 * 2 * 8 * 3
    for device in range(4):
        bars = sorted((t.start_s, t.end_s) for t in answer.tasks if t.device == device)
        assert all(end <= next_start + 1e-12 for (_, end), (next_start, _) in zip(bars, bars[1:], strict=False))
    assert max(task.end_s for task in answer.tasks) == pytest.approx(answer.pipeline_time_s, rel=1e-12)


def mixtral_request(schedule: str, ep: int, virtual_stages: int = 1):
    """Mixtral 8x7B on one H100 node, pp2 x dp4: 16 blocks a device, 64 / 4 = 16 micro-batches; ep splits the 8
    experts over ep ranks of the dp group, all on the node's NVLink."""
    return parse_estimate_request({
        "model": {"name": "mixtral-8x7b"},
        "training": {"seq_len": 4096, "global_batch_size": 64, "precision": "bf16", "framework": "megatron"},
        "cluster": {"gpu": "h100-sxm", "num_nodes": 1, "gpus_per_node": 8},
        "plan": {"pp": 2, "dp": 4, "ep": ep, "zero_stage": 0, "micro_batch_size": 1, "schedule": schedule,
                 "virtual_stages": virtual_stages},
    })  # fmt: skip


def mixtral_graph_s(req, p2p: bool = False) -> float:
    if p2p:
        return graph_time_s(plan_schedule_graph(req.model, req.training, req.cluster, req.plan))
    chunks = plan_chunk_times(req.model, req.training, req.cluster, req.plan)
    return graph_time_s(schedule_graph(chunks, req.plan.pp, req.plan.schedule, 16, p2p_s=0.0))


@pytest.mark.parametrize(
    ("schedule", "virtual_stages", "slots", "rel"),
    [("gpipe", 1, 16 + 1, 1e-12), ("1f1b", 1, 16 + 1, 1e-12), ("interleaved_1f1b", 2, 16 + 1 / 2, 1e-3)],
)
def test_a_moe_plans_graph_holds_its_all_to_alls_as_its_estimate_does(schedule, virtual_stages, slots, rel):
    """Every block of a MoE model runs 4 all-to-alls per micro-batch (dispatch and combine, forward and backward:
    planner/cost/expert.py) of 4096 tokens x top-2 x 4096 x 2 bytes, 3/4 of it to the ep4 group's other ranks over
    NVLink. The longest path without transfers is the estimate's compute, TP, CP, EP and bubble terms; against the
    same plan with ep1 (the same layers, no all-to-alls) it is longer by the all-to-alls of a device's 16 blocks in
    each of the m + (pp - 1) / v micro-batch slots on the critical path (Narayanan et al. SC'21 eq. 1-2), exactly
    also when interleaved, where only the match with the closed form's bubble is approximate."""
    req = mixtral_request(schedule, ep=4, virtual_stages=virtual_stages)
    assert req.plan.num_microbatches(req.training) == 16
    link = req.cluster.intra_link
    all_to_alls = 4 * (link.latency_s + 3 / 4 * (4096 * 2 * 4096 * 2) / link.bus_bandwidth_Bps)
    terms = estimate_step(req.model, req.training, req.cluster, req.plan).breakdown
    assert terms.ep_comm_s == pytest.approx(16 * 16 * all_to_alls, rel=1e-12)
    with_ep = mixtral_graph_s(req)
    assert with_ep == pytest.approx(
        terms.compute_s + terms.tp_comm_s + terms.cp_comm_s + terms.ep_comm_s + terms.bubble_s, rel=rel
    )
    without = mixtral_graph_s(mixtral_request(schedule, ep=1, virtual_stages=virtual_stages))
    assert with_ep - without == pytest.approx(slots * 16 * all_to_alls, rel=1e-12)
    assert with_ep < mixtral_graph_s(req, p2p=True) < with_ep + terms.pp_comm_s
