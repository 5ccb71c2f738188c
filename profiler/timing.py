"""Timing primitives shared by the profilers: a device-aware interval timer and the statistics of repeated timings.

On a CUDA device an interval is measured with CUDA events recorded on the device's current stream (the GPU's own
clock, so the time is that of the queued work, not of the Python call that queued it); anywhere else with
``time.perf_counter`` around a call that has finished when it returns (CPU kernels, gloo collectives).

torch is imported only on the CUDA path, so CPU timing and :func:`stats` cost no torch import.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

from planner.specs import TimingStats

if TYPE_CHECKING:
    import torch

UNSTABLE_SPREAD = 0.25
"""Default threshold on spread = (p90 - p10) / median above which a timing is flagged unstable.

Why 0.25: for normally distributed repeats p90 - p10 = 2.56 sigma, so a spread of 0.25 is a coefficient of
variation of about 10%. With the 20 repeats the collective sweep takes by default, the median's standard error is
then about 1.25 x 10% / sqrt(20) ~ 3% of the median, well inside the accuracy the cost model can use. A wider
spread is rarely Gaussian noise: it is a second mode (another job, clock or power-state changes, a straggling rank,
page faults), and a median alone would hide it.
"""


def stats(samples_s: list[float], unstable_spread: float = UNSTABLE_SPREAD) -> TimingStats:
    """Median and relative p10-p90 spread of repeated timings (seconds); unstable when the spread exceeds
    ``unstable_spread``.

    Percentiles interpolate linearly between samples (numpy's default).
    """
    if not samples_s:
        raise ValueError("stats() needs at least one timing sample")
    if any(not math.isfinite(s) or s < 0 for s in samples_s):
        raise ValueError(f"timing samples must be finite and >= 0 seconds, got {samples_s}")
    p10, median, p90 = (float(q) for q in np.percentile(samples_s, [10, 50, 90]))
    # A median of 0 (most samples below the clock's resolution): relative to the largest sample instead, so the
    # spread stays finite (JSON has no infinity) and, at 0.8 or more, flags the measurement as unstable.
    scale = median if median > 0 else max(samples_s)
    spread = (p90 - p10) / scale if scale > 0 else 0.0
    return TimingStats(median_s=median, spread=spread, repeats=len(samples_s), unstable=spread > unstable_spread)


def is_cuda(device: torch.device | str) -> bool:
    """True for a CUDA device ("cuda", "cuda:1", torch.device("cuda", 1)), without importing torch."""
    kind = getattr(device, "type", None)
    return (kind if isinstance(kind, str) else str(device).partition(":")[0]) == "cuda"


class Timer:
    """Times one interval on ``device``: ``timer.start(); work(); timer.stop(); timer.elapsed_s()``, or
    ``with Timer(device) as timer: work()``.

    On CUDA, start/stop only record events; ``elapsed_s`` waits for the stop event, so several timers can be
    started and stopped back to back and read after one synchronisation.
    """

    def __init__(self, device: torch.device | str) -> None:
        self._cuda = is_cuda(device)
        self._device = device
        self._started: Any = None
        self._stopped: Any = None
        if self._cuda:
            import torch

            self._started = torch.cuda.Event(enable_timing=True)
            self._stopped = torch.cuda.Event(enable_timing=True)

    def start(self) -> None:
        if self._cuda:
            self._started.record(self._stream())
        else:
            self._started = time.perf_counter()

    def stop(self) -> None:
        if self._cuda:
            self._stopped.record(self._stream())
        else:
            self._stopped = time.perf_counter()

    def elapsed_s(self) -> float:
        """Seconds between start and stop (on CUDA, blocks until the stop event has happened)."""
        if self._started is None or self._stopped is None:
            raise RuntimeError("Timer.elapsed_s() before start() and stop()")
        if self._cuda:
            self._stopped.synchronize()
            return float(self._started.elapsed_time(self._stopped)) / 1e3  # elapsed_time is in ms
        return float(self._stopped - self._started)

    def _stream(self) -> Any:
        import torch

        return torch.cuda.current_stream(torch.device(self._device))

    def __enter__(self) -> Timer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def time_repeats(
    fn: Callable[[], object],
    *,
    warmup: int,
    repeats: int,
    device: torch.device | str,
    before_each: Callable[[], object] | None = None,
) -> list[float]:
    """Seconds of each of ``repeats`` calls of ``fn`` on ``device``, after ``warmup`` untimed calls.

    ``before_each`` (untimed) runs before every call, warm-ups included: a barrier that lines ranks up, a cache
    flush, fresh inputs. On CUDA the device is synchronised after the warm-ups and the events are read once at
    the end, so timing adds no synchronisation between repeats beyond what ``before_each`` does.
    """
    if warmup < 0 or repeats < 1:
        raise ValueError(f"time_repeats needs warmup >= 0 and repeats >= 1, got warmup={warmup}, repeats={repeats}")
    for _ in range(warmup):
        if before_each is not None:
            before_each()
        fn()
    if is_cuda(device):
        import torch

        torch.cuda.synchronize(device)
    timers = [Timer(device) for _ in range(repeats)]
    for timer in timers:
        if before_each is not None:
            before_each()
        with timer:
            fn()
    return [timer.elapsed_s() for timer in timers]
