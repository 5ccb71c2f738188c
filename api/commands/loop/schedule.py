"""The order of the runs: every plan once per pass (odd passes reversed), then the finalists again, each plan's runs
pooled into one."""

from __future__ import annotations

import statistics
import threading
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from api.commands.loop.records import PROFILE_FILE
from api.commands.loop.runs import PlanRun, run_plan
from api.commands.loop.setup import ValidationSetup
from api.commands.loop.techniques import Entry
from planner.profiles import save_profile_json
from planner.specs import HardwareProfile, ParallelPlan


def run_all(
    setup: ValidationSetup,
    plans: list[Entry],
    profile_for_pass: Callable[[int], HardwareProfile],
    cancel: threading.Event,
    on_attempt: Callable[[Attempt], None] = lambda attempt: None,
    profile_for_run: Callable[[Entry, HardwareProfile], HardwareProfile | None] | None = None,
) -> list[PlanRun]:
    """Run every plan (an entry of the grid: a plan and the setup it trains) `setup.passes` times, one run at a
    time (they share this machine), odd passes in reverse order, so that early and late plans see the machine's
    drift alike; a plan's result pools its passes
    (`pooled`). Each pass's runs are estimated from `profile_for_pass(pass)`, called as the pass begins (it may
    measure). Then the finalists are run `setup.confirm` times more (`confirm_finalists`), estimated from the last
    pass's profile. After each run, `on_attempt` sees the progress and the result so far of every plan run at
    least once. Each run for which `profile_for_run(entry, pass profile)` gives a profile (in a paired validation,
    its plan's layers measured just before it; for a technique entry of another model or precision, that
    entry's own layers) is estimated from it, and keeps it in its run folder."""
    attempts: list[list[PlanRun]] = [[] for _ in plans]
    schedule = [(attempt, i) for attempt in range(setup.passes) for i in _pass_order(len(plans), attempt)]
    done = 0
    profile = None
    for attempt in range(setup.passes):
        profile = profile_for_pass(attempt)
        for i in _pass_order(len(plans), attempt):
            folder = f"{i:03d}" if setup.passes == 1 else f"{i:03d}-pass{attempt + 1}"
            attempts[i].append(_run_one(plans[i], profile, setup.out / "runs" / folder, cancel, profile_for_run))
            done += 1
            upcoming = plans[schedule[done][1]].plan if done < len(schedule) else None
            on_attempt(Attempt(done, len(schedule), upcoming, [pooled(runs) for runs in attempts if runs]))
    swept = [pooled(runs) for runs in attempts]
    if setup.confirm == 0 or profile is None:
        return swept
    last_profile = profile

    def rerun(i: int, attempt: int) -> PlanRun:
        folder = setup.out / "runs" / f"{i:03d}-confirm{attempt + 1}"
        return _run_one(plans[i], last_profile, folder, cancel, profile_for_run)

    return confirm_finalists(swept, setup.confirm, rerun, lambda progress: on_attempt(progress.after(done)))


@dataclass(frozen=True)
class Attempt:
    """Progress of a validation's runs: `done` of the `total` runs known so far, the plan up next (None when none
    is known) and every plan's result so far."""

    done: int
    total: int
    upcoming: ParallelPlan | None
    so_far: list[PlanRun]

    def after(self, earlier: int) -> Attempt:
        """This progress counted after `earlier` runs already done."""
        return replace(self, done=self.done + earlier, total=self.total + earlier)


# A plan's time is the median of one run's steady steps, and runs of the same plan differ by more than their
# steps do (the machine's speed drifts over minutes): among 90 plans measured once, the fastest is most often a
# plan whose one run fell in a fast spell (the winner's curse), and the top-1 regret then compares the predicted
# best with a time no run of that plan would repeat (validations s11 and s12: dp2 ZeRO-1 mbs2 measured 0.228 and
# 0.238 s, 11-21% under its ZeRO-0 twin; run four times alternating with it, 0.291 s, 5% over). So the finalists,
# the plan predicted fastest and the plan measured fastest, are run again before the figures are taken, until the
# plan measured fastest is one that was run again, or MAX_FINALISTS plans were.
MAX_FINALISTS = 6


