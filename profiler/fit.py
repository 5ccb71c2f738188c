"""Fits and tables over what the profiler measured: pure numpy, no torch (DESIGN.md, profiler/fit.py).

Two things the cost model reads from a HardwareProfile:

- Collectives: the alpha-beta model time(size) = latency_s + size x busbw_factor(op, n) / bus bandwidth
  (Hockney 1994; Thakur, Rabenseifner & Gropp 2005), fitted per (op, link tier, group size) to a sweep of
  message sizes, with nccl-tests' bus-bandwidth factors (nccl-tests doc/PERFORMANCE.md).
- Layers: forward/backward time and saved-activation bytes at the shapes a plan asks for, looked up in the
  measured ones or interpolated from them (`LayerTable`); what cannot be answered soundly raises `NotMeasured`
  so that the caller falls back to the analytic model.

`planner.specs` (pydantic) is imported only where a CollectiveFit is built, so that importing this module costs
numpy alone; callers that hold measurements have loaded it already.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import numpy as np

if TYPE_CHECKING:
    from planner.specs import (
        CollectiveFit,
        CollectiveMeasurement,
        CollectiveOp,
        LayerKind,
        LayerMeasurement,
        Precision,
        Recompute,
    )

GB = 1e9  # bytes in the GB of `_GBps` (DESIGN.md "Units": 10^9 B/s)

# ------------------------------------------------------------------------------------ bus bandwidth

BUSBW_FACTORS: dict[str, Callable[[int], float]] = {
    # nccl-tests doc/PERFORMANCE.md: the factor that turns algbw (size / time) into busbw, the speed each link
    # sees, comparable across group sizes n. all_to_all: src/alltoall.cu; send_recv: src/sendrecv.cu.
    "all_reduce": lambda n: 2 * (n - 1) / n,
    "all_gather": lambda n: (n - 1) / n,
    "reduce_scatter": lambda n: (n - 1) / n,
    "all_to_all": lambda n: (n - 1) / n,
    "send_recv": lambda n: 1.0,
}


def busbw_factor(op: CollectiveOp | str, n: int) -> float:
    """busbw / algbw for `op` on a group of `n` ranks (nccl-tests doc/PERFORMANCE.md); 0 for a lone rank's
    collectives, which move nothing."""
    if op not in BUSBW_FACTORS:
        raise ValueError(f"op: unknown collective {op!r}; known: {sorted(BUSBW_FACTORS)}")
    if n < 1:
        raise ValueError(f"group_size: a group has at least one rank, got {n}")
    return BUSBW_FACTORS[op](n)


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
    (what small messages cost) to their noise. A negative latency is clamped to 0 and the bandwidth refitted
    through the origin; data whose times do not grow with size raise ValueError.

    Reported with the fit: r2 of log(fitted time) against log(measured time) (logs, so that every size counts,
    not just the largest), the largest relative error, and the number of samples.
    """
    from planner.specs import CollectiveFit

    first = _check_one_series(measurements)
    factor = busbw_factor(first.op, first.group_size)
    traffic_bytes = np.array([m.size_bytes * factor for m in measurements], dtype=float)
    times_s = np.array([m.time.median_s for m in measurements], dtype=float)
    latency_s, seconds_per_byte = _relative_least_squares(traffic_bytes, times_s)
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
    """One fit per (op, tier, group_size) present, in that sort order."""
    series: dict[tuple[str, str, int], list[CollectiveMeasurement]] = {}
    for m in measurements:
        series.setdefault((m.op, m.tier, m.group_size), []).append(m)
    return [fit_collective(series[key]) for key in sorted(series)]


def predict_collective_s(fit: CollectiveFit, size_bytes: float) -> float:
    """The fitted alpha-beta time of one `fit.op` of `size_bytes` (nccl-tests' size: what algbw divides)."""
    if np.any(np.asarray(size_bytes) < 0):
        raise ValueError(f"size_bytes: must be >= 0, got {size_bytes}")
    factor = busbw_factor(fit.op, fit.group_size)
    return fit.latency_s + size_bytes * factor / (fit.bandwidth_GBps * GB)


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


# ---------------------------------------------------------------------------------------- layers

