"""The H200 preset against the executor's own block timings on an H200: each Llama-3.2 1B block the profiler
timed (tests/data/h200-llama3.2-1b, `paraplan profile` on one H200), predicted from the preset alone (no profile),
and the Hopper matmul efficiency fitted on the device-bound ones (planner/calibration.py
`calibrate_hopper_matmul_efficiency`; the H100 SXM and H200 presets hold it); and each validated run's measured
peak memory against the analytic estimate of its request (no profile: the ZeRO paper's model states).

Run: python benchmarks/h200_blocks.py   (prints tables; exits 0)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from planner import estimate  # noqa: E402
from planner.calibration import (  # noqa: E402
    DEVICE_BOUND_TOKENS,
    H200_PROFILE_DIR,
    H200_PROFILES,
    calibrate_hopper_matmul_efficiency,
    h200_block_request,
)
from planner.cost.layers import LayerContext, block_cost  # noqa: E402
from planner.request import parse_estimate_request  # noqa: E402
from planner.units import GiB  # noqa: E402

CONSOLE = Console(width=160)


def block_rows() -> list[dict]:
    """Every block timing (tp 1) of the H200 profiles with the preset's prediction of it."""
    rows = []
    for name in H200_PROFILES:
        profile = json.loads((H200_PROFILE_DIR / name / "profile.json").read_text())
        for layer in profile["layers"]:
            if layer["layer"] != "block" or layer["tp"] != 1:
                continue
            req = parse_estimate_request(h200_block_request(profile, layer))
            block = block_cost(req.model, req.training, req.plan, LayerContext.of(req.model, req.training,
                               req.cluster, req.plan))  # fmt: skip
            rows.append({
                "profile": name, "seq": layer["seq_len"], "mbs": layer["micro_batch_size"],
                "recompute": layer["recompute"], "device_bound": layer["seq_len"] * layer["micro_batch_size"]
                >= DEVICE_BOUND_TOKENS,
                "forward": (layer["forward"]["median_s"], layer["forward"]["spread"], block.forward_s),
                "backward": (layer["backward"]["median_s"], layer["backward"]["spread"],
                             block.backward_s + block.recompute_s),
            })  # fmt: skip
    return rows


def print_rows(rows: list[dict]) -> None:
    table = Table(title="H200 preset vs the executor's measured Llama-3.2 1B blocks (ms; spread = the profile's)")
    for column in ("profile", "seq", "mbs", "recompute", "bound by", "fwd measured", "fwd predicted", "ratio",
                   "bwd measured", "bwd predicted", "ratio"):  # fmt: skip
        table.add_column(column, justify="left" if column in ("profile", "recompute", "bound by") else "right")
    for row in rows:
        cells = []
        for measured, spread, predicted in (row["forward"], row["backward"]):
            cells += [f"{measured * 1e3:.3f} ±{spread:.0%}", f"{predicted * 1e3:.3f}", f"{predicted / measured:.2f}"]
        bound = "device" if row["device_bound"] else "host"
        table.add_row(row["profile"], str(row["seq"]), str(row["mbs"]), row["recompute"], bound, *cells)
    CONSOLE.print(table)


def memory_rows() -> list[dict]:
    """Every validated run of the H200 profiles' validations with its measured peak and the analytic estimate's."""
    rows = []
    for name in H200_PROFILES:
        for run in json.loads((H200_PROFILE_DIR / name / "runs.json").read_text()):
            if run.get("measured_peak_bytes") is None:
                continue
            plan = run["plan"]
            rows.append({
                "profile": name, "mbs": plan["micro_batch_size"], "recompute": plan["recompute"],
                "measured": run["measured_peak_bytes"], "predicted": estimate(run["request"]).memory.peak_bytes,
            })  # fmt: skip
    return rows


def print_memory_rows(rows: list[dict]) -> None:
    table = Table(title="Peak memory of the executor's H200 runs, measured vs estimated without a profile (GiB)")
    for column in ("profile", "mbs", "recompute", "measured", "predicted", "ratio"):
        table.add_column(column, justify="left" if column in ("profile", "recompute") else "right")
    for row in rows:
        ratio = row["predicted"] / row["measured"]
        table.add_row(row["profile"], str(row["mbs"]), row["recompute"], f"{row['measured'] / GiB:.2f}",
                      f"{row['predicted'] / GiB:.2f}", f"{ratio:.3f}")  # fmt: skip
    CONSOLE.print(table)
    ratios = sorted(row["predicted"] / row["measured"] for row in rows)
    mape = sum(abs(x - 1) for x in ratios) / len(ratios)
    print(f"peak memory without a profile: predicted / measured {ratios[0]:.2f}-{ratios[-1]:.2f}, median "
          f"{ratios[len(ratios) // 2]:.3f}, MAPE {mape:.1%} over {len(ratios)} runs")  # fmt: skip


def main() -> None:
    rows = block_rows()
    print_rows(rows)
    device = [r for r in rows if r["device_bound"]]
    ratios = [(r["forward"][2] + r["backward"][2]) / (r["forward"][0] + r["backward"][0]) for r in device]
    mape = sum(abs(x - 1) for x in ratios) / len(ratios)
    print(f"device-bound blocks (>= {DEVICE_BOUND_TOKENS} tokens a micro-batch): forward + backward predicted /"
          f" measured {min(ratios):.2f}-{max(ratios):.2f}, MAPE {mape:.1%} over {len(ratios)}")  # fmt: skip
    fit = calibrate_hopper_matmul_efficiency()
    command = "python -m planner.calibration matmul"
    print(f"HOPPER_MATMUL_EFFICIENCY fitted on them: {fit.matmul_efficiency:.3f} ({command})")
    print_memory_rows(memory_rows())


if __name__ == "__main__":
    main()