def confirm_finalists(
    runs: list[PlanRun],
    passes: int,
    rerun: Callable[[int, int], PlanRun],
    on_attempt: Callable[[Attempt], None] = lambda attempt: None,
) -> list[PlanRun]:
    """`runs` with the finalists (`finalists`) each run `passes` times more by `rerun(index, pass)`, in
    alternating order, and pooled with their first result; round after round while the plan measured fastest has
    not been run again, at most MAX_FINALISTS plans in all. A finalist's `confirm_runs` counts its extra runs."""
    runs = list(runs)
    confirmed: set[int] = set()
    done = 0
    while todo := [i for i in finalists(runs) if i not in confirmed][: MAX_FINALISTS - len(confirmed)]:
        extra: dict[int, list[PlanRun]] = {i: [] for i in todo}
        schedule = [i for attempt in range(passes) for i in _alternating(todo, attempt)]
        for step, i in enumerate(schedule):
            extra[i].append(rerun(i, len(extra[i])))
            done += 1
            upcoming = runs[schedule[step + 1]].plan if step + 1 < len(schedule) else None
            on_attempt(Attempt(done, done - step - 1 + len(schedule), upcoming, _with_extras(runs, extra)))
        runs = _with_extras(runs, extra)
        confirmed.update(todo)
    return runs


def finalists(runs: list[PlanRun]) -> list[int]:
    """The indices of the plan predicted fastest and of the plan measured fastest, among the runs that ran."""
    ran = [i for i, run in enumerate(runs) if run.measured_s is not None]
    if len(ran) < 2:
        return []
    predicted_best = min(ran, key=lambda i: runs[i].predicted_s)
    measured_best = min(ran, key=lambda i: runs[i].measured_s)  # type: ignore[arg-type, return-value]
    return sorted({predicted_best, measured_best})


def _with_extras(runs: list[PlanRun], extra: dict[int, list[PlanRun]]) -> list[PlanRun]:
    """`runs`, each pooled with its extra runs (by index) so far."""
    return [_with_extra(run, extra.get(i, [])) for i, run in enumerate(runs)]


def _with_extra(run: PlanRun, extra: list[PlanRun]) -> PlanRun:
    if not extra:
        return run
    return replace(pooled([run, *extra]), confirm_runs=run.confirm_runs + len(extra))


def _run_one(
    entry: Entry,
    profile: HardwareProfile,
    run_dir: Path,
    cancel: threading.Event,
    profile_for_run: Callable[[Entry, HardwareProfile], HardwareProfile | None] | None,
) -> PlanRun:
    """`run_plan` of the entry in its own setup, estimated from its own profile when `profile_for_run` gives one
    (paired, or an entry with its own layers); that profile is then saved in the folder of the run measured
    (`<run_dir>-again` after a crash)."""
    own = profile_for_run(entry, profile) if profile_for_run is not None else None
    if own is None:
        return replace(run_plan(entry.setup, entry.plan, profile, run_dir, cancel), technique=entry.technique)
    run = replace(run_plan(entry.setup, entry.plan, own, run_dir, cancel), technique=entry.technique)
    return replace(run, profile_file=str(save_profile_json(own, Path(run.run_dir) / PROFILE_FILE)))


def _pass_order(count: int, attempt: int) -> list[int]:
    """The plans' indices in the order pass `attempt` runs them: forward, then backward, and so on."""
    return _alternating(list(range(count)), attempt)


def _alternating(items: list[int], attempt: int) -> list[int]:
    return items if attempt % 2 == 0 else items[::-1]


def pooled(runs: list[PlanRun]) -> PlanRun:
    """One plan's runs as one: the first failure if any failed, else the median of every run's steady steps, with
    the last run's estimate (made from the profile as it stood after every pass's measurement); either way with
    the first crash that a run survived by running again."""
    crash = next((run.crash for run in runs if run.crash), None)
    failed = next((run for run in runs if run.measured_s is None), None)
    if failed is not None:
        return replace(failed, crash=crash)
    steps = [step for run in runs for step in run.step_times_s]
    peaks = [run.measured_peak_bytes for run in runs if run.measured_peak_bytes is not None]
    return replace(runs[-1], run_dir=runs[0].run_dir, measured_s=statistics.median(steps), step_times_s=steps,
                   measured_peak_bytes=max(peaks) if peaks else None, crash=crash)  # fmt: skip
