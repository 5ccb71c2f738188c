"""The whole loop: profile, run every plan, compare, calibrate, and keep what it measured."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from api.commands.loop.compare import Validation, compare
from api.commands.loop.profile import measure_profile
from api.commands.loop.records import (
    CALIBRATED_PROFILE_FILE,
    PROFILE_FILE,
    RUNS_FILE,
    read_runs,
    run_record,
    store_calibrated,
    store_runs,
    write_runs,
)
from api.commands.loop.runs import PlanRun
from api.commands.loop.schedule import Attempt, run_all
from api.commands.loop.setup import ValidationSetup
from api.commands.loop.techniques import Entry, entry_profile, grid
from api.commands.progress import Progress
from api.errors import InputError
from api.store import ApiStore, utc_now
from planner.describe import describe_plan_compact
from planner.profiles import save_profile_json
from planner.specs import HardwareProfile
from profiler.pool import overlay_profile, pool_profiles


@dataclass(frozen=True)
class Outputs:
    """Where a validation's results go: files in `setup.out`, and with `store` the database (measured runs, and
    the calibrated profile as a new stored profile). The measured runs reach the database once every run is done;
    a stopped validation keeps them in its runs.json, which `--runs` reads."""

    store: ApiStore | None
    validation_id: str
    job_id: str | None = None


def validate(
    setup: ValidationSetup,
    profile: HardwareProfile | None,
    outputs: Outputs,
    progress: Progress,
    cancel: threading.Event,
    earlier_runs: Path | None = None,
) -> tuple[Validation, str | None]:
    """The whole loop (module docstring); the validation and the stored id of its calibrated profile, if stored.
    With `earlier_runs` (an earlier validation's runs.json) and a profile, nothing is profiled or run: those runs
    are compared with the cost model's predictions as they are now (`read_runs`), and calibrated again."""
    if earlier_runs is not None:
        if profile is None:
            raise InputError.at("--profile", "comparing earlier runs needs the profile to predict them from")
        runs = read_runs(earlier_runs, setup, profile)
        setup.out.mkdir(parents=True, exist_ok=True)
        save_profile_json(profile, setup.out / PROFILE_FILE)
        progress.note(f"comparing the {len(runs)} runs of {earlier_runs} with the cost model; results in {setup.out}")
    else:
        profile, runs = _profile_and_run(setup, profile, progress, cancel)
    write_runs(setup.out / RUNS_FILE, runs, setup)
    if earlier_runs is None and outputs.store is not None:
        records = [run_record(run, setup) for run in runs]
        store_runs(outputs.store, records, outputs.validation_id, outputs.job_id)
    result = compare(setup, profile, runs, utc_now())
    save_profile_json(result.calibrated, setup.out / CALIBRATED_PROFILE_FILE)
    stored = None
    if outputs.store is not None:
        stored = store_calibrated(outputs.store, result.calibrated, outputs.validation_id)
    return result, stored


def _profile_and_run(
    setup: ValidationSetup,
    profile: HardwareProfile | None,
    progress: Progress,
    cancel: threading.Event,
) -> tuple[HardwareProfile, list[PlanRun]]:
    """Steps 1-3 of the loop: the profile (measured unless given) and every valid plan's run. With several passes
    of runs, a profile pass is measured before each pass of runs and the profiles are pooled (profiler/pool.py),
    so that the profile samples the machine over the same stretch of time as the runs; each pass's runs are
    estimated from the pooled profile so far, and the last pass's from all of it."""
    plans, skipped = grid(setup)
    if len(plans) < 2:
        raise InputError(f"the search space holds {len(plans)} plan(s) the executor can run; validating needs two")
    setup.out.mkdir(parents=True, exist_ok=True)
    progress.note(f"validating {len(plans)} plans on {setup.nproc} {setup.device} rank(s); results in {setup.out}")
    for left_out in skipped:
        progress.note(f"left out the {left_out.technique} entry: {left_out.reason}")
    # The validation's profile times the layers of every entry that trains its model at its precision.
    profiled = [entry.plan for entry in plans if not entry.own_layers]
    if profile is None and setup.passes == 1:
        profile = measure_profile(setup, profiled, progress, cancel)
    if profile is not None:
        save_profile_json(profile, setup.out / PROFILE_FILE)  # before the runs: a stopped validation keeps it
        given = profile
        return profile, _run_with_progress(setup, plans, lambda attempt: given, progress, cancel)
    measured: list[HardwareProfile] = []

    def profile_pass(attempt: int) -> HardwareProfile:
        measured.append(measure_profile(setup, profiled, progress, cancel, passes=1, collectives=attempt == 0))
        pooled_so_far = pool_profiles(measured)
        save_profile_json(pooled_so_far, setup.out / PROFILE_FILE)
        return pooled_so_far

    runs = _run_with_progress(setup, plans, profile_pass, progress, cancel)
    return pool_profiles(measured), runs


def _run_with_progress(
    setup: ValidationSetup,
    plans: list[Entry],
    profile_for_pass: Callable[[int], HardwareProfile],
    progress: Progress,
    cancel: threading.Event,
) -> list[PlanRun]:
    # The profiler's own tasks, started while the runs' task shows, hide it until they end (`Progress.task`).
    with progress.task("runs", total=len(plans) * setup.passes, what=describe_plan_compact(plans[0].plan)) as update:

        def on_attempt(attempt: Attempt) -> None:
            upcoming = describe_plan_compact(attempt.upcoming) if attempt.upcoming else "done"
            update(done=attempt.done, total=attempt.total, what=upcoming)
            # A stopped validation keeps what it measured, in the form `--runs` re-analyses.
            write_runs(setup.out / RUNS_FILE, attempt.so_far, setup)

        own_layers: dict[str, HardwareProfile] = {}  # a technique entry's layers, measured before its first run

        def profile_for_run(entry: Entry, profile: HardwareProfile) -> HardwareProfile | None:
            if entry.own_layers and entry.technique is not None:
                if setup.paired or entry.technique not in own_layers:
                    own_layers[entry.technique] = measure_profile(
                        entry.setup, [entry.plan], progress, cancel, passes=1, collectives=False
                    )
                return entry_profile(profile, own_layers[entry.technique])
            if not setup.paired:
                return None
            own = measure_profile(entry.setup, [entry.plan], progress, cancel, passes=1, collectives=False)
            return overlay_profile(profile, own)

        return run_all(setup, plans, profile_for_pass, cancel, on_attempt, profile_for_run)
