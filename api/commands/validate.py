"""`validate`: its options (a typed record), their checks (no torch), and the operation: the closed loop
(api/commands/loop/) run from the options, its report written and, with `store`, its results stored.

The CLI (`paraplan validate`) and a validation job's process (api/commands/run.py) both run `run`; the job's
server stores what the process measured with the same functions (api/commands/loop/records.py `store_runs`,
`store_calibrated`) when the process ends.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from api.commands.defaults import DEFAULT_STEPS, DEFAULT_TECHNIQUES, VALIDATION_MODEL
from api.commands.inputs import model_spec
from api.commands.progress import Progress
from api.errors import InputError
from planner.specs import ModelSpec

FIGURES_FILE = "validation.json"


class ValidateOptions(BaseModel):
    """Everything `validate` takes. The search-space lists (`zero`, `mbs`, `recompute`, `schedule`) left None
    keep the search's own; `runs` compares an earlier validation's runs.json instead of running; `job_id` is the
    job that ran it, if one did."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    nproc: int
    out: Path
    model: ModelSpec = Field(default_factory=lambda: model_spec(json.loads(VALIDATION_MODEL)))
    seq_len: int = 128
    global_batch: int = 8
    profile: str | None = None
    steps: int = DEFAULT_STEPS
    warm_steps: int = 4
    passes: int = 1
    paired: bool = False
    confirm: int = 3
    max_plans: int | None = None
    zero: tuple[int, ...] | None = None
    mbs: tuple[int, ...] | None = None
    recompute: tuple[str, ...] | None = None
    schedule: tuple[str, ...] | None = None
    techniques: tuple[str, ...] = DEFAULT_TECHNIQUES  # checked by `setup_of`, whose refusal names the flag
    device: str = "cpu"  # checked by `setup_of`, whose refusal names the flag
    gpu: str | None = None
    threads: int = 1
    store: bool = True
    runs: Path | None = None
    job_id: str | None = None


# The search-space options -> the SearchOptions field each sets and its flag, for refusals.
_LISTS = {"zero": ("zero_stages", "--zero"), "mbs": ("micro_batch_sizes", "--mbs"),
          "recompute": ("recompute", "--recompute"), "schedule": ("schedules", "--schedule")}  # fmt: skip


def setup_of(options: ValidateOptions) -> Any:
    """The loop's ValidationSetup; InputError naming the flag at fault otherwise."""
    from pydantic import ValidationError

    from api.commands.loop.setup import ValidationSetup
    from planner.specs import SearchOptions

    device, gpu, steps, warm_steps, passes = (
        options.device,
        options.gpu,
        options.steps,
        options.warm_steps,
        options.passes,
    )
    if device not in ("cpu", "cuda"):
        raise InputError(f"--device: cpu or cuda, got {device!r}")
    if device == "cuda" and gpu is None:
        raise InputError("--gpu: name the GPU preset of the cuda device (e.g. h100-sxm) so estimates use its memory")
    if options.paired and passes > 1:
        raise InputError(f"--paired: each plan runs once, right after its own profile; use --passes 1, not {passes}",
                         fields=[{"field": "--paired", "message": "needs --passes 1"}])  # fmt: skip
    if warm_steps >= steps:
        raise InputError(f"--warm-steps: must be below --steps ({steps}), got {warm_steps}", fields=[
            {"field": "--warm-steps", "message": "must be below --steps"}])  # fmt: skip
    _check_techniques(options.techniques)
    given = {field: getattr(options, name) for name, (field, _) in _LISTS.items() if getattr(options, name) is not None}
    try:
        search = SearchOptions(**given)
    except ValidationError as exc:
        problem = exc.errors()[0]
        field = str(problem["loc"][0]) if problem["loc"] else ""
        flag = next((flag for name, flag in _LISTS.values() if name == field), "--model")
        raise InputError(f"{flag}: {problem['msg']}", fields=[{"field": flag, "message": problem["msg"]}]) from None
    return ValidationSetup(
        model=options.model, seq_len=options.seq_len, global_batch_size=options.global_batch, nproc=options.nproc,
        out=options.out, device=device, gpu=gpu or "cpu", steps=steps, warm_steps=warm_steps, search=search,
        max_plans=options.max_plans, threads=options.threads, passes=passes, paired=options.paired,
        confirm=options.confirm, techniques=options.techniques,
    )  # fmt: skip


def _check_techniques(techniques: tuple[str, ...]) -> None:
    from api.commands.loop.techniques import TECHNIQUES

    unknown = [name for name in techniques if name not in TECHNIQUES]
    if unknown or len(set(techniques)) != len(techniques):
        why = f"unknown {', '.join(map(repr, unknown))}" if unknown else "each at most once"
        message = f"{why}; give some of {', '.join(TECHNIQUES)}, all or none"
        raise InputError(f"--techniques: {message}", fields=[{"field": "--techniques", "message": message}])


def check(options: ValidateOptions) -> None:
    """What a validation job checks before it is queued (no torch): the setup, and two plans the executor runs."""
    from api.commands.loop.techniques import grid

    plans, _ = grid(setup_of(options))
    if len(plans) < 2:
        raise InputError(f"the search space holds {len(plans)} plan(s) the executor can run; validating needs two")


@dataclass(frozen=True)
class Finished:
    """A validation that ran to its end: the loop's result, the stored id of its calibrated profile (with `store`),
    and the report and plot written beside the runs."""

    result: Any
    stored: str | None
    report: Path
    plot: Path

    def figures_json(self) -> dict[str, Any]:
        """What `--json` prints: the figures with where the report, the plot and the calibrated profile are."""
        return self.result.figures_json() | {"report": str(self.report), "plot": str(self.plot),
                                             "calibrated_profile": self.stored}  # fmt: skip


def run(options: ValidateOptions, progress: Progress, cancel: threading.Event, command: str) -> Finished:
    """The loop from the options, then report.md, validation.png and validation.json in `options.out`. `command`
    is the command line the report quotes. ValidationStopped when `cancel` is set; ValueError on bad input;
    RuntimeError when profiling failed or fewer than two plans ran."""
    from api.commands.loop.report import write_report

    setup = setup_of(options)
    profile_ref = options.profile
    if options.runs is not None and profile_ref is None:
        profile_ref = str(options.runs.with_name("profile.json"))
    measured = resolve_profile(profile_ref) if profile_ref is not None else None
    result, stored = _run_loop(setup, measured, options, progress, cancel)
    report, plot = write_report(result, stored, command)
    (options.out / FIGURES_FILE).write_text(json.dumps(result.figures_json(), indent=2) + "\n")
    return Finished(result, stored, report, plot)


def resolve_profile(ref: str) -> Any:
    """A profile file, or an id stored in the database (imported only when asked)."""
    from profiler.store import resolve_profile as resolve

    return resolve(ref)


def _run_loop(setup: Any, profile: Any, options: ValidateOptions, progress: Progress, cancel: threading.Event) -> Any:
    from api.commands.loop.validate import Outputs, validate
    from api.store import ApiStore, new_id
    from profiler.store import default_database_url

    database = ApiStore(default_database_url()) if options.store else None
    outputs = Outputs(store=database, validation_id=options.job_id or new_id(), job_id=options.job_id)
    try:
        return validate(setup, profile, outputs, progress, cancel, options.runs)
    finally:
        if database is not None:
            database.close()
