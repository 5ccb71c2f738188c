"""planner/describe.py: the one line a plan is printed as (the CLI, the search's explanation, the benchmarks)."""

from planner.describe import describe_plan
from planner.specs import ParallelPlan


def test_a_plan_with_every_option_set_reads_in_one_line():
    plan = ParallelPlan(
        dp=16, tp=8, pp=8, zero_stage=1, micro_batch_size=1, sequence_parallel=True, recompute="selective",
        schedule="interleaved_1f1b", virtual_stages=3,
    )  # fmt: skip
    assert describe_plan(plan) == "dp16 tp8 pp8 cp1 · ZeRO-1 · mbs 1 · sp · selective recompute · interleaved_1f1b v3"


def test_defaults_name_every_degree_and_say_no_recompute():
    plan = ParallelPlan(dp=2, tp=1, pp=1, cp=2, zero_stage=0, micro_batch_size=4, schedule="1f1b")
    assert describe_plan(plan) == "dp2 tp1 pp1 cp2 · ZeRO-0 · mbs 4 · no recompute · 1f1b"


def test_a_layer_split_is_listed_stage_by_stage():
    plan = ParallelPlan(dp=1, tp=1, pp=2, zero_stage=0, schedule="gpipe", layers_per_stage=(3, 5))
    assert describe_plan(plan) == "dp1 tp1 pp2 cp1 · ZeRO-0 · mbs 1 · no recompute · gpipe · layers 3,5"
