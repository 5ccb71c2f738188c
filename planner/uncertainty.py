"""Error bands on every estimate: how far comparable validated runs measured from what the cost model predicted.

The bands are data, not constants: `python -m planner.calibration bands` estimates every validation run again with
the cost model as it is, groups measured / predicted by regime (the training stack's `Runtime.name`,
planner/cost/runtime.py) and scale (one node or several), and stores each group's 5th and 95th percentiles in
planner/data/uncertainty.json. A test recomputes them and fails when the file is stale, so a change to the cost
model comes with its new bands. This module reads the file and puts a band around an estimate
(planner/cost/step.py `summarise`, the one place a StepEstimate is made).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from planner.specs import EstimateUncertainty
from planner.specs.estimate import Scale

BANDS_PATH = Path(__file__).resolve().parent / "data" / "uncertainty.json"
COVERAGE = 0.9  # the band holds the runs between the 5th and the 95th percentile
# Fewer runs than this and the 5th and 95th percentiles are no more than the extremes of a handful: no band.
MIN_RUNS = 5
# The EstimateUncertainty fields of each band: runs, low and high values, low and high ratios, basis.
STEP_TIME_FIELDS = ("step_time_runs", "step_time_low_s", "step_time_high_s", "step_time_low_ratio",
                    "step_time_high_ratio", "step_time_basis")  # fmt: skip
PEAK_MEMORY_FIELDS = ("peak_memory_runs", "peak_bytes_low", "peak_bytes_high", "peak_bytes_low_ratio",
                      "peak_bytes_high_ratio", "peak_memory_basis")  # fmt: skip


@dataclass(frozen=True)
class Band:
    """The percentiles of measured / predicted over one group of runs (None: fewer than MIN_RUNS runs)."""

    runs: int
    low_ratio: float | None
    high_ratio: float | None
    sources: dict[str, int]  # data set -> runs of it in the group

    @property
    def basis(self) -> str:
        where = ", ".join(f"{count} {source}" for source, count in self.sources.items())
        if self.low_ratio is None:
            return f"only {self.runs} validated runs ({where}): too few for a band (at least {MIN_RUNS})"
        return f"{COVERAGE:.0%} of {self.runs} validated runs ({where}) measured within this band"

    def to_json(self) -> dict[str, Any]:
        return {"runs": self.runs, "low_ratio": self.low_ratio, "high_ratio": self.high_ratio, "sources": self.sources}

    @classmethod
    def from_json(cls, data: dict[str, Any] | None) -> Band | None:
        return None if data is None else cls(data["runs"], data["low_ratio"], data["high_ratio"], data["sources"])


@dataclass(frozen=True)
class RegimeBands:
    regime: str
    scale: Scale
    step_time: Band | None
    peak_memory: Band | None  # only where the runs measured memory


@dataclass(frozen=True)
class BandTable:
    """planner/data/uncertainty.json: the bands, when and by which command they were fitted."""

    created: str
    command: str
    coverage: float
    bands: tuple[RegimeBands, ...]

    def find(self, regime: str, scale: Scale) -> RegimeBands | None:
        return next((b for b in self.bands if (b.regime, b.scale) == (regime, scale)), None)

    def to_json(self) -> dict[str, Any]:
        return {
            "about": "Error bands of the cost model's estimates: per regime and scale, the 5th and 95th percentiles "
            "of measured / predicted step time and peak memory over the validation runs (planner/uncertainty.py).",
            "command": self.command,
            "created": self.created,
            "coverage": self.coverage,
            "bands": [
                {
                    "regime": b.regime,
                    "scale": b.scale,
                    "step_time": b.step_time and b.step_time.to_json(),
                    "peak_memory": b.peak_memory and b.peak_memory.to_json(),
                }
                for b in self.bands
            ],
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> BandTable:
        bands = tuple(
            RegimeBands(b["regime"], b["scale"], Band.from_json(b["step_time"]), Band.from_json(b["peak_memory"]))
            for b in data["bands"]
        )
        return cls(data["created"], data["command"], data["coverage"], bands)


@lru_cache(maxsize=1)
def stored_bands() -> BandTable | None:
    """The package's bands (None before the first `python -m planner.calibration bands`)."""
    if not BANDS_PATH.exists():
        return None
    return BandTable.from_json(json.loads(BANDS_PATH.read_text()))


def scale_of(num_nodes: int) -> Scale:
    """The scale class of a cluster. One node and several behave apart: inter-node links join the critical path,
    and the validation data differ (vTrain's one-node runs are small models, its multi-node runs large ones)."""
    return "one node" if num_nodes == 1 else "several nodes"


def estimate_uncertainty(regime: str, num_nodes: int, step_time_s: float, peak_bytes: float) -> EstimateUncertainty:
    """The stored bands of `regime` at this scale around one estimate's step time and peak bytes."""
    table = stored_bands()
    scale = scale_of(num_nodes)
    found = table.find(regime, scale) if table else None
    step = found.step_time if found else None
    memory = found.peak_memory if found else None
    no_runs = f"no validated runs for regime {regime} on {scale} yet"
    no_memory = f"no validated run of regime {regime} on {scale} measured its peak memory"
    return EstimateUncertainty(
        regime=regime,
        scale=scale,
        coverage=table.coverage if table else COVERAGE,
        fitted=table.created if table else None,
        **_band_fields(STEP_TIME_FIELDS, step, step_time_s, no_runs),
        **_band_fields(PEAK_MEMORY_FIELDS, memory, peak_bytes, no_memory),
    )


def _band_fields(names: tuple[str, ...], band: Band | None, value: float, missing: str) -> dict[str, Any]:
    """One band around `value` as the EstimateUncertainty fields `names`; null bounds without a band."""
    runs, low, high, low_ratio, high_ratio, basis = names
    low_at, high_at = (band.low_ratio, band.high_ratio) if band else (None, None)
    return {
        runs: band.runs if band else 0,
        low: None if low_at is None else value * low_at,
        high: None if high_at is None else value * high_at,
        low_ratio: low_at,
        high_ratio: high_at,
        basis: band.basis if band else missing,
    }


def memory_band(regime: str, num_nodes: int) -> Band | None:
    """The regime's stored peak-memory band at this scale, where runs measured memory (else None)."""
    table = stored_bands()
    found = table.find(regime, scale_of(num_nodes)) if table else None
    band = found.peak_memory if found else None
    return band if band is not None and band.high_ratio is not None else None
