"""A validation's report: Markdown (figures, per-plan table, calibration) and a PNG plot, in the output folder.

The plot has two panels: predicted vs measured step time for every plan (before calibration and held-out after,
with the y = x line), and each plan's predicted breakdown by term (stacked) beside its measured time.
matplotlib is imported here only, with the Agg backend (no display needed).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from api.commands.loop.compare import Validation
from api.commands.loop.runs import PlanRun
from planner.cost.step import TIME_TERMS
from planner.describe import describe_plan_compact
from planner.specs import LayerMeasurement
from planner.units import MiB
from profiler.timing import stats

REPORT_FILE, PLOT_FILE = "report.md", "validation.png"


def write_report(result: Validation, stored_profile_id: str | None, command: str) -> tuple[Path, Path]:
    """Write report.md and validation.png to the validation's folder; their paths."""
    out = result.setup.out
    plot = plot_validation(result, out / PLOT_FILE)
    report = out / REPORT_FILE
    report.write_text(markdown(result, stored_profile_id, command, plot.name))
    return report, plot


def markdown(result: Validation, stored_profile_id: str | None, command: str, plot_name: str) -> str:
    setup = result.setup
    lines = [
        f"# Validation: {len(result.measured)} plans on {setup.nproc} {setup.device} rank(s)",
        "",
        f"Command: `{command}`",
        "",
        f"Model {setup.model.name} ({setup.model.num_layers} layers, hidden {setup.model.hidden_size}), "
        f"seq_len {setup.seq_len}, global batch {setup.global_batch_size}; each plan trained {setup.steps} steps "
        f"{_times(setup.passes)}, step time = median of the steps after the first {setup.warm_steps}"
        f"{' of every run, pooled' if setup.passes > 1 else ''}.",
        *_paired_lines(result.paired),
        "",
        *figures_table(result),
        "",
        "After calibration, every plan is predicted by the factors fitted on the other half of the plans only "
        "(fit on one half, test on the other, and the reverse).",
        "",
        f"![predicted vs measured]({plot_name})",
        "",
        *plan_table(result),
        "",
        *finalist_lines(result),
        *contention_lines(result),
        *meeting_lines(result),
        *calibration_lines(result, stored_profile_id),
        *failure_lines(result),
        *technique_lines(result),
    ]
    return "\n".join(lines) + "\n"


def _paired_lines(paired: bool) -> list[str]:
    """The report's note on a paired validation (`Validation.paired`): what its errors do and do not hold."""
    if not paired:
        return []
    return ["", "Paired: each plan's layer shapes were profiled again just before its run, and the run is predicted "
            "from that profile (collectives from the validation's): the errors leave out the machine's drift over "
            "the validation, not the changes of its speed in the minute between a plan's profile and its "
            "run."]  # fmt: skip


def _times(passes: int) -> str:
    return "once" if passes == 1 else f"{passes} times (in alternating order)"


def figures_table(result: Validation) -> list[str]:
    rows = [("step-time MAPE", "mape", "{:.1%}"), ("Kendall tau", "kendall_tau", "{:.3f}"),
            ("top-1 regret", "regret", "{:.1%}")]  # fmt: skip
    lines = ["| figure | before calibration | after calibration (held out) |", "|---|---:|---:|"]
    for label, name, form in rows:
        before, after = getattr(result.before, name), getattr(result.after, name)
        lines.append(f"| {label} | {form.format(before)} | {form.format(after)} |")
    if result.memory_mape is not None:  # calibration fits times only: memory is the same after
        lines.append(f"| peak-memory MAPE (allocated) | {result.memory_mape:.1%} | {result.memory_mape:.1%} |")
    return lines


def plan_table(result: Validation) -> list[str]:
    on_gpu = result.setup.device == "cuda"
    memory_columns = ("predicted allocated MiB | measured allocated MiB | memory error" if on_gpu
                      else "predicted peak MiB | measured peak MiB")  # fmt: skip
    lines = [
        "| plan | predicted s | calibrated s (held out) | measured s | step spread | error before | error after "
        f"| {memory_columns} |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|" + ("---:|" if on_gpu else ""),
    ]
    for run, held_out in zip(result.measured, result.held_out_s, strict=True):
        measured = run.measured_s or float("nan")
        lines.append(
            f"| {describe_run(run)} | {run.predicted_s:.4f} | {held_out:.4f} | {measured:.4f} "
            f"| {step_spread(run):.0%} | {run.predicted_s / measured - 1:+.1%} | {held_out / measured - 1:+.1%} "
            f"| {_memory_cells(run, on_gpu)} |"
        )
    spreads = [step_spread(run) for run in result.measured]
    lines += ["", f"Step spread: the p10-p90 range of a plan's steady steps over their median (median over the "
              f"plans: {np.median(spreads):.0%}); a measured time is itself no surer than that."]  # fmt: skip
    if result.setup.device == "cpu":
        lines += ["", "On a CPU the measured peak is the process's peak resident set (interpreter and torch "
                  "included), so it is shown, not scored."]  # fmt: skip
    return lines


