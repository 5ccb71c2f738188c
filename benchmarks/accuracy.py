"""Predicted vs published step times for every training run in the dev set, the A100 calibration and the fit of
DeepSpeed ZeRO-3's collective bandwidth.

Run: python benchmarks/accuracy.py   (prints tables; exits 0)
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from planner import estimate  # noqa: E402
from planner.calibration import calibrate_deepspeed_zero3_bandwidth, calibrate_matmul_efficiency  # noqa: E402
from planner.devset import UNPUBLISHED_DEFAULTS, training_runs  # noqa: E402

CONSOLE = Console(width=200)

GROUPS = {
    "Narayanan et al. 2021, table 1 (target)": ("narayanan2021_t1_",),
    "Korthikanti et al. 2022, table 5 (target)": ("korthikanti2022_t5_",),
    "Narayanan et al. 2021, table 2, PTD-P": ("narayanan2021_t2_ptd",),
    "Narayanan et al. 2021, table 2, ZeRO-3 (DeepSpeed)": ("narayanan2021_t2_zero3",),
    "Korthikanti et al. 2022, other runs": ("korthikanti2022_530B",),
}


def run_table(title: str, prefixes: tuple[str, ...]) -> list[float]:
    table = Table(title=title)
    for column in ("run", "plan", "published s", "predicted s", "error", "pred MFU", "filled in"):
        table.add_column(column, justify="right" if column.endswith(("s", "error", "MFU")) else "left")
    errors = []
    for run in training_runs(sources=prefixes):
        result = estimate(run.request)
        error = result.step_time_s / run.step_time_s - 1
        errors.append(error)
        p = run.request["plan"]
        plan = f"tp{p['tp']} pp{p['pp']} dp{p['dp']} {p['recompute']}" + (" sp" if p["sequence_parallel"] else "")
        table.add_row(
            run.id,
            plan,
            f"{run.step_time_s:.2f}",
            f"{result.step_time_s:.2f}",
            f"{error:+.1%}",
            f"{result.mfu:.1%}",
            ", ".join(run.filled_in),
        )
    CONSOLE.print(table)
    return errors


def summary(errors: list[float]) -> str:
    absolute = [abs(e) for e in errors]
    return f"mean |error| {sum(absolute) / len(absolute):.1%}, max {max(absolute):.1%} over {len(errors)} runs"


def calibration_table() -> None:
    calibration = calibrate_matmul_efficiency()
    table = Table(title=f"A100 matmul efficiency fitted on Korthikanti table 4: {calibration.matmul_efficiency:.3f}")
    for column in ("layer timing", "measured ms", "model ms", "error"):
        table.add_column(column)
    for timing, predicted in calibration.samples:
        error = predicted / timing.measured_s - 1
        table.add_row(timing.id, f"{timing.measured_s * 1e3:.1f}", f"{predicted * 1e3:.2f}", f"{error:+.1%}")
    CONSOLE.print(table)


def zero3_calibration_table() -> None:
    calibration = calibrate_deepspeed_zero3_bandwidth()
    title = (
        "DeepSpeed ZeRO-3 collectives' share of the dp bus bandwidth, fitted on Narayanan table 2: "
        f"{calibration.bandwidth_efficiency:.3f}"
    )
    table = Table(title=title)
    for column in ("run", "published s", "model s", "error"):
        table.add_column(column)
    for run, predicted in calibration.samples:
        table.add_row(run.id, f"{run.step_time_s:.2f}", f"{predicted:.2f}", f"{predicted / run.step_time_s - 1:+.1%}")
    CONSOLE.print(table)


def main() -> None:
    calibration_table()
    zero3_calibration_table()
    print(f"Unpublished fields filled in as: {UNPUBLISHED_DEFAULTS}")
    target: list[float] = []
    for title, prefixes in GROUPS.items():
        errors = run_table(title, prefixes)
        print(f"{title}: {summary(errors)}\n")
        if "(target)" in title:
            target += errors
    print(f"TARGET (table 1 + table 5; goal mean <= 5%, max <= 12%): {summary(target)}")


if __name__ == "__main__":
    main()