LayerKey = tuple[str, int, str, str]  # (layer, tp, dtype, recompute)
LookupMethod = Literal["measured", "interpolated", "extrapolated", "seq_fit"]

EXTRAPOLATION_LIMIT = 2.0  # this module's rule, not a measured constant: answer up to 2x the largest measured


class NotMeasured(LookupError):
    """The profile cannot answer this layer shape soundly; `field` names what is missing. Fall back to the
    analytic model."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


@dataclass(frozen=True)
class LayerTime:
    """One layer's measured or interpolated cost. `method` says how it was obtained (see `LayerTable`);
    `exact` is true only for a measured shape."""

    forward_s: float
    backward_s: float
    saved_bytes: int
    exact: bool
    method: LookupMethod


@dataclass(frozen=True)
class _Points:
    """The measured shapes of one (layer, tp, dtype, recompute): values columns are forward_s, backward_s,
    saved_bytes."""

    micro_batch_size: np.ndarray
    seq_len: np.ndarray
    values: np.ndarray

    @property
    def tokens(self) -> np.ndarray:
        return self.micro_batch_size * self.seq_len


class LayerTable:
    """Layer costs by shape, from a profile's LayerMeasurements. `lookup` answers with these rules, in order:

    1. (layer, tp, dtype, recompute) must have been measured; the exact micro_batch_size and seq_len, if
       measured, are answered as measured (`method="measured"`, `exact=True`).
    2. tokens = micro_batch_size x seq_len may be at most 2x the largest measured tokens of the group, and
       seq_len at most 2x the largest measured seq_len; beyond that raises NotMeasured.
    3. seq_len measured: at fixed seq_len times and saved bytes are linear in micro_batch_size (every op of a
       block is batched over it), so the value is piecewise linear between the measured micro-batch sizes
       (`"interpolated"`); outside them it continues the nearest segment, or scales the single point in
       proportion (`"extrapolated"`), never below 0.
    4. seq_len not measured (two distinct measured seq_lens needed, else NotMeasured): value = a x tokens +
       b x tokens x seq_len, the per-token linear part plus attention's part quadratic in seq_len (Korthikanti
       et al. 2022 sec. 4.1: activations 34sbh + 5as^2b; FLOPs 96Bslh^2(1 + s/6h + ...), Narayanan et al.
       SC'21). Fitted by least squares on the per-token value, value / tokens = a + b x seq_len, over all
       the group's points, so that small shapes weigh as much as large ones (`"seq_fit"`).
    """

    def __init__(self, groups: dict[LayerKey, _Points]):
        self._groups = groups

    @classmethod
    def from_measurements(cls, layers: Iterable[LayerMeasurement]) -> LayerTable:
        """Group measurements by (layer, tp, dtype, recompute); a shape measured twice in a group is refused."""
        rows: dict[LayerKey, dict[tuple[int, int], tuple[float, float, int]]] = {}
        for m in layers:
            key = (m.layer, m.tp, m.dtype, m.recompute)
            shape = (m.micro_batch_size, m.seq_len)
            group = rows.setdefault(key, {})
            if shape in group:
                raise ValueError(f"layers: {key} measured twice at micro_batch_size, seq_len = {shape}")
            group[shape] = (m.forward.median_s, m.backward.median_s, m.saved_bytes)
        return cls({key: _to_points(group) for key, group in rows.items()})

    def lookup(
        self,
        layer: LayerKind,
        tp: int,
        micro_batch_size: int,
        seq_len: int,
        dtype: Precision,
        recompute: Recompute,
    ) -> LayerTime:
        """Forward and backward seconds and saved bytes of one layer at this shape, by the class's rules."""
        if micro_batch_size < 1 or seq_len < 1:
            raise ValueError(f"micro_batch_size, seq_len: must be >= 1, got {micro_batch_size}, {seq_len}")
        points = self._group((layer, tp, dtype, recompute))
        measured = (points.micro_batch_size == micro_batch_size) & (points.seq_len == seq_len)
        if measured.any():
            return _layer_time(points.values[np.argmax(measured)], "measured")
        _check_in_range(points, micro_batch_size, seq_len)
        at_seq_len = points.seq_len == seq_len
        if at_seq_len.any():
            values, extrapolated = _along_micro_batch(
                points.micro_batch_size[at_seq_len], points.values[at_seq_len], micro_batch_size
            )
            return _layer_time(values, "extrapolated" if extrapolated else "interpolated")
        return _layer_time(_seq_fit(points, micro_batch_size, seq_len), "seq_fit")

    def _group(self, key: LayerKey) -> _Points:
        """The group's points, or NotMeasured naming the first of layer, tp, dtype, recompute never measured
        with the ones before it."""
        if key in self._groups:
            return self._groups[key]
        names = ("layer", "tp", "dtype", "recompute")
        depth = next(d for d in range(len(names)) if not any(k[: d + 1] == key[: d + 1] for k in self._groups))
        options = sorted({k[depth] for k in self._groups if k[:depth] == key[:depth]}, key=str)
        given = "".join(f", {n}={v!r}" for n, v in zip(names[:depth], key[:depth], strict=True))
        message = f"no layer measurement with {names[depth]}={key[depth]!r}{given}; measured: {options}"
        raise NotMeasured(names[depth], message)