def _memory_cells(run: PlanRun, on_gpu: bool) -> str:
    """Predicted and measured peak in MiB: on a GPU the allocated bytes, and the error; on a CPU the whole
    prediction beside the process's resident set."""
    predicted = run.predicted_allocated_bytes if on_gpu else run.estimate["memory"]["peak_bytes"]
    if not run.measured_peak_bytes:
        return f"{predicted / MiB:.0f} | -" + (" | -" if on_gpu else "")
    cells = f"{predicted / MiB:.0f} | {run.measured_peak_bytes / MiB:.0f}"
    return cells + (f" | {predicted / run.measured_peak_bytes - 1:+.1%}" if on_gpu else "")


def finalist_lines(result: Validation) -> list[str]:
    """Which plans ran again after the sweep (api/commands/loop/schedule.py `confirm_finalists`), and their times
    before."""
    setup = result.setup
    confirmed = [run for run in result.runs if run.confirm_runs]
    if not confirmed:
        return []
    swept_steps = setup.passes * (setup.steps - setup.warm_steps)
    times = "; ".join(
        f"{describe_run(run)} {float(np.median(run.step_times_s[:swept_steps])):.4f} s in the sweep, "
        f"{run.measured_s:.4f} s with {_runs(run.confirm_runs)} more" if run.measured_s is not None
        else f"{describe_run(run)} failed in a run after the sweep"
        for run in confirmed
    )  # fmt: skip
    return ["Finalists (the plans predicted and measured fastest) ran again after the sweep, in alternating order, "
            f"until the fastest was one run again; their times above pool all their steps: {times}.", ""]  # fmt: skip


def _runs(count: int) -> str:
    return "1 run" if count == 1 else f"{count} runs"


def contention_lines(result: Validation) -> list[str]:
    """How much slower the profile's one-device layers ran with every rank busy than alone (none: not timed)."""
    ratios = loaded_over_alone(result.calibrated.layers)
    if not ratios:
        return []
    low, median, high = np.percentile(ratios, [0, 50, 100])
    return [
        f"Layers timed on all {result.setup.nproc} ranks at once took {median:.2f}x their time alone (median over "
        f"{len(ratios)} layer shapes; {low:.2f}x to {high:.2f}x): data-parallel and pipelined plans are costed "
        "from those times (planner/cost/step.py `microbatches_alone`).",
        "",
    ]


def meeting_lines(result: Validation) -> list[str]:
    """The profile's wait per meeting of the ranks, by micro-batch size (none: not measured)."""
    waits = result.calibrated.meeting_waits
    if not waits:
        return []
    each = ", ".join(f"{w.wait_s * 1e3:.2f} ms at micro-batch {w.micro_batch_size}" for w in waits)
    return [
        f"Each meeting of the ranks (a collective all must reach) cost a wait for the latest of {each} "
        "(profiler/meeting_wait.py); the cost model charges it at every data-parallel and pipeline meeting of a step.",
        "",
    ]


def loaded_over_alone(layers: list[LayerMeasurement]) -> list[float]:
    """(forward + backward) loaded / alone, for each one-device layer shape timed both ways."""

    def shape(m: LayerMeasurement) -> tuple[object, ...]:
        return m.layer, m.tp, m.micro_batch_size, m.seq_len, m.dtype, m.recompute

    def seconds(m: LayerMeasurement) -> float:
        return m.forward.median_s + m.backward.median_s

    alone = {shape(m): seconds(m) for m in layers if m.concurrent_ranks == 1 and not m.tp_collectives}
    loaded = [m for m in layers if m.concurrent_ranks > 1 and not m.tp_collectives]
    return [seconds(m) / alone[shape(m)] for m in loaded if alone.get(shape(m), 0) > 0]


def step_spread(run: PlanRun) -> float:
    """How much a plan's steady steps vary: (p90 - p10) / median (profiler/timing.py `stats`)."""
    return stats(run.step_times_s).spread


