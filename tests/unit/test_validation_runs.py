"""How `paraplan validate` turns a plan's runs into one measured time (api/validation.py `pooled`)."""

from __future__ import annotations

import statistics

from api.validation import PlanRun, pooled
from planner.specs import ParallelPlan


def plan_run(
    steps: list[float] | None, peak: int | None = None, error: str | None = None, predicted_s: float = 1.0
) -> PlanRun:
    measured = None if steps is None else statistics.median(steps)
    return PlanRun(ParallelPlan(dp=2), {"step_time_s": predicted_s}, "runs/000", measured, steps or [], peak, error)


def test_a_plan_run_several_times_pools_its_steady_steps():
    both = pooled([plan_run([1.0, 2.0, 9.0], peak=100), plan_run([3.0, 4.0, 5.0], peak=300)])
    assert both.measured_s == 3.5  # the median of all six steps, not a median of medians (2 and 4)
    assert both.step_times_s == [1.0, 2.0, 9.0, 3.0, 4.0, 5.0]
    assert both.measured_peak_bytes == 300 and both.error is None


def test_a_plan_that_failed_once_is_failed():
    failed = plan_run(None, error="rank 1: out of memory")
    assert pooled([plan_run([1.0, 2.0]), failed]) == failed


def test_one_run_is_its_own_result():
    once = plan_run([0.2, 0.3, 0.25], peak=7)
    assert pooled([once]) == once


def test_the_pooled_run_is_predicted_from_the_profile_of_its_last_pass():
    """Under `--passes` a profile pass precedes each pass of runs: the last run's estimate comes from all of them."""
    first, last = plan_run([1.0], predicted_s=0.8), plan_run([1.2], predicted_s=0.9)
    assert pooled([first, last]).predicted_s == 0.9
