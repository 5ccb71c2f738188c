"""The search's answers pinned: speed work on the search (issue 29) must not change what it finds.

Recorded from main at 1afeff3, before the search was made faster: the ranked plans, their step times and peaks,
and every candidate count; re-recorded when FSDP2 inside a pipeline came to reduce once a step and keep its
whole gradient, and ZeRO-2 on FSDP2 its sharded weights (fewer plans fit), and when gradient accumulation's memory
traffic was counted (planner/cost/accumulation.py: the leaders are slower by it, ZeRO-1's whole gradients most),
and when the executor's RoPE and autocast casts were counted and the Hopper matmul efficiency was measured on an
H200 (every plan slower; context parallelism's extra micro-batches pay their casts), when the host floor was
split into forward's and backward's time per launch, and when FSDP2's per-unit hooks were charged on the host
(planner/cost/data.py `fsdp_hooks_s`: a few ms a step, enough to reorder near ties).
A change to the cost model itself moves these on purpose; re-record them then (the command below prints the
lines), and only then.

    PYTHONPATH=. python -c "from tests.unit.test_search_pinned import record; record()"
"""

from __future__ import annotations

import numpy as np
import pytest

import planner
from planner.describe import describe_plan
from planner.search.solve import BoundOrder


def request(model: str, seq_len: int, batch: int, nodes: int) -> dict:
    return {
        "model": model,
        "training": {"seq_len": seq_len, "global_batch_size": batch},
        "cluster": {"gpu": "h100-sxm", "num_nodes": nodes, "gpus_per_node": 8},
    }


# (request, counts, ranked plans as (description, step seconds, peak bytes))
PINNED = {
    "llama3-8b on 8 H100": (
        request("llama3-8b", 8192, 64, 1),
        {"layouts": 20, "enumerated": 14316, "evaluated": 4096, "pruned_by_bound": 10220, "out_of_memory": 3653,
         "over_memory_band": 0, "over_host_memory": 0, "fits": 443, "partitioned": 0},
        [
            ("dp4 tp2 pp1 cp1 · ZeRO-2 · mbs 1 · sp · no recompute · 1f1b",
             8.818940818138701, 56433083596.8),
            ("dp4 tp1 pp1 cp2 · ZeRO-2 · mbs 1 · no recompute · 1f1b",
             8.840643153105992, 64952099635.2),
            ("dp4 tp2 pp1 cp1 · ZeRO-1 · mbs 1 · sp · no recompute · 1f1b",
             8.932768591790307, 60420084326.4),
            ("dp4 tp2 pp1 cp1 · ZeRO-2 · mbs 1 · no recompute · 1f1b",
             8.944729385311119, 61014381772.8),
            ("dp4 tp2 pp1 cp1 · ZeRO-3 · mbs 1 · sp · no recompute · 1f1b",
             8.9719326365015, 48459082137.6),
        ],
    ),
    # Offloading plans among the best; the pipelined ZeRO-3 ones do not fit (FSDP2 inside a pipeline keeps the
    # stage's whole gradient; planner/cost/data.py `sharded_passes`).
    "llama3-70b on 64 H100": (
        request("llama3-70b", 8192, 256, 8),
        {"layouts": 74, "enumerated": 180957, "evaluated": 126976, "pruned_by_bound": 53981, "out_of_memory": 114129,
         "over_memory_band": 0, "over_host_memory": 0, "fits": 12847, "partitioned": 3},
        [
            ("dp16 tp2 pp1 cp2 · ZeRO-3 · mbs 1 · sp · no recompute · 1f1b · offload optimizer and params",
             41.73633841722947, 64488807219.2),
            ("dp16 tp4 pp1 cp1 · ZeRO-3 · mbs 1 · sp · no recompute · 1f1b · offload optimizer and params",
             42.17014705461093, 63359281152.0),
            ("dp4 tp8 pp2 cp1 · ZeRO-1 · mbs 1 · sp · no recompute · interleaved_1f1b v3",
             42.34827724021271, 67631523430.40001),
            ("dp4 tp8 pp2 cp1 · ZeRO-1 · mbs 1 · sp · no recompute · interleaved_1f1b v4",
             42.34906800709364, 66412131942.4),
            ("dp4 tp8 pp2 cp1 · ZeRO-2 · mbs 1 · sp · no recompute · interleaved_1f1b v3",
             42.35710200608991, 72262211993.6),
        ],
    ),
    # Nothing fits without offload; the bound prunes what cannot beat the best offloading plans found.
    "llama3-405b on 32 H100": (
        request("llama3-405b", 8192, 64, 4),
        {"layouts": 52, "enumerated": 144735, "evaluated": 126976, "pruned_by_bound": 17759, "out_of_memory": 126935,
         "over_memory_band": 0, "over_host_memory": 0, "fits": 41, "partitioned": 0},
        [
            ("dp32 tp1 pp1 cp1 · ZeRO-3 · mbs 1 · full recompute · 1f1b · offload optimizer and params",
             145.48155280431646, 70069864038.4),
            ("dp16 tp2 pp1 cp1 · ZeRO-3 · mbs 2 · sp · full recompute · 1f1b · offload optimizer and params",
             144.6268426151604, 60162917990.4),
            ("dp16 tp1 pp1 cp2 · ZeRO-3 · mbs 2 · full recompute · 1f1b · offload optimizer and params",
             145.93102522742453, 70204081766.4),
            ("dp8 tp1 pp1 cp4 · ZeRO-3 · mbs 4 · full recompute · 1f1b · offload optimizer and params",
             146.39877411825395, 70204081766.4),
            ("dp8 tp2 pp1 cp2 · ZeRO-3 · mbs 4 · sp · full recompute · 1f1b · offload optimizer and params",
             145.07631503826846, 60297135718.4),
        ],
    ),
}  # fmt: skip


@pytest.mark.parametrize("name", PINNED)
def test_search_answers_are_unchanged(name):
    req, counts, plans = PINNED[name]
    result = planner.search(req)
    assert result.counts.model_dump() == counts
    got = [(describe_plan(p.plan), p.estimate.step_time_s, p.estimate.memory.peak_bytes) for p in result.plans]
    assert [g[0] for g in got] == [p[0] for p in plans]
    for (_, time_s, peak), (_, pinned_time_s, pinned_peak) in zip(got, plans, strict=True):
        assert time_s == pytest.approx(pinned_time_s, rel=1e-9)
        assert peak == pytest.approx(pinned_peak, rel=1e-9)


def record() -> None:
    """Print the current answers in PINNED's form."""
    for name, (req, _, _) in PINNED.items():
        result = planner.search(req)
        print(name, result.counts.model_dump())
        for p in result.plans:
            print(f"    ({describe_plan(p.plan)!r}, {p.estimate.step_time_s!r}, {p.estimate.memory.peak_bytes!r}),")


def test_bound_order_reads_the_stable_argsort_a_prefix_at_a_time():
    """The search reads rows best-first from a partial sort; it must be the full stable sort's prefix, ties in row
    order included (which rows a round costs decides the counts)."""
    bound = np.random.default_rng(0).integers(0, 500, size=300_000).astype(float)  # many ties
    expected = np.argsort(bound, kind="stable")
    order = BoundOrder(bound)
    for count in (1, 4097, 12_289, 70_000, 140_001, 300_000, 400_000):
        np.testing.assert_array_equal(order.first(count), expected[:count])
