"""The estimates' error bands (planner/data/uncertainty.json) are the fit of the validation runs to the cost model
as it is now: a change to the cost model moves its residuals, and then this fails until the bands are fitted
again with the command the file names (`python -m planner.calibration bands`, from the repository's root)."""

from __future__ import annotations

from pathlib import Path

import pytest

from planner.calibration import BANDS_COMMAND, MEASURED_RUNS, fit_uncertainty, validation_runs
from planner.uncertainty import Band, stored_bands

REPO = Path(__file__).resolve().parents[2]
# Ratios are compared to this: far below any band's width, far above the floating-point noise of a refit.
TOLERANCE = 1e-4


def same_band(stored: Band | None, fitted: Band | None) -> bool:
    if stored is None or fitted is None:
        return stored is fitted
    ratios = [(stored.low_ratio, fitted.low_ratio), (stored.high_ratio, fitted.high_ratio)]
    return (stored.runs, stored.sources) == (fitted.runs, fitted.sources) and all(
        a == b if a is None or b is None else a == pytest.approx(b, rel=TOLERANCE) for a, b in ratios
    )


def test_the_stored_bands_are_the_fit_of_the_validation_runs_now():
    stored = stored_bands()
    assert stored is not None, f"no planner/data/uncertainty.json: run `{BANDS_COMMAND}`"
    fitted = fit_uncertainty(validation_runs(tuple(REPO / path for path in MEASURED_RUNS)), stored.created)
    stale = f"planner/data/uncertainty.json is stale: rerun `{BANDS_COMMAND}` from the repository's root"
    assert [(b.regime, b.scale) for b in stored.bands] == [(b.regime, b.scale) for b in fitted.bands], stale
    for kept, now in zip(stored.bands, fitted.bands, strict=True):
        assert same_band(kept.step_time, now.step_time), f"{stale} ({kept.regime}, {kept.scale}: step time)"
        assert same_band(kept.peak_memory, now.peak_memory), f"{stale} ({kept.regime}, {kept.scale}: memory)"


def test_the_bands_cover_the_regimes_with_validated_runs():
    """Megatron-LM (the dev set and vTrain), DeepSpeed ZeRO-3 (the dev set) and the executor with a profile that
    measured memory (the H200 runs, the only runs with a measured peak); FSDP has none yet."""
    stored = stored_bands()
    assert stored is not None
    regimes = {(b.regime, b.scale): b for b in stored.bands}
    assert set(regimes) == {("megatron", "one node"), ("megatron", "several nodes"),
                            ("deepspeed", "several nodes"), ("paraplan-cuda", "one node")}  # fmt: skip
    assert [key for key, b in regimes.items() if b.peak_memory is not None] == [("paraplan-cuda", "one node")]
    assert stored.command.startswith(BANDS_COMMAND)
