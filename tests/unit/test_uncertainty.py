"""Error bands on estimates (planner/uncertainty.py, fitted by planner/calibration.py) and the search's
`memory_safety`. Hand-computed values; bands that a test needs are built here, not read from the stored file,
whose numbers move with the cost model (tests/validation/test_uncertainty_bands.py keeps that file current)."""

from __future__ import annotations

import json
from typing import Any

import pytest
from typer.testing import CliRunner

import planner
import planner.uncertainty
from api.cli import app
from planner.calibration import ValidationRun, quantile_band, residual
from planner.devset import training_runs
from planner.uncertainty import Band, BandTable, RegimeBands, estimate_uncertainty, stored_bands

GiB = 1024**3
MEGATRON_MULTI_NODE = [
    "estimate",
    "--model",
    "gpt3-175b",
    "--gpu",
    "a100-80gb",
    "--nodes",
    "128",
    "--seq-len",
    "2048",
    "--global-batch",
    "1536",
    "--tp",
    "8",
    "--pp",
    "8",
    "--recompute",
    "full",
    "--framework",
    "megatron",
]  # fmt: skip  (full recompute, as Narayanan et al. 2021 ran it: without it the plan does not fit and exits 2)
SMALL_GPT = {"name": "gpt3-1.7b", "num_layers": 4, "hidden_size": 512, "num_attention_heads": 8,
             "vocab_size": 8192, "max_position_embeddings": 4096}  # fmt: skip


def table_of(regime: str, step: tuple[float, float] | None, memory: tuple[float, float] | None) -> BandTable:
    """A band table with one entry, for `regime` on one node."""

    def band(ratios: tuple[float, float] | None) -> Band | None:
        return None if ratios is None else Band(40, *ratios, {"hand-made runs": 40})

    return BandTable("2026-12-07", "a test", 0.9, (RegimeBands(regime, "one node", band(step), band(memory)),))


@pytest.fixture
def bands(monkeypatch: pytest.MonkeyPatch):
    """`bands(table)` makes `table` the bands every estimate and search reads."""

    def use(table: BandTable) -> None:
        monkeypatch.setattr(planner.uncertainty, "stored_bands", lambda: table)

    return use


def small_request(fraction: float = 0.9, **search: Any) -> dict[str, Any]:
    return {
        "model": SMALL_GPT,
        "training": {"seq_len": 1024, "global_batch_size": 8},
        "cluster": {"gpu": "a100-80gb", "num_nodes": 1, "gpus_per_node": 4},
        "search": {"max_memory_fraction": fraction, **search},
    }


# ------------------------------------------------------------------------------------------ the fit


def test_the_band_is_the_5th_and_95th_percentile_interpolated_between_runs():
    """Sorted 0.9 1.0 1.1 1.2 1.3: the 5th percentile sits 0.05 x 4 = 0.2 of the way from 0.9 to 1.0, the 95th
    0.95 x 4 = 3.8, 0.8 of the way from 1.2 to 1.3."""
    band = quantile_band([1.3, 0.9, 1.1, 1.0, 1.2], ["a", "b", "a", "a", "b"])
    assert band.runs == 5
    assert band.low_ratio == pytest.approx(0.92)
    assert band.high_ratio == pytest.approx(1.28)
    assert band.sources == {"a": 3, "b": 2}
    assert band.basis == "90% of 5 validated runs (3 a, 2 b) measured within this band"


def test_four_runs_are_too_few_for_a_band():
    band = quantile_band([0.9, 1.0, 1.1, 1.2], ["a"] * 4)
    assert (band.runs, band.low_ratio, band.high_ratio) == (4, None, None)
    assert "too few for a band" in band.basis


def test_a_residual_is_measured_over_predicted_in_the_runs_regime_and_scale():
    """So that the band is the estimate times its percentiles: a run that took longer than predicted is above 1."""
    (run,) = training_runs(sources=("narayanan2021_t1_145.6B",))
    found = residual(ValidationRun("Narayanan et al. 2021", run.request, run.step_time_s))
    assert found.step_time_ratio == pytest.approx(run.step_time_s / planner.estimate(run.request).step_time_s)
    assert (found.regime, found.scale, found.peak_memory_ratio) == ("megatron", "several nodes", None)


# ------------------------------------------------------------------------------------- the estimate


def test_an_estimates_band_is_its_step_time_and_peak_times_the_percentiles(bands):
    bands(table_of("analytic", step=(0.94, 1.09), memory=(0.99, 1.05)))
    request = {**small_request(), "plan": {"dp": 4}}
    del request["search"]
    estimate = planner.estimate(request)
    band = estimate.uncertainty
    assert (band.regime, band.scale, band.coverage, band.fitted) == ("analytic", "one node", 0.9, "2026-12-07")
    assert band.step_time_low_s == pytest.approx(estimate.step_time_s * 0.94)
    assert band.step_time_high_s == pytest.approx(estimate.step_time_s * 1.09)
    assert band.peak_bytes_low == pytest.approx(estimate.memory.peak_bytes * 0.99)
    assert band.peak_bytes_high == pytest.approx(estimate.memory.peak_bytes * 1.05)
    assert (band.step_time_runs, band.peak_memory_runs) == (40, 40)


