"""Fits over what the profiler measured: pure numpy, no torch (DESIGN.md, profiler/fit.py).

Collectives: the alpha-beta model time(size) = latency_s + size x busbw_factor(op, n) / bus bandwidth
(Hockney 1994; Thakur, Rabenseifner & Gropp 2005), fitted per (op, link tier, group size) to a sweep of message
sizes, with nccl-tests' bus-bandwidth factors (nccl-tests doc/PERFORMANCE.md). The cost model evaluates the fits,
and looks layer times up in the measured shapes, with planner/cost/measured.py.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

import numpy as np

from planner.cost.measured import GB, busbw_factor

if TYPE_CHECKING:
    from planner.specs import CollectiveFit, CollectiveMeasurement, CollectiveOp


# ------------------------------------------------------------------------------------ bus bandwidth


def algbw_GBps(size_bytes: float, time_s: float) -> float:
    """Algorithm bandwidth, size / time, in 10^9 B/s (nccl-tests doc/PERFORMANCE.md)."""
    if time_s <= 0:
        raise ValueError(f"time_s: must be positive, got {time_s}")
    return size_bytes / time_s / GB


def busbw_GBps(op: CollectiveOp | str, n: int, size_bytes: float, time_s: float) -> float:
    """Bus bandwidth, algbw x busbw_factor(op, n), in 10^9 B/s (nccl-tests doc/PERFORMANCE.md)."""
    return algbw_GBps(size_bytes, time_s) * busbw_factor(op, n)


# ------------------------------------------------------------------------------- collective fits


def fit_collective(measurements: list[CollectiveMeasurement]) -> CollectiveFit:
    """Fit latency_s and bus bandwidth_GBps of time = latency_s + size x busbw_factor / (bandwidth_GBps x 1e9)
    (Hockney 1994 alpha-beta; nccl-tests busbw) to one op, tier and group size.

    Least squares on the relative error, sum(((predicted - measured) / measured)^2): a sweep spans 1 KiB to
    hundreds of MiB, and an unweighted fit would spend everything on the largest messages and leave the latency
    (what small messages cost) to their noise. The fit is of the medians' non-decreasing projection: a larger
    message cannot take less time, and on a busy host (a shared CPU box, where a 1 KiB gloo collective can take
    longer than a 4 MiB one) the scheduler's delays would otherwise turn the fitted bandwidth negative. A negative
    latency is clamped to 0 and the bandwidth refitted through the origin; data whose times do not grow with size
    at all raise ValueError.

    Reported with the fit: r2 of log(fitted time) against log(measured time) (logs, so that every size counts,
    not just the largest), the largest relative error, and the number of samples.
    """
    from planner.specs import CollectiveFit

    first = _check_one_series(measurements)
    factor = busbw_factor(first.op, first.group_size)
    traffic_bytes = np.array([m.size_bytes * factor for m in measurements], dtype=float)
    times_s = np.array([m.time.median_s for m in measurements], dtype=float)
    order = np.argsort(traffic_bytes, kind="stable")
    monotone_s = np.empty_like(times_s)
    monotone_s[order] = non_decreasing(times_s[order])
    latency_s, seconds_per_byte = _relative_least_squares(traffic_bytes, monotone_s)
    predicted_s = latency_s + seconds_per_byte * traffic_bytes
    return CollectiveFit(
        op=first.op,
        tier=first.tier,
        group_size=first.group_size,
        latency_s=latency_s,
        bandwidth_GBps=1 / (seconds_per_byte * GB),
        r2=_r2_of_logs(times_s, predicted_s),
        max_rel_error=float(np.max(np.abs(predicted_s - times_s) / times_s)),
        num_samples=len(measurements),
    )


def fit_all(measurements: Iterable[CollectiveMeasurement]) -> list[CollectiveFit]:
    """One fit per (op, tier, group_size) present, in that sort order. A series that cannot be fitted raises
    ValueError naming it."""
    series: dict[tuple[str, str, int], list[CollectiveMeasurement]] = {}
    for m in measurements:
        series.setdefault((m.op, m.tier, m.group_size), []).append(m)
    fits = []
    for op, tier, group_size in sorted(series):
        try:
            fits.append(fit_collective(series[op, tier, group_size]))
        except ValueError as error:
            raise ValueError(f"{op} over {group_size} ranks ({tier}): {error}") from None
    return fits


def _check_one_series(measurements: list[CollectiveMeasurement]) -> CollectiveMeasurement:
    """The samples of one fit: one op, tier and group size; two sizes at least; positive times."""
    if not measurements:
        raise ValueError("measurements: nothing to fit")
    first = measurements[0]
    for name in ("op", "tier", "group_size"):
        values = sorted({str(getattr(m, name)) for m in measurements})
        if len(values) > 1:
            raise ValueError(f"{name}: one fit takes one {name}, the measurements mix {values}; use fit_all")
    if len({m.size_bytes for m in measurements}) < 2:
        raise ValueError("size_bytes: the fit needs at least two distinct message sizes")
    if any(m.time.median_s <= 0 for m in measurements):
        raise ValueError("time.median_s: every sample needs a positive time")
    return first


def non_decreasing(times_s: np.ndarray) -> np.ndarray:
    """The non-decreasing sequence nearest to `times_s` in log space (pool adjacent violators, Ayer et al. 1955;
    a pooled block takes its geometric mean, the relative-error counterpart of the mean). A sequence that already
    grows comes back unchanged.

    With it the fit's slope is positive whenever the largest messages took longer than the smallest: a weighted
    least-squares slope of a non-decreasing, non-constant sequence is positive for any positive weights
    (Chebyshev's sum inequality)."""
    blocks: list[tuple[float, int]] = []  # (mean log time, samples pooled)
    for log_time in np.log(times_s):
        mean, count = float(log_time), 1
        while blocks and blocks[-1][0] > mean:
            previous_mean, previous_count = blocks.pop()
            mean = (previous_mean * previous_count + mean * count) / (previous_count + count)
            count += previous_count
        blocks.append((mean, count))
    pooled = np.exp(np.concatenate([np.full(count, mean) for mean, count in blocks]))
    kept = np.concatenate([np.full(count, count == 1) for _, count in blocks])
    return np.where(kept, times_s, pooled)  # an unpooled sample exactly as measured, not exp(log(t))


def _relative_least_squares(traffic_bytes: np.ndarray, times_s: np.ndarray) -> tuple[float, float]:
    """(alpha, beta) minimising sum(((alpha + beta x - t) / t)^2): rows divided by t, target 1 (weighted least
    squares, weights 1/t^2). Columns are normalised before solving: 1/t and x/t differ by ~14 orders."""
    design = np.column_stack([1 / times_s, traffic_bytes / times_s])
    scale = np.linalg.norm(design, axis=0)
    coefficients, *_ = np.linalg.lstsq(design / scale, np.ones_like(times_s), rcond=None)
    alpha, beta = coefficients / scale
    if not beta > 0:
        raise ValueError(
            "bandwidth: the fitted bandwidth is not positive (times do not grow with message size); "
            "measure larger messages or check the timings"
        )
    if alpha < 0:  # latency cannot be negative: keep alpha = 0 and refit beta alone, through the origin
        ratio = traffic_bytes / times_s
        return 0.0, float(np.sum(ratio) / np.sum(ratio**2))
    return float(alpha), float(beta)


def _r2_of_logs(measured_s: np.ndarray, predicted_s: np.ndarray) -> float:
    """Coefficient of determination of log(predicted) against log(measured); 1.0 when the measurements are all
    equal and matched exactly, 0.0 when they are all equal and not."""
    log_measured, log_predicted = np.log(measured_s), np.log(predicted_s)
    residual = float(np.sum((log_measured - log_predicted) ** 2))
    total = float(np.sum((log_measured - log_measured.mean()) ** 2))
    if total == 0:
        return 1.0 if residual == 0 else 0.0
    return 1 - residual / total
