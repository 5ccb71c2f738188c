"""Check a training run before any process starts, and write its run.json. No torch.

Everything a worker would otherwise discover after torchrun has started (and, for a plan the executor cannot
run, possibly only as a hang in a collective) is refused here, with every reason at once: an invalid or
unexecutable plan, a process count that is not the plan's, a data file that is missing or too short, an
output folder that already holds another run.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from executor.config import RunDir, TrainConfig, TrainRun
from executor.data import text_data_violations
from executor.support import executor_violations
from planner.errors import Violation
from planner.request import EstimateRequest, parse_estimate_request
from planner.rules import plan_violations


class RunRefused(ValueError):
    """A training run that must not start; `violations` names each field at fault and why."""

    def __init__(self, violations: list[Violation]):
        self.violations = list(violations)
        lines = "\n".join(f"  - {v}" for v in self.violations)
        super().__init__(f"cannot start this training run:\n{lines}")


def _plan_problems(request: EstimateRequest) -> list[Violation]:
    """The planner's rules (the plan fits its model and cluster), then the executor's refusals on fields the
    planner found no fault with: both check some of the same things, and one reason per field is enough."""
    invalid = plan_violations(request.plan, request.model, request.training, request.cluster)
    faulted = {violation.field for violation in invalid}
    unexecutable = executor_violations(request.plan, request.model, request.training)
    return [*invalid, *(violation for violation in unexecutable if violation.field not in faulted)]


def _nproc_problems(request: EstimateRequest, nproc: int | None) -> list[Violation]:
    plan = request.plan
    if nproc is None or nproc == plan.num_gpus:
        return []
    return [
        Violation(
            "nproc",
            "nproc_differs_from_plan",
            f"{nproc} processes asked, but the plan needs dp x tp x pp x cp = "
            f"{plan.dp} x {plan.tp} x {plan.pp} x {plan.cp} = {plan.num_gpus}",
        )
    ]


def _data_problems(request: EstimateRequest, data: Path | None) -> list[Violation]:
    if data is None:
        return []
    return text_data_violations(data, request.model.vocab_size, request.training.seq_len)


def _output_problems(run: TrainRun, run_dir: RunDir, resume: bool) -> list[Violation]:
    exists = run_dir.run_file.is_file()
    if not resume:
        if exists or run_dir.metrics_file.exists() or run_dir.checkpoints.exists():
            return [
                Violation(
                    "out",
                    "run_exists",
                    f"{run_dir.root} already holds a run; pass --resume to continue it, or choose another folder",
                )
            ]
        return []
    if not exists:
        return [Violation("out", "nothing_to_resume", f"{run_dir.root} holds no run.json to resume")]
    try:
        previous = run_dir.read_run()
    except ValueError as exc:
        return [Violation("out", "unreadable_run", f"{run_dir.run_file} cannot be read: {exc}")]
    return [
        Violation(
            field,
            "resume_changes_run",
            "differs from the run being resumed; a checkpoint only continues "
            "the same model, batch, plan and hyperparameters",
        )  # fmt: skip
        for field in previous.same_training_as(run)
    ]


def prepare_run(
    request: dict[str, Any] | EstimateRequest,
    config: TrainConfig,
    out: Path,
    *,
    nproc: int | None = None,
    resume: bool = False,
) -> TrainRun:
    """The run to launch, written to `out`/run.json; RunRefused naming every problem otherwise.

    Raises pydantic's ValidationError for a malformed request and InfeasiblePlanError for a plan that is
    invalid for its model and cluster (both ValueErrors, like RunRefused).
    """
    parsed = parse_estimate_request(request)
    data = config.data.resolve() if config.data is not None else None  # workers may run in another folder
    run = TrainRun(request=parsed, config=config.model_copy(update={"data": data}))
    run_dir = RunDir(out)
    problems = [
        *_plan_problems(parsed),
        *_nproc_problems(parsed, nproc),
        *_data_problems(parsed, data),
        *_output_problems(run, run_dir, resume),
    ]
    if problems:
        raise RunRefused(problems)
    run_dir.write_run(run)
    return run