def test_the_stored_band_of_the_regime_is_applied():
    (run,) = training_runs(sources=("narayanan2021_t1_145.6B",))
    estimate = planner.estimate(run.request)
    table = stored_bands()
    assert table is not None
    stored = table.find("megatron", "several nodes")
    assert stored is not None and stored.step_time is not None and stored.step_time.low_ratio is not None
    assert estimate.uncertainty.step_time_low_s == pytest.approx(estimate.step_time_s * stored.step_time.low_ratio)
    assert estimate.uncertainty.step_time_runs == stored.step_time.runs
    assert estimate.uncertainty.peak_bytes_high is None  # no Megatron-LM run of the dev set measured memory


def test_a_regime_without_validated_runs_has_null_bounds_and_says_why(bands):
    bands(table_of("megatron", step=(0.9, 1.1), memory=None))
    band = estimate_uncertainty("fsdp", 1, 2.0, 1e9)
    assert (band.step_time_low_s, band.step_time_high_s, band.step_time_runs) == (None, None, 0)
    assert (band.peak_bytes_low, band.peak_bytes_high, band.peak_memory_runs) == (None, None, 0)
    assert band.step_time_basis == "no validated runs for regime fsdp on one node yet"
    assert band.peak_memory_basis == "no validated run of regime fsdp on one node measured its peak memory"


def test_several_nodes_do_not_borrow_the_band_of_one_node(bands):
    bands(table_of("megatron", step=(0.9, 1.1), memory=None))
    band = estimate_uncertainty("megatron", 4, 2.0, 1e9)
    assert band.scale == "several nodes" and band.step_time_low_s is None


# ---------------------------------------------------------------------------------- memory_safety


def test_memory_safety_drops_a_plan_that_fits_at_its_estimate_but_not_at_its_upper_band(bands):
    """The limit is set 10% above the winner's estimated peak: it fits there, not at the band's +25%."""
    bands(table_of("analytic", step=None, memory=(0.98, 1.25)))
    winner = planner.search(small_request()).plans[0]
    capacity = winner.estimate.memory.capacity_bytes
    fraction = winner.estimate.memory.peak_bytes * 1.1 / capacity

    plain = planner.search(small_request(fraction))
    assert plain.plans[0].plan == winner.plan and plain.memory_safety_factor == 1.0 and not plain.notes

    safe = planner.search(small_request(fraction, memory_safety=True))
    assert winner.plan not in [ranked.plan for ranked in safe.plans]
    assert safe.memory_safety_factor == 1.25
    assert safe.memory_limit_bytes == pytest.approx(fraction * capacity / 1.25)
    for ranked in safe.plans:
        assert ranked.estimate.memory.peak_bytes * 1.25 <= fraction * capacity
    (rejection,) = [r for r in safe.rejected if r.code == "memory_safety"]
    assert rejection.count == safe.counts.over_memory_band >= 1
    assert "not at its upper memory band: peak x 1.250" in rejection.example
    assert "upper memory band of regime analytic on one node" in safe.notes[0]


def test_memory_safety_without_a_memory_band_says_so_and_keeps_the_point_estimate(bands):
    bands(table_of("analytic", step=(0.9, 1.1), memory=None))
    plain = planner.search(small_request())
    safe = planner.search(small_request(memory_safety=True))
    assert [r.plan for r in safe.plans] == [r.plan for r in plain.plans]
    assert safe.memory_safety_factor == 1.0
    assert safe.notes == [
        "search.memory_safety: regime analytic on one node has no memory band (no validated run of it measured its "
        "peak memory), so plans are held to their estimated peak alone"
    ]


def test_a_band_below_one_never_loosens_the_limit(bands):
    bands(table_of("analytic", step=None, memory=(0.8, 0.95)))
    assert planner.search(small_request(memory_safety=True)).memory_safety_factor == 1.0


# ------------------------------------------------------------------------------------ CLI and API


def test_the_cli_prints_the_band_next_to_the_step_time():
    result = CliRunner().invoke(app, MEGATRON_MULTI_NODE)
    assert result.exit_code == 0, result.output
    headline = next(line for line in result.output.splitlines() if line.startswith("Step time "))
    assert "90% band" in headline and "runs)" in headline
    assert "Error bands (regime megatron, several nodes" in result.output


def test_the_cli_says_when_there_is_no_band():
    result = CliRunner().invoke(app, [*MEGATRON_MULTI_NODE[:-2], "--framework", "fsdp", "--zero", "3"])
    assert result.exit_code == 0, result.output
    assert "no error band" in result.output
    assert "no validated runs for regime fsdp on several nodes yet" in result.output


def test_the_cli_json_carries_the_band():
    result = CliRunner().invoke(app, [*MEGATRON_MULTI_NODE, "--json"])
    band = json.loads(result.stdout)["uncertainty"]
    assert band["regime"] == "megatron" and band["step_time_low_s"] < band["step_time_high_s"]


def test_plan_takes_memory_safety_as_a_flag(bands):
    bands(table_of("analytic", step=None, memory=(0.98, 1.25)))
    flags = ["plan", "--model", json.dumps(SMALL_GPT), "--gpu", "a100-80gb", "--gpus-per-node", "4",
             "--seq-len", "1024", "--global-batch", "8", "--memory-safety", "--json"]  # fmt: skip
    result = CliRunner().invoke(app, flags)
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["memory_safety_factor"] == 1.25
