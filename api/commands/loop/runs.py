"""One plan run: trained under torchrun for a few steps, its steady step time measured (a crash run once more)."""

from __future__ import annotations

import statistics
import threading
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from api.commands.loop.setup import ValidationSetup, ValidationStopped, estimate_of
from executor import launch
from executor.config import RunDir, TrainConfig
from planner.specs import HardwareProfile, MemoryEstimate, ParallelPlan

RUN_TIMEOUT_S = 600.0
STOP_GRACE_S = 2.0
"""How long a stopped plan run's ranks get between SIGTERM and SIGKILL: a run here keeps no checkpoint, so there is
nothing to wait for; a rank blocked in a collective whose peer has stopped would only hold the stop up."""


@dataclass(frozen=True)
class PlanRun:
    """One plan as predicted and as run. `measured_s` is None when the run failed (`error` says why)."""

    plan: ParallelPlan
    estimate: dict[str, Any]  # the uncalibrated StepEstimate, as JSON
    run_dir: str
    measured_s: float | None = None
    step_times_s: list[float] = field(default_factory=list)
    measured_peak_bytes: int | None = None
    error: str | None = None
    profile_file: str | None = None  # a paired validation's profile of this run (None: the validation's)
    confirm_runs: int = 0  # runs after the sweep pooled into this one (a finalist, `confirm_finalists`)
    crash: str | None = None  # why a run of this plan was killed by a signal and run once more (`run_plan`)
    technique: str | None = None  # the technique entry this run is (api/commands/loop/techniques.py); None: a plan
    request: dict[str, Any] = field(default_factory=dict)  # the contract request it trained, its entry's model too

    @property
    def predicted_s(self) -> float:
        return float(self.estimate["step_time_s"])

    @property
    def predicted_allocated_bytes(self) -> float:
        """The predicted peak that the executor's measured one compares with (MemoryEstimate.allocated_peak_bytes)."""
        return MemoryEstimate.model_validate(self.estimate["memory"]).allocated_peak_bytes


def run_plan(
    setup: ValidationSetup, plan: ParallelPlan, profile: HardwareProfile, run_dir: Path, cancel: threading.Event
) -> PlanRun:
    """Estimate `plan` from `profile`, train it for `setup.steps` steps and take its steady step time. A run that
    `crashed` is run once more, in `<run_dir>-again`, and `crash` keeps why the first one died."""
    estimate = estimate_of(setup, plan, profile)
    result = _train(setup, plan, run_dir, cancel)
    crash = None
    if crashed(result):
        crash, run_dir = failure(result), run_dir.with_name(f"{run_dir.name}-again")
        result = _train(setup, plan, run_dir, cancel)
    run = PlanRun(plan, estimate, str(run_dir), crash=crash, request=setup.request(plan))
    if not result.ok:
        return replace(run, error=failure(result))
    records = RunDir(run_dir).read_metrics()
    steady = [record["step_time_s"] for record in records[setup.warm_steps :]]
    peak = max((record.get("peak_memory_bytes") or 0 for record in records), default=0) or None
    return replace(run, measured_s=statistics.median(steady), step_times_s=steady, measured_peak_bytes=peak)


def _train(setup: ValidationSetup, plan: ParallelPlan, run_dir: Path, cancel: threading.Event) -> launch.RunResult:
    """Train `plan` for `setup.steps` steps in `run_dir` under torchrun; ValidationStopped when `cancel` is set."""
    from api.commands.train import local_spec
    from executor.prepare import prepare_run

    # No checkpoints: a run here only measures, and a 1B model's would write 15 GB per plan.
    config = TrainConfig(steps=setup.steps, data=setup.data, lr=1e-3, device=setup.device,  # type: ignore[arg-type]
                         checkpoints=False)  # fmt: skip
    prepare_run(setup.request(plan), config, run_dir, nproc=setup.nproc)
    spec = local_spec(RunDir(run_dir), setup.nproc, resume=False)
    result = launch.run(
        spec, env={"OMP_NUM_THREADS": str(setup.threads)}, timeout_s=RUN_TIMEOUT_S, cancel=cancel, grace_s=STOP_GRACE_S
    )
    if result.cancelled:
        raise ValidationStopped(f"stopped while running {run_dir}")
    return result


def crashed(result: launch.RunResult) -> bool:
    """A run whose first failed rank was killed by a signal: a crash inside torch, its collectives' library or the
    OS, not the plan's own error (an exception, CUDA out of memory) nor the run's time limit. Worth a second run:
    in validation s16, one of the 90 x 4 runs died so (glibc's heap check aborted a gloo rank in backward) and
    that plan's three other runs were fine."""
    cause = result.root_cause
    return not result.ok and not result.timed_out and cause is not None and cause.exitcode < 0


def failure(result: launch.RunResult) -> str:
    """Why a run failed, by its first failed rank."""
    cause = result.root_cause
    return f"rank {cause.rank}: {cause.message}" if cause else f"exit {result.returncode}"
