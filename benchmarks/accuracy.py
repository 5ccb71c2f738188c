"""Predicted vs published step times for every training run in the dev set and the dev half of vTrain's runs,
the A100 calibration, the fit of DeepSpeed ZeRO-3's collective bandwidth, the host floor's fit on half of the vTrain
rows (reported on the other half too), and the error bands every estimate carries (fitted afresh from all
validation runs; `python -m planner.calibration bands` stores them).

Run: python benchmarks/accuracy.py   (prints tables; exits 0)

Any other file of published runs in the dev set's record schema (../shared/data/dev-set.json):
     python benchmarks/accuracy.py --records runs.json
prints predicted / measured per source, stack and GPU, and the records it cannot express, with the reason.
"""

from __future__ import annotations

import argparse
import sys
from datetime import date
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from planner import estimate  # noqa: E402
from planner.calibration import (  # noqa: E402
    MEASURED_RUNS,
    calibrate_deepspeed_zero3_bandwidth,
    calibrate_matmul_efficiency,
    describe_band,
    fit_uncertainty,
    validation_runs,
    vtrain_halves,
)
from planner.devset import UNPUBLISHED_DEFAULTS, VTRAIN_PATH, training_runs, unsupported_runs  # noqa: E402

CONSOLE = Console(width=200)
REPO = Path(__file__).resolve().parent.parent

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


def vtrain_table() -> dict[str, list[float]]:
    """vTrain's dev runs by group: one node or several, and the half the host floor was fitted on or not."""
    runs = training_runs(VTRAIN_PATH)
    fit, _ = vtrain_halves(runs)
    fitted = {run.id for run in fit}
    groups: dict[str, list[float]] = {}
    for run in runs:
        ratio = estimate(run.request).step_time_s / run.step_time_s
        nodes = "one node" if run.request["cluster"]["num_nodes"] == 1 else "several nodes"
        half = "fitted half" if run.id in fitted else "held-out half"
        for group in (nodes, f"{nodes}, {half}", half):
            groups.setdefault(group, []).append(ratio)
    title = "vTrain dev half (Megatron-LM, A100, measured iteration times): predicted / measured"
    ratio_table(title, groups, "group")
    return groups


def _quantile(values: list[float], q: float) -> float:
    return values[min(len(values) - 1, int(q * len(values)))]


def bands_table() -> None:
    """The 90% bands of measured / predicted per regime and scale, over every validation run."""
    bands = fit_uncertainty(validation_runs(tuple(REPO / path for path in MEASURED_RUNS)), date.today().isoformat())
    table = Table(title="Error bands: 90% of the validation runs measured within (measured / predicted - 1)")
    for column in ("regime", "scale", "step time", "peak memory"):
        table.add_column(column)
    for band in bands.bands:
        table.add_row(band.regime, band.scale, describe_band(band.step_time), describe_band(band.peak_memory))
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


def records_report(path: Path) -> None:
    """Predicted / measured for every run of `path`, by source, stack and GPU (step time, and peak memory where the
    run published it); then what could not be estimated."""
    times: dict[str, list[float]] = {}
    memories: dict[str, list[float]] = {}
    refused = unsupported_runs(path)
    for run in training_runs(path):
        try:
            result = estimate(run.request)
        except ValueError as error:  # a request the contract refuses: its first line says which field
            refused[run.id] = str(error).splitlines()[0]
            continue
        training, cluster = run.request["training"], run.request["cluster"]
        group = f"{run.id.split('_')[0]} · {training['framework']} · {cluster['gpu']}"
        times.setdefault(group, []).append(result.step_time_s / run.step_time_s)
        if run.peak_memory_bytes:
            memories.setdefault(group, []).append(result.memory.peak_bytes / run.peak_memory_bytes)
    ratio_table(f"{path.name}: predicted / measured step time", times, "source · stack · GPU")
    if memories:
        ratio_table(f"{path.name}: predicted / published peak memory", memories, "source · stack · GPU")
    every = [ratio for ratios in times.values() for ratio in ratios]
    if every:
        print(f"all {len(every)} runs: step time MAPE {sum(abs(r - 1) for r in every) / len(every):.1%}")
    for run_id, reason in sorted(refused.items()):
        print(f"not estimated: {run_id}: {reason}")


def ratio_table(title: str, groups: dict[str, list[float]], group_column: str) -> None:
    """One row per group of predicted / measured ratios: how many, their median, p10, p90 and MAPE."""
    table = Table(title=title)
    for column in (group_column, "runs", "median", "p10", "p90", "MAPE"):
        table.add_column(column, justify="left" if column == group_column else "right")
    for group in sorted(groups):
        ratios = sorted(groups[group])
        table.add_row(
            group, str(len(ratios)), f"{_quantile(ratios, 0.5):.3f}", f"{_quantile(ratios, 0.1):.3f}",
            f"{_quantile(ratios, 0.9):.3f}", f"{sum(abs(r - 1) for r in ratios) / len(ratios):.1%}",
        )  # fmt: skip
    CONSOLE.print(table)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=Path, help="a file of published runs in the dev set's record schema")
    records = parser.parse_args().records
    if records is not None:
        records_report(records)
        return
    calibration_table()
    zero3_calibration_table()
    print(f"Unpublished fields filled in as: {UNPUBLISHED_DEFAULTS}")
    target: list[float] = []
    for title, prefixes in GROUPS.items():
        errors = run_table(title, prefixes)
        print(f"{title}: {summary(errors)}\n")
        if "(target)" in title:
            target += errors
    print(f"TARGET (table 1 + table 5; goal mean <= 5%, max <= 10%): {summary(target)}")
    groups = vtrain_table()
    for nodes in ("one node", "several nodes"):
        ratios = groups[nodes]
        print(f"TARGET vTrain {nodes} (goal MAPE <= 10%): {sum(abs(r - 1) for r in ratios) / len(ratios):.1%}")
    bands_table()


if __name__ == "__main__":
    main()
