"""How often the collectives' alpha-beta fit (profiler/fit.py) refuses a sweep measured on a busy host, with and
without the medians' non-decreasing projection, and how far the bandwidth it fits then lands from the truth.

A synthetic sweep per trial: 1.5 ms of latency, a bus bandwidth, 1 KiB to the largest size, each time the median
of 2 repeats (what the CI's profiling tests run), each repeat delayed by the scheduler half the time by an
exponential 1 ms on average (what a loaded 2-core box shows: benchmarks/results/2026-12-07-collective-fit-noise.md).

Run: python benchmarks/collective_fit_noise.py   (prints a table; exits 0)
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from profiler import fit  # noqa: E402

LATENCY_S = 1.5e-3
REPEATS = 2
DELAY_MEAN_S = 1e-3
DELAY_SHARE = 0.5
TRIALS = 5000
REDUCE_SCATTER_FACTOR = 0.5  # (n - 1) / n over 2 ranks (nccl-tests' bus bandwidth)


def sweep_s(sizes: np.ndarray, bandwidth_Bps: float, rng: np.random.Generator) -> np.ndarray:
    exact = LATENCY_S + sizes * REDUCE_SCATTER_FACTOR / bandwidth_Bps
    delays = rng.exponential(DELAY_MEAN_S, (len(sizes), REPEATS)) * (rng.random((len(sizes), REPEATS)) < DELAY_SHARE)
    return np.median(exact[:, None] + delays, axis=1)


def refusals(largest: int, bandwidth_Bps: float) -> tuple[int, int, float]:
    """(raw fits refused, projected fits refused, median fitted / true bandwidth of the projected fits)."""
    sizes = np.array([1024 * 2**k for k in range(int(np.log2(largest // 1024)) + 1)], dtype=float)
    traffic = sizes * REDUCE_SCATTER_FACTOR
    rng = np.random.default_rng(0)
    raw = projected = 0
    ratios = []
    for _ in range(TRIALS):
        times = sweep_s(sizes, bandwidth_Bps, rng)
        try:
            fit._relative_least_squares(traffic, times)
        except ValueError:
            raw += 1
        try:
            _, seconds_per_byte = fit._relative_least_squares(traffic, fit.non_decreasing(times))
            ratios.append(1 / seconds_per_byte / bandwidth_Bps)
        except ValueError:
            projected += 1
    return raw, projected, float(np.median(ratios))


def main() -> None:
    table = Table(title=f"Alpha-beta fits refused in {TRIALS} busy-host sweeps (median of {REPEATS} repeats)")
    for column in ("largest message", "bus bandwidth", "raw medians", "non-decreasing projection", "fitted / true"):
        table.add_column(column, justify="right")
    for largest in (4 * 2**20, 16 * 2**20):
        for bandwidth_GBps in (5.0, 10.0, 20.0):
            raw, projected, ratio = refusals(largest, bandwidth_GBps * 1e9)
            table.add_row(f"{largest // 2**20} MiB", f"{bandwidth_GBps:g} GB/s", f"{raw / TRIALS:.1%}",
                          f"{projected / TRIALS:.1%}", f"{ratio:.2f}")  # fmt: skip
    Console(width=160).print(table)


if __name__ == "__main__":
    main()