def _to_points(group: dict[tuple[int, int], tuple[float, float, int]]) -> _Points:
    shapes = np.array(list(group), dtype=float)
    return _Points(shapes[:, 0], shapes[:, 1], np.array(list(group.values()), dtype=float))


def _layer_time(values: np.ndarray, method: LookupMethod) -> LayerTime:
    forward_s, backward_s, saved_bytes = (float(v) for v in values)
    return LayerTime(forward_s, backward_s, round(saved_bytes), method == "measured", method)


def _check_in_range(points: _Points, micro_batch_size: int, seq_len: int) -> None:
    """LayerTable rule 2: no more than EXTRAPOLATION_LIMIT x the largest measured tokens and seq_len."""
    tokens, largest_tokens = micro_batch_size * seq_len, float(points.tokens.max())
    if tokens > EXTRAPOLATION_LIMIT * largest_tokens:
        raise NotMeasured(
            "tokens",
            f"micro_batch_size x seq_len = {tokens} tokens is beyond {EXTRAPOLATION_LIMIT:g}x the largest "
            f"measured ({largest_tokens:.0f})",
        )
    largest_seq_len = float(points.seq_len.max())
    if seq_len > EXTRAPOLATION_LIMIT * largest_seq_len:
        raise NotMeasured(
            "seq_len",
            f"seq_len {seq_len} is beyond {EXTRAPOLATION_LIMIT:g}x the largest measured ({largest_seq_len:.0f})",
        )


def _along_micro_batch(
    micro_batch_sizes: np.ndarray, values: np.ndarray, micro_batch_size: int
) -> tuple[np.ndarray, bool]:
    """LayerTable rule 3: piecewise linear in micro_batch_size at one seq_len; (values, extrapolated)."""
    order = np.argsort(micro_batch_sizes)
    x, y = micro_batch_sizes[order], values[order]
    if len(x) == 1:
        return y[0] * (micro_batch_size / x[0]), True
    if x[0] <= micro_batch_size <= x[-1]:
        return np.array([np.interp(micro_batch_size, x, column) for column in y.T]), False
    near, far = (0, 1) if micro_batch_size < x[0] else (-1, -2)
    slope = (y[near] - y[far]) / (x[near] - x[far])
    return np.maximum(y[near] + slope * (micro_batch_size - x[near]), 0.0), True


def _seq_fit(points: _Points, micro_batch_size: int, seq_len: int) -> np.ndarray:
    """LayerTable rule 4: value / tokens = a + b x seq_len, least squares over the group, evaluated here."""
    if len(np.unique(points.seq_len)) < 2:
        raise NotMeasured(
            "seq_len",
            f"seq_len {seq_len} not measured, and one measured seq_len "
            f"({points.seq_len[0]:.0f}) cannot tell the linear from the quadratic part",
        )
    per_token = points.values / points.tokens[:, None]
    slope, intercept = np.polyfit(points.seq_len, per_token, 1)
    return np.maximum(micro_batch_size * seq_len * (intercept + slope * seq_len), 0.0)
