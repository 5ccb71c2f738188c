"""Calibrating a profile to measured runs (planner/calibration.py) and the cost model reading the factors back.

The profile is a real one: `paraplan validate --nproc 2` measured it on a 2-core CPU for its default model
(tests/unit/fixtures/validation/cpu-profile.json).
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from api.commands.defaults import VALIDATION_MODEL
from api.commands.loop.setup import ValidationSetup, valid_plans
from planner import calibration
from planner.calibration import (
    FACTORS,
    MeasuredStep,
    fit_calibration,
    halves,
    held_out_predictions,
    huber_residuals,
    predict_steps,
    starting_point,
)
from planner.cost.measured import ProfileCosts
from planner.profiles import load_profile_json, save_profile_json
from planner.request import parse_estimate_request, resolve_model
from planner.specs import Calibration, HardwareProfile, ModelSpec, SearchOptions, TimingStats

PROFILE = load_profile_json(Path(__file__).parent / "fixtures" / "validation" / "cpu-profile.json")
TRUE = Calibration(
    compute_efficiency={"forward": 0.6, "backward": 0.7, "optimizer": 0.8},
    collective_efficiency={"intra_node": 0.3},
    collective_latency_efficiency={"intra_node": 0.2},
    overlap=0.5,
    microbatch_overhead_s=0.002,
    step_overhead_s=0.03,
    num_runs=1,
    fit_mape=0.0,
    created="2026-11-22T00:00:00+00:00",
)


def setup(**search: object) -> ValidationSetup:
    model = ModelSpec.model_validate(resolve_model(json.loads(VALIDATION_MODEL)))
    return ValidationSetup(model=model, seq_len=128, global_batch_size=8, nproc=2, out=Path("unused"),
                           search=SearchOptions(**search))  # fmt: skip


def runs_measured_under(calibration: Calibration, max_plans: int = 14) -> list[MeasuredStep]:
    """Plans of every layout, with the step times the cost model gives under `calibration` as 'measured'."""
    chosen = setup(micro_batch_sizes=(1, 2, 4))
    plans = valid_plans(ValidationSetup(**{**chosen.__dict__, "max_plans": max_plans}))
    steps = [MeasuredStep(parse_estimate_request(chosen.request(plan)), 1.0) for plan in plans]
    truth = predict_steps(PROFILE.model_copy(update={"calibration": calibration}), steps)
    return [MeasuredStep(step.request, float(t)) for step, t in zip(steps, truth, strict=True)]


def test_calibrated_profile_answers_with_its_factors_applied():
    plain, calibrated = ProfileCosts(PROFILE), ProfileCosts(PROFILE.model_copy(update={"calibration": TRUE}))
    layer = plain.layer("block", 1, 4, 128, "fp32", "none")
    scaled = calibrated.layer("block", 1, 4, 128, "fp32", "none")
    assert scaled.forward_s == pytest.approx(layer.forward_s / 0.6)
    assert scaled.backward_s == pytest.approx(layer.backward_s / 0.7)
    assert calibrated.optimizer_s_per_param("adamw") == pytest.approx(plain.optimizer_s_per_param("adamw") / 0.8)
    assert (plain.step_overhead_s, calibrated.step_overhead_s) == (0.0, 0.03)
    fit, scaled_fit = (
        plain.channel_fit("all_reduce", "intra_node", 2),
        calibrated.channel_fit("all_reduce", "intra_node", 2),
    )
    assert scaled_fit.bandwidth_GBps == pytest.approx(fit.bandwidth_GBps * 0.3)
    assert scaled_fit.latency_s == pytest.approx(fit.latency_s / 0.2)


def test_calibration_slows_every_plan_and_survives_the_profile_file(tmp_path: Path):
    runs = runs_measured_under(TRUE)
    before = predict_steps(PROFILE, runs)
    assert np.all(np.array([run.measured_s for run in runs]) > before)  # every efficiency < 1, overhead > 0
    reloaded = load_profile_json(
        save_profile_json(PROFILE.model_copy(update={"calibration": TRUE}), tmp_path / "p.json")
    )
    assert reloaded.calibration == TRUE
    assert predict_steps(reloaded, runs) == pytest.approx([run.measured_s for run in runs])


def test_fit_recovers_the_step_times_of_known_factors_and_predicts_held_out_plans():
    runs = runs_measured_under(TRUE)
    measured = np.array([run.measured_s for run in runs])
    assert np.mean(np.abs(predict_steps(PROFILE, runs) / measured - 1)) > 0.3  # far off before calibration

    calibrated = fit_calibration(PROFILE, runs, created="now")
    fitted = calibrated.calibration
    assert fitted is not None and fitted.num_runs == len(runs)
    assert fitted.fit_mape < 0.02
    assert np.abs(predict_steps(calibrated, runs) / measured - 1).max() < 0.05
    # No plan on one node touches the inter-node tier: the prior keeps its factors where they were.
    assert fitted.collective_efficiency["inter_node"] == pytest.approx(1.0, abs=1e-3)
    assert fitted.collective_latency_efficiency["inter_node"] == pytest.approx(1.0, abs=1e-3)

    held_out = held_out_predictions(PROFILE, runs, created="now")
    assert np.mean(np.abs(held_out / measured - 1)) < 0.05


def test_halves_deal_every_layout_to_both_sides():
    runs = runs_measured_under(TRUE)
    first, second = halves(runs)
    assert sorted(first + second) == list(range(len(runs)))
    assert abs(len(first) - len(second)) <= 1

    def layouts(side: list[int]) -> set[tuple[int, int, int]]:
        return {(runs[i].request.plan.dp, runs[i].request.plan.tp, runs[i].request.plan.pp) for i in side}

    assert layouts(first) == layouts(second) == {(2, 1, 1), (1, 2, 1), (1, 1, 2)}


def test_a_fit_needs_positive_measured_times():
    run = runs_measured_under(TRUE, max_plans=2)[0]
    with pytest.raises(ValueError, match="> 0"):
        fit_calibration(PROFILE, [MeasuredStep(run.request, 0.0)], created="now")
    with pytest.raises(ValueError, match="at least two"):
        held_out_predictions(PROFILE, [run], created="now")


def test_the_fit_starts_from_the_overlap_the_profile_measured():
    """A profile that measured its compute-communication overlap predicts with it uncalibrated, so the fit
    starts (and its prior holds it) there rather than at 1."""
    names = [factor.name for factor in FACTORS]
    assert starting_point(PROFILE)[names.index("overlap")] == 1.0
    measured = PROFILE.model_copy(update={"comm_compute_overlap": 0.2})
    assert starting_point(measured)[names.index("overlap")] == 0.2
    others = [i for i, name in enumerate(names) if name != "overlap"]
    assert np.array_equal(starting_point(measured)[others], starting_point(PROFILE)[others])


def _slower(profile: HardwareProfile, factor: float) -> HardwareProfile:
    """`profile` with every layer, optimizer step and meeting wait `factor` times slower: a slow spell."""
    from profiler.pool import POOLED_LISTS

    def slowed(entry: Any) -> Any:
        return entry.model_copy(update={name: value.model_copy(update={"median_s": value.median_s * factor})
                                        for name, value in entry if isinstance(value, TimingStats)})  # fmt: skip

    return profile.model_copy(update={name: [slowed(e) for e in getattr(profile, name)] for name in POOLED_LISTS})


def test_a_run_with_its_own_profile_is_predicted_from_it_under_the_same_calibration():
    runs = runs_measured_under(TRUE)
    slow = _slower(PROFILE, 1.5)
    paired = [replace(runs[0], profile=slow), *runs[1:]]
    calibrated = PROFILE.model_copy(update={"calibration": TRUE})
    plain, own = predict_steps(calibrated, runs), predict_steps(calibrated, paired)
    assert own[1:] == pytest.approx(plain[1:])  # the others still come from the validation's profile
    assert own[0] > 1.2 * plain[0]  # the run's own, slower profile, with TRUE's efficiencies and overheads
    assert own[0] == pytest.approx(predict_steps(slow.model_copy(update={"calibration": TRUE}), runs[:1])[0])
    # A fit to runs measured in the slow spell, each paired with the profile of that spell, finds the same factors.
    truth = predict_steps(slow.model_copy(update={"calibration": TRUE}), runs)
    in_spell = [MeasuredStep(run.request, float(t), slow) for run, t in zip(runs, truth, strict=True)]
    fitted = fit_calibration(PROFILE, in_spell, created="now")
    assert np.abs(predict_steps(fitted, in_spell) / truth - 1).max() < 0.05


def test_huber_residuals_square_to_huber_loss():
    r = np.array([-0.3, -0.05, -0.01, 0.0, 0.02, 0.05, 0.2])
    delta = 0.05
    loss = np.where(np.abs(r) <= delta, r**2, 2 * delta * np.abs(r) - delta**2)
    residuals = huber_residuals(r, delta)
    assert residuals**2 == pytest.approx(loss)
    assert np.array_equal(np.sign(residuals), np.sign(r))
    assert huber_residuals(np.array([0.01]), delta) == pytest.approx([0.01])  # least squares near the fit


def test_one_run_a_busy_machine_slowed_barely_moves_the_fit(monkeypatch: pytest.MonkeyPatch):
    """A run 50% slow (a neighbour took the cores) pulls a least-squares fit off the other runs; under Huber's
    loss it pulls only as hard as a run HUBER_DELTA off, so the others stay close."""
    runs = runs_measured_under(TRUE)
    truth = np.array([run.measured_s for run in runs[1:]])
    spoiled = [replace(runs[0], measured_s=runs[0].measured_s * 1.5), *runs[1:]]

    def error_on_the_others() -> float:
        fitted = fit_calibration(PROFILE, spoiled, created="now")
        return float(np.mean(np.abs(predict_steps(fitted, runs[1:]) / truth - 1)))

    robust = error_on_the_others()
    monkeypatch.setattr(calibration, "HUBER_DELTA", 10.0)  # no residual beyond it: least squares
    assert robust < 0.02
    assert error_on_the_others() > 1.5 * robust