def calibration_lines(result: Validation, stored_profile_id: str | None) -> list[str]:
    calibration = result.calibrated.calibration
    assert calibration is not None
    stored = f"; stored as profile `{stored_profile_id}`" if stored_profile_id else ""
    efficiencies = [
        *(f"compute {k} {v:.3g}" for k, v in calibration.compute_efficiency.items()),
        *(f"{k} bandwidth {v:.3g}" for k, v in calibration.collective_efficiency.items()),
        *(f"{k} latency {v:.3g}" for k, v in calibration.collective_latency_efficiency.items()),
    ]
    return [
        f"## Calibration (fitted on all {calibration.num_runs} runs: MAPE {calibration.fit_mape:.1%})",
        "",
        f"Efficiencies (profiled time / time in a run): {', '.join(efficiencies)}; gradient-reduction overlap "
        f"{calibration.overlap:.2f}; overhead per micro-batch {calibration.microbatch_overhead_s * 1e3:.2f} ms, "
        f"per step {calibration.step_overhead_s * 1e3:.2f} ms.",
        "",
        f"Calibrated profile: `calibrated-profile.json`{stored}. Estimate with it: `--profile` that file or id.",
    ]


def describe_run(run: PlanRun) -> str:
    """A run's label: its plan's, with the technique entry it is (an fp16 entry's plan reads like a plan's)."""
    label = describe_plan_compact(run.plan)
    return f"{label} [{run.technique} entry]" if run.technique else label


def technique_lines(result: Validation) -> list[str]:
    """The technique entries (api/commands/loop/techniques.py): what each trained, and those this machine left out
    with why."""
    entries = [run for run in result.runs if run.technique]
    if not entries and not result.left_out:
        return []
    lines = ["", "## Technique entries", "",
             "One plan per technique the search space's sweep leaves out, run and compared like the others "
             "(api/commands/loop/techniques.py); an entry of another precision or model is predicted from its own "
             "layers, profiled before its first run, with this validation's collectives.", ""]  # fmt: skip
    for run in entries:
        training = run.request["training"]
        model = run.request["model"]
        experts = f", {model['num_experts']} experts top-{model.get('experts_per_token', 1)}" if model.get(
            "num_experts", 1) > 1 else ""  # fmt: skip
        lines.append(f"- {run.technique}: {describe_plan_compact(run.plan)}, {training['precision']}{experts}")
    lines += [f"- {skipped.technique}: left out, {skipped.reason}" for skipped in result.left_out]
    return lines


def failure_lines(result: Validation) -> list[str]:
    """The plans whose runs failed, and those with a run that crashed (api/commands/loop/runs.py `crashed`) and ran
    again."""
    failed = [run for run in result.runs if run.error]
    crashed = [run for run in result.runs if run.crash]
    lines = []
    if failed:
        lines += [
            "",
            "## Runs that failed",
            "",
            *(f"- {describe_run(run)}: {run.error}" for run in failed),
        ]
    if crashed:
        lines += ["", "## Runs that crashed and ran again", "",
                  "Killed by a signal, not by an error of their own; each ran once more, in `<its folder>-again`:", "",
                  *(f"- {describe_run(run)}: {run.crash}" for run in crashed)]  # fmt: skip
    return lines


def plot_validation(result: Validation, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = result.measured
    measured = np.array([run.measured_s for run in runs])
    before = np.array([run.predicted_s for run in runs])
    after = np.array(result.held_out_s)
    figure, (scatter, bars) = plt.subplots(1, 2, figsize=(15, 6), gridspec_kw={"width_ratios": [1, 2]})

    top = 1.1 * max(measured.max(), before.max(), after.max())
    scatter.plot([0, top], [0, top], color="grey", linewidth=1, label="y = x")
    scatter.scatter(measured, before, marker="o", label=f"before calibration (MAPE {result.before.mape:.1%})")
    scatter.scatter(measured, after, marker="x", label=f"calibrated, held out (MAPE {result.after.mape:.1%})")
    scatter.set(xlim=(0, top), ylim=(0, top), xlabel="measured step time (s)", ylabel="predicted step time (s)",
                title="predicted vs measured")  # fmt: skip
    scatter.legend(loc="upper left", fontsize=8)

    order = np.argsort(measured)
    x = np.arange(len(runs))
    bottom = np.zeros(len(runs))
    for term in TIME_TERMS:
        values = np.array([runs[i].estimate["breakdown"][term] for i in order])
        if values.any():
            bars.bar(x, values, bottom=bottom, label=term.removesuffix("_s"))
            bottom += values
    bars.scatter(x, measured[order], color="black", marker="_", s=120, zorder=3, label="measured")
    bars.scatter(x, after[order], color="red", marker=".", zorder=3, label="calibrated (held out)")
    bars.set_xticks(x, [describe_run(runs[i]) for i in order], rotation=90, fontsize=6)
    bars.set(ylabel="seconds per step", title="predicted breakdown before calibration, by measured time")
    bars.legend(fontsize=7, ncols=3)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path
