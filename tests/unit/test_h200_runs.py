"""The cost model against real runs: Llama-3.2-1B plans the executor trained on one H200
(benchmarks/gpu_validation.sh; tests/data/h200-llama3.2-1b holds each validation's profile.json and runs.json).
Every run is predicted again from its profile, as `paraplan validate --runs` does, and its predicted allocated
peak and step time compared with the measured ones. No GPU needed: the measurements are data."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from api.cli import app
from api.cli.validate import validation_setup
from api.commands.loop.compare import Validation, compare
from api.commands.loop.records import read_runs
from api.commands.loop.report import markdown
from api.commands.loop.runs import PlanRun
from api.commands.loop.setup import ValidationSetup
from planner.describe import describe_plan_compact
from planner.profiles import load_profile_json
from planner.specs import HardwareProfile

DATA = Path(__file__).resolve().parent.parent / "data" / "h200-llama3.2-1b"
# The flags each validation ran with (benchmarks/gpu_validation.sh: steps 8 / warm 3 in the first, 12 / 4 in the
# second, 20 / 5 in seq1024-20steps, a session seven hours later).
VALIDATIONS = {
    "seq1024": dict(seq_len=1024, mbs="1,2,4,8", recompute="none,selective,full", steps=8, warm_steps=3),
    "seq2048": dict(seq_len=2048, mbs="2,4", recompute="none,full", steps=12, warm_steps=4),
    "seq1024-20steps": dict(seq_len=1024, mbs="1,2,4,8", recompute="none,selective,full", steps=20, warm_steps=5),
}


def h200_runs(name: str, tmp_path: Path) -> tuple[ValidationSetup, HardwareProfile, list[PlanRun]]:
    flags = VALIDATIONS[name]
    setup = validation_setup(
        1, tmp_path, "llama3.2-1b", flags["seq_len"], 8, flags["steps"], flags["warm_steps"], None, None,
        flags["mbs"], flags["recompute"], None, "cuda", "h200", 1, confirm=0,
    )  # fmt: skip
    profile = load_profile_json(DATA / name / "profile.json")
    return setup, profile, read_runs(DATA / name / "runs.json", setup, profile)


@pytest.fixture(scope="module")
def validations(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[ValidationSetup, HardwareProfile,
                                                                            list[PlanRun]]]:  # fmt: skip
    """Every validation's setup, profile and runs, predicted once for the module (seconds each)."""
    return {name: h200_runs(name, tmp_path_factory.mktemp(name)) for name in VALIDATIONS}


@pytest.fixture(scope="module")
def compared(validations) -> dict[str, Validation]:
    """Every validation compared with its runs, its calibration fitted and held out, once for the module."""
    return {name: compare(*validations[name], "2026-12-04T12:00:00+00:00") for name in VALIDATIONS}


@pytest.mark.parametrize("name", sorted(VALIDATIONS))
def test_every_h200_run_peaks_within_5_percent_of_its_prediction(name, validations):
    _, _, runs = validations[name]
    assert runs and all(run.measured_peak_bytes for run in runs)
    for run in runs:
        error = run.predicted_allocated_bytes / run.measured_peak_bytes - 1
        assert abs(error) < 0.05, f"{describe_plan_compact(run.plan)}: predicted {error:+.1%}"


@pytest.mark.parametrize("name", sorted(VALIDATIONS))
def test_h200_peak_memory_mape_is_under_one_percent(name, compared):
    result = compared[name]
    assert result.memory_mape is not None and result.memory_mape < 0.01


def test_a_single_micro_batch_peaks_without_gradients_as_measured(validations):
    """mbs 8 of a global batch of 8: one micro-batch, whose backward peaks before any gradient exists."""
    _, _, runs = validations["seq1024-20steps"]
    single = [run for run in runs if run.plan.micro_batch_size == 8]
    assert len(single) == 3
    for run in single:
        (stage,) = run.estimate["memory"]["by_stage"]
        assert stage["grads_bytes"] == 0 and stage["activations_bytes"] > 0
        assert abs(run.predicted_allocated_bytes / run.measured_peak_bytes - 1) < 0.01


def test_h200_step_time_of_the_20_step_validation_is_within_5_percent_on_average(compared):
    """Before calibration and held out; the plans that keep the GPU busy (mbs >= 4) each within 5%."""
    result = compared["seq1024-20steps"]
    assert len(result.measured) == 12
    assert result.before.mape < 0.05 and result.after.mape < 0.05
    for run in result.measured:
        if run.plan.micro_batch_size >= 4:
            assert abs(run.estimate["step_time_s"] / run.measured_s - 1) < 0.05, describe_plan_compact(run.plan)


def test_the_predicted_peak_of_a_small_fully_recomputed_plan_is_the_optimizer_step(validations):
    """mbs 1 with full recompute holds little but the weights' state: its peak is AdamW's step, 16 bytes of
    weights, gradients and state plus 4 of temporaries per parameter, as measured."""
    _, _, runs = validations["seq1024"]
    (run,) = [r for r in runs if r.plan.micro_batch_size == 1 and r.plan.recompute == "full"]
    (stage,) = run.estimate["memory"]["by_stage"]
    assert stage["activations_bytes"] == 0
    assert stage["optimizer_bytes"] == pytest.approx(stage["params_bytes"] * 3)  # 8 of state + 4 of temporaries
    assert run.estimate["sources"]["memory"] == "profile"


def test_the_report_scores_memory_on_a_gpu(compared):
    report = markdown(compared["seq2048"], None, "paraplan validate", "p.png")
    assert "| peak-memory MAPE (allocated) | 0.2% | 0.2% |" in report
    assert "| predicted allocated MiB | measured allocated MiB | memory error |" in report
    assert "| 34340 | 34405 | -0.2% |" in report  # mbs 2, no recompute


def test_validate_json_compares_the_h200_runs_with_stdout_holding_the_json_alone(tmp_path):
    """`paraplan validate --runs ... --json`: progress goes to stderr, so stdout parses as the figures."""
    data = DATA / "seq2048"
    result = CliRunner().invoke(app, [
        "validate", "--nproc", "1", "--device", "cuda", "--gpu", "h200", "--model", "llama3.2-1b",
        "--seq-len", "2048", "--mbs", "2,4", "--recompute", "none,full", "--steps", "12", "--confirm", "0",
        "--no-store", "--runs", str(data / "runs.json"), "--profile", str(data / "profile.json"),
        "--out", str(tmp_path), "--json",
    ])  # fmt: skip
    assert result.exit_code == 0, result.output
    figures = json.loads(result.stdout)
    assert figures["memory_mape"] < 0.01 and figures["measured"] == 2
    assert "comparing the 2 runs" in result.stderr
