"""How `paraplan validate` turns a plan's runs into one measured time (api/commands/loop/schedule.py `pooled`), which
plans it runs again after the sweep (`confirm_finalists`), and which failed runs it runs once more (`crashed`)."""

from __future__ import annotations

import inspect
import statistics
from dataclasses import replace
from pathlib import Path

from api.cli.validate import validate as cli_validate
from api.commands.defaults import DEFAULT_STEPS
from api.commands.loop.runs import PlanRun, crashed, failure
from api.commands.loop.schedule import MAX_FINALISTS, Attempt, confirm_finalists, finalists, pooled
from api.commands.loop.setup import ValidationSetup
from executor.launch import FailedRank, RunResult
from planner.specs import ParallelPlan


def plan_run(
    steps: list[float] | None, peak: int | None = None, error: str | None = None, predicted_s: float = 1.0
) -> PlanRun:
    measured = None if steps is None else statistics.median(steps)
    return PlanRun(ParallelPlan(dp=2), {"step_time_s": predicted_s}, "runs/000", measured, steps or [], peak, error)


class Reruns:
    """Runs the plans of `runs` again as a machine would: each plan's every later run takes its `repeat` time (None:
    fails), and is predicted as its first run was (from the same profile)."""

    def __init__(self, runs: list[PlanRun], repeat: dict[int, float | None]):
        self.runs, self.repeat = runs, repeat
        self.calls: list[tuple[int, int]] = []

    def __call__(self, index: int, attempt: int) -> PlanRun:
        self.calls.append((index, attempt))
        time, predicted = self.repeat[index], self.runs[index].predicted_s
        if time is None:
            return plan_run(None, error="rank 0: killed", predicted_s=predicted)
        return plan_run([time, time], predicted_s=predicted)


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


def test_the_finalists_are_the_plans_predicted_and_measured_fastest():
    runs = [plan_run([1.0], predicted_s=0.5), plan_run([0.8], predicted_s=0.7), plan_run(None, error="x")]
    assert finalists(runs) == [0, 1]
    assert finalists([plan_run([0.8], predicted_s=0.5), plan_run([1.0], predicted_s=0.7)]) == [0]
    assert finalists([plan_run([0.8]), plan_run(None, error="x")]) == []  # nothing to compare


def test_a_plan_measured_fast_once_is_run_again_until_the_fastest_is_one_that_ran_again():
    """Plan 1's one run fell in a fast spell (0.8 s, it repeats at 1.2); after it, plan 2 (0.9 once, repeats
    0.95) is the fastest not yet run again, so a second round runs it; then the fastest (plan 2) ran again."""
    runs = [plan_run([1.0], predicted_s=0.5), plan_run([0.8], predicted_s=0.7), plan_run([0.9], predicted_s=0.6),
            plan_run([1.1], predicted_s=0.9)]  # fmt: skip
    rerun = Reruns(runs, {0: 1.0, 1: 1.2, 2: 0.95, 3: 0.5})
    progress: list[Attempt] = []
    confirmed = confirm_finalists(runs, 2, rerun, progress.append)
    # Round one alternates plans 0 and 1 (forward, then backward); round two plan 2 alone.
    assert rerun.calls == [(0, 0), (1, 0), (1, 1), (0, 1), (2, 0), (2, 1)]
    assert [run.confirm_runs for run in confirmed] == [2, 2, 2, 0]
    assert [run.measured_s for run in confirmed] == [1.0, 1.2, 0.95, 1.1]  # medians of every step, pooled
    assert confirmed[1].step_times_s == [0.8, 1.2, 1.2, 1.2, 1.2]
    assert confirmed[3] == runs[3]  # never a finalist, never run again
    assert [(a.done, a.total) for a in progress] == [(1, 4), (2, 4), (3, 4), (4, 4), (5, 6), (6, 6)]
    assert progress[0].upcoming == runs[1].plan and progress[-1].upcoming is None
    assert progress[3].so_far[1].measured_s == 1.2  # the results so far pool the runs done so far


def test_no_plan_runs_again_when_the_predicted_best_is_measured_fastest_after_its_own_runs():
    runs = [plan_run([0.8], predicted_s=0.5), plan_run([1.0], predicted_s=0.7)]
    rerun = Reruns(runs, {0: 0.85, 1: 1.0})
    confirmed = confirm_finalists(runs, 3, rerun)
    assert rerun.calls == [(0, 0), (0, 1), (0, 2)] and confirmed[1] == runs[1]


def test_finalists_stop_at_the_limit_when_every_plan_is_slower_when_run_again():
    count = MAX_FINALISTS + 3
    runs = [plan_run([0.5 + i / 100], predicted_s=1.0 + i) for i in range(count)]
    rerun = Reruns(runs, dict.fromkeys(range(count), 9.0))
    confirmed = confirm_finalists(runs, 1, rerun)
    assert sorted(index for index, _ in rerun.calls) == list(range(MAX_FINALISTS))
    assert sum(1 for run in confirmed if run.confirm_runs) == MAX_FINALISTS


def test_a_finalist_that_fails_when_run_again_is_failed_and_out_of_the_race():
    runs = [plan_run([1.0], predicted_s=0.5), plan_run([0.8], predicted_s=0.7), plan_run([0.9], predicted_s=0.8)]
    rerun = Reruns(runs, {0: 1.0, 1: None, 2: 0.9})
    confirmed = confirm_finalists(runs, 1, rerun)
    assert confirmed[1].error == "rank 0: killed" and confirmed[1].measured_s is None
    assert rerun.calls == [(0, 0), (1, 0), (2, 0)]  # plan 2 became the fastest that ran, and ran again


def launch_result(exitcode: int | None, timed_out: bool = False) -> RunResult:
    """How a launch ended: every rank fine (None), or rank 1 failed first with `exitcode` (negative: a signal)."""
    failed = [] if exitcode is None else [FailedRank(1, exitcode, "the rank's message", root_cause=True)]
    return RunResult(0 if exitcode is None else 1, failed, Path("logs"), timed_out=timed_out)


def test_a_run_killed_by_a_signal_crashed_and_one_that_raised_or_ran_out_of_time_did_not():
    assert crashed(launch_result(-6)) and crashed(launch_result(-9))
    assert not crashed(launch_result(None))
    assert not crashed(launch_result(1))  # an exception in the plan's own run (CUDA out of memory too)
    assert not crashed(launch_result(-9, timed_out=True))  # killed at the run's time limit: no second try
    assert failure(launch_result(-6)) == "rank 1: the rank's message"


def test_a_crash_survived_by_running_again_is_kept_through_pooling():
    again = replace(plan_run([1.0, 2.0]), crash="rank 1: Signal 6 (SIGABRT)")
    both = pooled([plan_run([3.0]), again])
    assert both.crash == "rank 1: Signal 6 (SIGABRT)" and both.measured_s == 2.0
    failed = pooled([again, plan_run(None, error="rank 0: out of memory")])
    assert failed.error == "rank 0: out of memory" and failed.crash == again.crash


def test_paraplan_validate_trains_each_plan_the_default_number_of_steps():
    """The CLI's option, the loop's setup and the default agree (the CLI imports the loop only when it runs)."""
    assert inspect.signature(cli_validate).parameters["steps"].default == DEFAULT_STEPS == ValidationSetup.steps
