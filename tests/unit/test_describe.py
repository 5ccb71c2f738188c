"""planner/describe.py: the one line a plan is printed as (the CLI, the search's explanation, the benchmarks)."""

from planner.describe import describe_plan, describe_plan_compact
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


def test_a_compact_label_names_only_what_applies() -> None:
    plan = ParallelPlan(dp=2, pp=2, zero_stage=1, micro_batch_size=4, sequence_parallel=False, schedule="1f1b")
    assert describe_plan_compact(plan) == "dp2 tp1 pp2 zero1 mbs4 none 1f1b"
    single = ParallelPlan(tp=2, sequence_parallel=True, recompute="full")
    assert describe_plan_compact(single) == "dp1 tp2 pp1 mbs1 full sp"


def test_a_compact_label_names_context_parallelism_and_its_zero_group() -> None:
    assert describe_plan_compact(ParallelPlan(cp=2, zero_stage=2)) == "dp1 tp1 pp1 cp2 zero2 mbs1 none"


def test_expert_parallelism_is_named_only_above_one() -> None:
    plan = ParallelPlan(dp=8, ep=4, zero_stage=2)
    assert describe_plan(plan).startswith("dp8 tp1 pp1 cp1 ep4 · ZeRO-2")
    assert describe_plan_compact(plan).startswith("dp8 tp1 pp1 ep4 zero2")
    assert "ep" not in describe_plan(ParallelPlan(dp=8)).split(" · ")[0]
