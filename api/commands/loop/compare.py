"""Predicted against measured: the figures before calibration and held out after, and the fitted calibration."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from api.commands.loop.runs import PlanRun
from api.commands.loop.setup import ValidationSetup
from api.commands.loop.techniques import Skipped, technique_entries
from planner import agreement
from planner.calibration import MeasuredStep, fit_calibration, held_out_predictions, predict_steps
from planner.profiles import load_profile_json
from planner.request import parse_estimate_request
from planner.specs import HardwareProfile


@dataclass(frozen=True)
class Figures:
    """How predictions agree with the runs (planner/agreement.py)."""

    mape: float
    kendall_tau: float
    regret: float

    @classmethod
    def of(cls, predicted: np.ndarray, measured: np.ndarray) -> Figures:
        return cls(
            mape=agreement.mape(predicted, measured),
            kendall_tau=agreement.kendall_tau(predicted, measured),
            regret=agreement.top1_regret(predicted, measured),
        )


@dataclass(frozen=True)
class Validation:
    """A finished validation: every plan's run, the figures before and after calibration (held out), and the
    calibrated profile."""

    setup: ValidationSetup
    runs: list[PlanRun]
    held_out_s: list[float]  # per measured run, predicted by the calibration fitted on the other half
    before: Figures
    after: Figures
    calibrated: HardwareProfile

    @property
    def memory_mape(self) -> float | None:
        """The mean absolute error of the predicted allocated peak (`PlanRun.predicted_allocated_bytes`) over the
        runs' measured one, on a GPU; None on a CPU, where the measured peak is the process's resident set."""
        runs = [run for run in self.measured if run.measured_peak_bytes]
        if self.setup.device != "cuda" or not runs:
            return None
        predicted = np.array([run.predicted_allocated_bytes for run in runs])
        return agreement.mape(predicted, np.array([run.measured_peak_bytes for run in runs], dtype=float))

    @property
    def measured(self) -> list[PlanRun]:
        return [run for run in self.runs if run.measured_s is not None]

    @property
    def paired(self) -> bool:
        """The runs were predicted from profiles measured next to them (`ValidationSetup.paired`); a technique
        entry's own profile (api/commands/loop/techniques.py) does not make a validation paired."""
        return self.setup.paired or any(run.profile_file and run.technique is None for run in self.runs)

    @property
    def left_out(self) -> list[Skipped]:
        """The techniques asked for that this machine cannot run, with why."""
        return technique_entries(self.setup)[1]

    def figures_json(self) -> dict[str, Any]:
        """What `--json` prints: the headline figures (before calibration at the top level, as the issue names
        them) and the fitted calibration."""
        calibration = self.calibrated.calibration
        return {
            **asdict(self.before),
            "memory_mape": self.memory_mape,
            "calibrated": {**asdict(self.after), "held_out": True},
            "paired": self.paired,
            "plans": len(self.runs),
            "measured": len(self.measured),
            "failed": [_plan_json(r) | {"error": r.error} for r in self.runs if r.error],
            "crashed_once": [_plan_json(r) | {"error": r.crash} for r in self.runs if r.crash],
            "techniques": [
                _plan_json(r) | {"predicted_s": r.predicted_s, "measured_s": r.measured_s}
                for r in self.runs
                if r.technique
            ],
            "left_out": [{"technique": s.technique, "reason": s.reason} for s in self.left_out],
            "calibration": calibration.model_dump(mode="json") if calibration else None,
        }


def _plan_json(run: PlanRun) -> dict[str, Any]:
    """A run's plan, and the technique entry it is (None for the search space's plans)."""
    return {"plan": run.plan.model_dump(mode="json"), "technique": run.technique}


def trained_request(run: PlanRun, setup: ValidationSetup) -> dict[str, Any]:
    """The request the run trained: its own, kept since technique entries train their own model or precision;
    the setup's for runs recorded before (every run trained the setup's)."""
    return run.request or setup.request(run.plan)


def own_profile(run: PlanRun) -> HardwareProfile | None:
    """The profile measured next to the run, in a paired validation; None otherwise."""
    return load_profile_json(Path(run.profile_file)) if run.profile_file else None


def compare(setup: ValidationSetup, profile: HardwareProfile, runs: list[PlanRun], created: str) -> Validation:
    """The figures before calibration, the held-out figures after, and the calibration fitted on every run."""
    measured = [run for run in runs if run.measured_s is not None]
    if len(measured) < 2:
        raise RuntimeError(f"only {len(measured)} plan(s) ran; comparing and calibrating needs at least two")
    steps = [
        MeasuredStep(parse_estimate_request(trained_request(run, setup)), run.measured_s, own_profile(run))  # type: ignore[arg-type]
        for run in measured
    ]
    times = np.array([run.measured_s for run in measured])
    before = predict_steps(profile, steps)
    held_out = held_out_predictions(profile, steps, created)
    calibrated = fit_calibration(profile, steps, created)
    return Validation(
        setup=setup,
        runs=runs,
        held_out_s=held_out.tolist(),
        before=Figures.of(before, times),
        after=Figures.of(held_out, times),
        calibrated=calibrated,
    )
