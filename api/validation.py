"""`paraplan validate`: profile this machine, run every valid plan, compare with the predictions, recalibrate.

The loop, in order:
1. a profile of this machine for the model (layers at every micro-batch size, tp degree and recompute mode the
   plans use, and the collectives of `nproc` ranks), unless an existing one is given; with several passes of
   runs, one profile pass before each pass of runs, the profiles pooled (profiler/pool.py);
2. every plan the search space holds for `nproc` ranks (planner/search/space.py) that the executor can run;
3. each plan trained by the executor under torchrun for a few steps; its steady step time is the median of the
   steps after the warm-up ones, and it is stored as a measured run with its plan and its estimate; paired
   (`--paired`), each run is predicted from its plan's layer shapes profiled again just before it;
   then the finalists (the plans predicted and measured fastest) run a few times more, pooled, until the plan
   measured fastest is one that ran again (`confirm_finalists`);
4. predicted vs measured, before calibration and after (each plan predicted by a calibration fitted on the other
   half of the plans only), and the calibration fitted on all runs, saved with the profile.
No torch here: the profiler and the runs import it in their own processes or on first use.
"""

from __future__ import annotations

import json
import math
import statistics
import threading
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from api.errors import InputError
from api.store import ApiStore, MeasuredRunRow, new_id, utc_now
from executor import launch
from executor.config import RunDir, TrainConfig
from executor.support import executor_violations
from planner import agreement
from planner.calibration import MeasuredStep, fit_calibration, held_out_predictions, predict_steps
from planner.cost.params import model_params
from planner.cost.step import estimate_step
from planner.profiles import load_profile_json, save_profile_json
from planner.request import parse_estimate_request, parse_plan_request, profile_costs
from planner.search.space import search_space
from planner.specs import HardwareProfile, ModelSpec, ParallelPlan, SearchOptions
from profiler.pool import overlay_profile, pool_profiles
from profiler.worker import write_json_atomically


class ValidationStopped(RuntimeError):
    """Ctrl-C, SIGTERM or a cancelled job stopped the validation; what ran so far is kept in its folder."""


DEFAULT_DATA = Path(__file__).resolve().parent.parent / "executor" / "texts" / "founding.txt"
RUN_TIMEOUT_S = 600.0


# Steps each plan trains by default: 16 steady ones after the 4 warm-up steps. A plan's time is the median of its
# steady steps, whose p10-p90 spread reached 30% on launch-bound GPU plans and on this 2-core CPU (README, "Checking
# the cost model against real runs"): a coefficient of variation near 12%, so 16 steps put the median's standard
# error near 1.25 x 12% / 4 = 4%, against 5% with the 8 of the former default of 12 steps. More passes or steps
# narrow it further (the CPU targets took 4 runs of 30 steps a plan).
DEFAULT_STEPS = 20


@dataclass(frozen=True)
class ValidationSetup:
    """What to validate: the model and batch, on `nproc` local ranks of `device`, and how long to run each plan."""

    model: ModelSpec
    seq_len: int
    global_batch_size: int
    nproc: int
    out: Path
    device: str = "cpu"
    gpu: str = "cpu"  # the cluster's GPU preset; `cpu` for CPU ranks
    steps: int = DEFAULT_STEPS
    warm_steps: int = 4  # left out of the median: lazy initialisation and the allocator settle in the first steps
    search: SearchOptions = field(default_factory=SearchOptions)
    max_plans: int | None = None
    data: Path = DEFAULT_DATA
    threads: int = 1  # torch threads per rank, in the profile and the runs alike (a profile holds for one count)
    # Times every plan is run, each pass in the opposite order of the one before, its steady steps pooled, and a
    # profile pass measured before each: a machine whose speed drifts over the validation's minutes then weighs on
    # every plan, and on the profile, alike (see `run_all`, `_profile_and_run`).
    passes: int = 1
    # Each plan's layer shapes profiled again just before its run, and the run predicted from that profile (the
    # collectives from the validation's): the error then measures the cost model, not how far the machine's speed
    # drifted between the profile and the run (`run_all`). One pass only: the pass is the pairing.
    paired: bool = False
    # Runs more of each finalist (the plans predicted and measured fastest) after the sweep, pooled with its first
    # (`confirm_finalists`): the top-1 regret is then taken between times the machine would repeat.
    confirm: int = 3

    def request(self, plan: ParallelPlan | None = None) -> dict[str, Any]:
        """The contract request of this setup, with `plan` when given."""
        request: dict[str, Any] = {
            "model": self.model.model_dump(mode="json", exclude_unset=True),
            "training": {"seq_len": self.seq_len, "global_batch_size": self.global_batch_size,
                         "precision": "fp32" if self.device == "cpu" else "bf16"},
            "cluster": {"gpu": self.gpu, "num_nodes": 1, "gpus_per_node": self.nproc},
        }  # fmt: skip
        if plan is not None:
            request["plan"] = plan.model_dump(mode="json")
        return request


# ------------------------------------------------------------------------------------------------ plans


def valid_plans(setup: ValidationSetup) -> list[ParallelPlan]:
    """Every plan of the search space that the executor runs, in the search space's order; with `max_plans`, that
    many spread evenly over the list (so every layout keeps some)."""
    req = parse_plan_request({**setup.request(), "search": setup.search.model_dump(mode="json")})
    candidates, _ = search_space(req.model, req.training, req.cluster, req.search)
    plans = [candidates.plan(row, setup.search.overlap_grad_reduce) for row in range(len(candidates))]
    runnable = [plan for plan in plans if not executor_violations(plan, req.model, req.training)]
    if setup.max_plans is None or len(runnable) <= setup.max_plans:
        return runnable
    picks = np.linspace(0, len(runnable) - 1, setup.max_plans).round().astype(int)
    return [runnable[i] for i in sorted(set(picks.tolist()))]


def profile_needs(plans: list[ParallelPlan]) -> dict[str, list]:
    """The layer shapes the plans' estimates look up: micro-batch sizes, tp degrees and recompute modes."""
    return {
        "micro_batch_sizes": sorted({p.micro_batch_size for p in plans}),
        "tps": sorted({p.tp for p in plans}),
        "recompute_modes": sorted({p.recompute for p in plans}, key=["none", "selective", "full"].index),
        "sequence_parallel": sorted({p.sequence_parallel for p in plans if p.tp > 1}) or [False],
    }


# ------------------------------------------------------------------------------------------------- runs


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

    @property
    def predicted_s(self) -> float:
        return float(self.estimate["step_time_s"])

    @property
    def predicted_allocated_bytes(self) -> float:
        """The predicted peak of the stage that peaks, without the bytes the CUDA caching allocator does not count
        as allocated (the `other` term: context, NCCL buffers, fragmentation): what torch.cuda.max_memory_allocated,
        the executor's measured peak on a GPU, compares with."""
        stages = self.estimate["memory"]["by_stage"]
        return max(float(stage["total_bytes"]) - float(stage["other_bytes"]) for stage in stages)


def run_plan(
    setup: ValidationSetup, plan: ParallelPlan, profile: HardwareProfile, run_dir: Path, cancel: threading.Event
) -> PlanRun:
    """Estimate `plan` from `profile`, train it for `setup.steps` steps and take its steady step time. A run that
    `crashed` is run once more, in `<run_dir>-again`, and `crash` keeps why the first one died."""
    estimate = _estimate(setup, plan, profile)
    result = _train(setup, plan, run_dir, cancel)
    crash = None
    if crashed(result):
        crash, run_dir = failure(result), run_dir.with_name(f"{run_dir.name}-again")
        result = _train(setup, plan, run_dir, cancel)
    run = PlanRun(plan, estimate, str(run_dir), crash=crash)
    if not result.ok:
        return replace(run, error=failure(result))
    records = RunDir(run_dir).read_metrics()
    steady = [record["step_time_s"] for record in records[setup.warm_steps :]]
    peak = max((record.get("peak_memory_bytes") or 0 for record in records), default=0) or None
    return replace(run, measured_s=statistics.median(steady), step_times_s=steady, measured_peak_bytes=peak)


def _train(setup: ValidationSetup, plan: ParallelPlan, run_dir: Path, cancel: threading.Event) -> launch.RunResult:
    """Train `plan` for `setup.steps` steps in `run_dir` under torchrun; ValidationStopped when `cancel` is set."""
    from api.training import local_spec
    from executor.prepare import prepare_run

    # No checkpoints: a run here only measures, and a 1B model's would write 15 GB per plan.
    config = TrainConfig(steps=setup.steps, data=setup.data, lr=1e-3, device=setup.device,  # type: ignore[arg-type]
                         checkpoints=False)  # fmt: skip
    prepare_run(setup.request(plan), config, run_dir, nproc=setup.nproc)
    spec = local_spec(RunDir(run_dir), setup.nproc, resume=False)
    result = launch.run(spec, env={"OMP_NUM_THREADS": str(setup.threads)}, timeout_s=RUN_TIMEOUT_S, cancel=cancel)
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


# ----------------------------------------------------------------------------------------------- result


@dataclass(frozen=True)
class Figures:
    """How predictions agree with the runs (planner/agreement.py)."""

    mape: float
    kendall_tau: float
    regret: float

    @classmethod
    def of(cls, predicted: np.ndarray, measured: np.ndarray) -> Figures:
        return cls(
            mape=agreement.mape(predicted, measured),
            kendall_tau=agreement.kendall_tau(predicted, measured),
            regret=agreement.top1_regret(predicted, measured),
        )


@dataclass(frozen=True)
class Validation:
    """A finished validation: every plan's run, the figures before and after calibration (held out), and the
    calibrated profile."""

    setup: ValidationSetup
    runs: list[PlanRun]
    held_out_s: list[float]  # per measured run, predicted by the calibration fitted on the other half
    before: Figures
    after: Figures
    calibrated: HardwareProfile

    @property
    def memory_mape(self) -> float | None:
        """The mean absolute error of the predicted allocated peak (`PlanRun.predicted_allocated_bytes`) over the
        runs' measured one, on a GPU; None on a CPU, where the measured peak is the process's resident set."""
        runs = [run for run in self.measured if run.measured_peak_bytes]
        if self.setup.device != "cuda" or not runs:
            return None
        predicted = np.array([run.predicted_allocated_bytes for run in runs])
        return agreement.mape(predicted, np.array([run.measured_peak_bytes for run in runs], dtype=float))

    @property
    def measured(self) -> list[PlanRun]:
        return [run for run in self.runs if run.measured_s is not None]

    @property
    def paired(self) -> bool:
        """The runs were predicted from profiles measured next to them (`ValidationSetup.paired`)."""
        return any(run.profile_file for run in self.runs)

    def figures_json(self) -> dict[str, Any]:
        """What `--json` prints: the headline figures (before calibration at the top level, as the issue names
        them) and the fitted calibration."""
        calibration = self.calibrated.calibration
        return {
            **asdict(self.before),
            "memory_mape": self.memory_mape,
            "calibrated": {**asdict(self.after), "held_out": True},
            "paired": self.paired,
            "plans": len(self.runs),
            "measured": len(self.measured),
            "failed": [{"plan": r.plan.model_dump(mode="json"), "error": r.error} for r in self.runs if r.error],
            "crashed_once": [{"plan": r.plan.model_dump(mode="json"), "error": r.crash} for r in self.runs if r.crash],
            "calibration": calibration.model_dump(mode="json") if calibration else None,
        }


def _own_profile(run: PlanRun) -> HardwareProfile | None:
    """The profile measured next to the run, in a paired validation; None otherwise."""
    return load_profile_json(Path(run.profile_file)) if run.profile_file else None


def compare(setup: ValidationSetup, profile: HardwareProfile, runs: list[PlanRun], created: str) -> Validation:
    """The figures before calibration, the held-out figures after, and the calibration fitted on every run."""
    measured = [run for run in runs if run.measured_s is not None]
    if len(measured) < 2:
        raise RuntimeError(f"only {len(measured)} plan(s) ran; comparing and calibrating needs at least two")
    steps = [
        MeasuredStep(parse_estimate_request(setup.request(run.plan)), run.measured_s, _own_profile(run))  # type: ignore[arg-type]
        for run in measured
    ]
    times = np.array([run.measured_s for run in measured])
    before = predict_steps(profile, steps)
    held_out = held_out_predictions(profile, steps, created)
    calibrated = fit_calibration(profile, steps, created)
    return Validation(
        setup=setup,
        runs=runs,
        held_out_s=held_out.tolist(),
        before=Figures.of(before, times),
        after=Figures.of(held_out, times),
        calibrated=calibrated,
    )


def run_all(
    setup: ValidationSetup,
    plans: list[ParallelPlan],
    profile_for_pass: Callable[[int], HardwareProfile],
    cancel: threading.Event,
    on_attempt: Callable[[Attempt], None] = lambda attempt: None,
    profile_for_run: Callable[[ParallelPlan, HardwareProfile], HardwareProfile] | None = None,
) -> list[PlanRun]:
    """Run every plan `setup.passes` times, one run at a time (they share this machine), odd passes in reverse
    order, so that early and late plans see the machine's drift alike; a plan's result pools its passes
    (`pooled`). Each pass's runs are estimated from `profile_for_pass(pass)`, called as the pass begins (it may
    measure). Then the finalists are run `setup.confirm` times more (`confirm_finalists`), estimated from the last
    pass's profile. After each run, `on_attempt` sees the progress and the result so far of every plan run at
    least once. With `profile_for_run` (a paired validation), each run is estimated from
    `profile_for_run(plan, pass profile)`, measured just before it and kept in its run folder."""
    attempts: list[list[PlanRun]] = [[] for _ in plans]
    schedule = [(attempt, i) for attempt in range(setup.passes) for i in _pass_order(len(plans), attempt)]
    done = 0
    profile = None
    for attempt in range(setup.passes):
        profile = profile_for_pass(attempt)
        for i in _pass_order(len(plans), attempt):
            folder = f"{i:03d}" if setup.passes == 1 else f"{i:03d}-pass{attempt + 1}"
            attempts[i].append(_run_one(setup, plans[i], profile, setup.out / "runs" / folder, cancel, profile_for_run))
            done += 1
            upcoming = plans[schedule[done][1]] if done < len(schedule) else None
            on_attempt(Attempt(done, len(schedule), upcoming, [pooled(runs) for runs in attempts if runs]))
    swept = [pooled(runs) for runs in attempts]
    if setup.confirm == 0 or profile is None:
        return swept
    last_profile = profile

    def rerun(i: int, attempt: int) -> PlanRun:
        folder = setup.out / "runs" / f"{i:03d}-confirm{attempt + 1}"
        return _run_one(setup, plans[i], last_profile, folder, cancel, profile_for_run)

    return confirm_finalists(swept, setup.confirm, rerun, lambda progress: on_attempt(progress.after(done)))


@dataclass(frozen=True)
class Attempt:
    """Progress of a validation's runs: `done` of the `total` runs known so far, the plan up next (None when none
    is known) and every plan's result so far."""

    done: int
    total: int
    upcoming: ParallelPlan | None
    so_far: list[PlanRun]

    def after(self, earlier: int) -> Attempt:
        """This progress counted after `earlier` runs already done."""
        return replace(self, done=self.done + earlier, total=self.total + earlier)


# A plan's time is the median of one run's steady steps, and runs of the same plan differ by more than their
# steps do (the machine's speed drifts over minutes): among 90 plans measured once, the fastest is most often a
# plan whose one run fell in a fast spell (the winner's curse), and the top-1 regret then compares the predicted
# best with a time no run of that plan would repeat (validations s11 and s12: dp2 ZeRO-1 mbs2 measured 0.228 and
# 0.238 s, 11-21% under its ZeRO-0 twin; run four times alternating with it, 0.291 s, 5% over). So the finalists,
# the plan predicted fastest and the plan measured fastest, are run again before the figures are taken, until the
# plan measured fastest is one that was run again, or MAX_FINALISTS plans were.
MAX_FINALISTS = 6


def confirm_finalists(
    runs: list[PlanRun],
    passes: int,
    rerun: Callable[[int, int], PlanRun],
    on_attempt: Callable[[Attempt], None] = lambda attempt: None,
) -> list[PlanRun]:
    """`runs` with the finalists (`finalists`) each run `passes` times more by `rerun(index, pass)`, in
    alternating order, and pooled with their first result; round after round while the plan measured fastest has
    not been run again, at most MAX_FINALISTS plans in all. A finalist's `confirm_runs` counts its extra runs."""
    runs = list(runs)
    confirmed: set[int] = set()
    done = 0
    while todo := [i for i in finalists(runs) if i not in confirmed][: MAX_FINALISTS - len(confirmed)]:
        extra: dict[int, list[PlanRun]] = {i: [] for i in todo}
        schedule = [i for attempt in range(passes) for i in _alternating(todo, attempt)]
        for step, i in enumerate(schedule):
            extra[i].append(rerun(i, len(extra[i])))
            done += 1
            upcoming = runs[schedule[step + 1]].plan if step + 1 < len(schedule) else None
            on_attempt(Attempt(done, done - step - 1 + len(schedule), upcoming, _with_extras(runs, extra)))
        runs = _with_extras(runs, extra)
        confirmed.update(todo)
    return runs


def finalists(runs: list[PlanRun]) -> list[int]:
    """The indices of the plan predicted fastest and of the plan measured fastest, among the runs that ran."""
    ran = [i for i, run in enumerate(runs) if run.measured_s is not None]
    if len(ran) < 2:
        return []
    predicted_best = min(ran, key=lambda i: runs[i].predicted_s)
    measured_best = min(ran, key=lambda i: runs[i].measured_s)  # type: ignore[arg-type, return-value]
    return sorted({predicted_best, measured_best})


def _with_extras(runs: list[PlanRun], extra: dict[int, list[PlanRun]]) -> list[PlanRun]:
    """`runs`, each pooled with its extra runs (by index) so far."""
    return [_with_extra(run, extra.get(i, [])) for i, run in enumerate(runs)]


def _with_extra(run: PlanRun, extra: list[PlanRun]) -> PlanRun:
    if not extra:
        return run
    return replace(pooled([run, *extra]), confirm_runs=run.confirm_runs + len(extra))


def _run_one(
    setup: ValidationSetup,
    plan: ParallelPlan,
    profile: HardwareProfile,
    run_dir: Path,
    cancel: threading.Event,
    profile_for_run: Callable[[ParallelPlan, HardwareProfile], HardwareProfile] | None,
) -> PlanRun:
    """`run_plan`, estimated from the plan's own profile when there is `profile_for_run`, which is then saved in
    the folder of the run measured (`<run_dir>-again` after a crash)."""
    if profile_for_run is None:
        return run_plan(setup, plan, profile, run_dir, cancel)
    own = profile_for_run(plan, profile)
    run = run_plan(setup, plan, own, run_dir, cancel)
    return replace(run, profile_file=str(save_profile_json(own, Path(run.run_dir) / PROFILE_FILE)))


def _pass_order(count: int, attempt: int) -> list[int]:
    """The plans' indices in the order pass `attempt` runs them: forward, then backward, and so on."""
    return _alternating(list(range(count)), attempt)


def _alternating(items: list[int], attempt: int) -> list[int]:
    return items if attempt % 2 == 0 else items[::-1]


def pooled(runs: list[PlanRun]) -> PlanRun:
    """One plan's runs as one: the first failure if any failed, else the median of every run's steady steps, with
    the last run's estimate (made from the profile as it stood after every pass's measurement); either way with
    the first crash that a run survived by running again."""
    crash = next((run.crash for run in runs if run.crash), None)
    failed = next((run for run in runs if run.measured_s is None), None)
    if failed is not None:
        return replace(failed, crash=crash)
    steps = [step for run in runs for step in run.step_times_s]
    peaks = [run.measured_peak_bytes for run in runs if run.measured_peak_bytes is not None]
    return replace(runs[-1], run_dir=runs[0].run_dir, measured_s=statistics.median(steps), step_times_s=steps,
                   measured_peak_bytes=max(peaks) if peaks else None, crash=crash)  # fmt: skip


def run_record(run: PlanRun, setup: ValidationSetup) -> dict[str, Any]:
    """A run as runs.json keeps it: what it measured, with the full request it trained."""
    return {**asdict(run), "plan": run.plan.model_dump(mode="json"), "request": setup.request(run.plan),
            "device": setup.device, "steps": setup.steps, "passes": setup.passes}  # fmt: skip


def write_runs(path: Path, runs: list[PlanRun], setup: ValidationSetup) -> None:
    write_json_atomically(path, [run_record(run, setup) for run in runs])


def read_runs(path: Path, setup: ValidationSetup, profile: HardwareProfile) -> list[PlanRun]:
    """An earlier validation's runs (its runs.json), each estimated again by the cost model as it is now, from
    `profile`: a changed cost model or profile checked against runs already measured, without running them again.
    InputError naming --runs, the file and the run if it is not such a file, or a run trained another setup's
    request."""
    try:
        records = json.loads(path.read_text())
        runs = [_earlier_run(record) for record in records]
        trained = [parse_estimate_request(record["request"]) for record in records]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise InputError.at("--runs", f"{path} is not a validation's runs.json: {error}") from error
    if not runs:
        raise InputError.at("--runs", f"{path} holds no runs")
    estimated = []
    for number, (record, run) in enumerate(zip(records, runs, strict=True)):
        where = f"{path} run {number}"
        _require_same_setup(trained[number], setup, run.plan, where)
        _require_same_count(record, "steps", setup.steps, where)
        _require_same_count(record, "passes", setup.passes, where)  # the report counts each plan's runs from it
        try:
            own = _own_profile(run)  # a paired validation's run is estimated from its own profile
        except ValueError as error:
            raise InputError.at("--runs", f"{where}: {error}") from error
        estimated.append(replace(run, estimate=_estimate(setup, run.plan, own or profile)))
    return estimated


def _require_same_count(record: dict[str, Any], name: str, flag_value: int, where: str) -> None:
    """InputError naming --steps or --passes if the run was made with another count (records from before a
    count was kept are taken at the flag's)."""
    if record.get(name, flag_value) != flag_value:
        raise InputError.at("--runs", f"{where} was made with {name} {record[name]}, not --{name} {flag_value}")


def _earlier_run(record: dict[str, Any]) -> PlanRun:
    return PlanRun(
        plan=ParallelPlan.model_validate(record["plan"]),
        estimate=record["estimate"],
        run_dir=str(record["run_dir"]),
        measured_s=record["measured_s"],
        step_times_s=list(record["step_times_s"]),
        measured_peak_bytes=record.get("measured_peak_bytes"),
        error=record.get("error"),
        profile_file=record.get("profile_file"),
        confirm_runs=record.get("confirm_runs", 0),
        crash=record.get("crash"),
    )


def _require_same_setup(trained: Any, setup: ValidationSetup, plan: ParallelPlan, where: str) -> None:
    """The request a run trained is the one this setup asks of its plan: same model, training and cluster."""
    asked = parse_estimate_request(setup.request(plan))
    for part in ("model", "training", "cluster"):
        if getattr(trained, part) != getattr(asked, part):
            raise InputError.at(
                "--runs",
                f"{where} ({describe(plan)}) trained another {part} than this validation's: "
                f"{getattr(trained, part).model_dump(exclude_defaults=True)}; give the flags it was run with",
            )


def _estimate(setup: ValidationSetup, plan: ParallelPlan, profile: HardwareProfile) -> dict[str, Any]:
    """The uncalibrated estimate of `plan` from `profile`, as JSON."""
    req = parse_estimate_request(setup.request(plan))
    measured = profile_costs(req.cluster, profile)
    return estimate_step(req.model, req.training, req.cluster, req.plan, measured=measured).model_dump(mode="json")


def measured_run_row(record: dict[str, Any], validation_id: str, job_id: str | None) -> MeasuredRunRow:
    """A measured run of runs.json as the database stores it, with its plan's request and estimate."""
    estimate, measured_s = record["estimate"], record["measured_s"]
    training = record["request"]["training"]
    return MeasuredRunRow(
        id=new_id(),
        created=utc_now(),
        job_id=job_id,
        validation_id=validation_id,
        plan_id=None,
        device=record["device"],
        steps=record["steps"],
        predicted_step_time_s=estimate["step_time_s"],
        measured_step_time_s=measured_s,
        measured_tokens_per_s=training["global_batch_size"] * training["seq_len"] / measured_s,
        predicted_peak_bytes=int(estimate["memory"]["peak_bytes"]),
        measured_peak_bytes=record["measured_peak_bytes"],
        request=json.dumps(record["request"]),
        estimate=json.dumps(estimate),
    )


# ---------------------------------------------------------------------------------------------- profile


# With one pass of runs, the profile is measured in three passes, each timing every layer shape alone, on tp ranks
# and on busy ranks (api/profiling.measure_node), pooled by their median: a shared machine's speed drifts over
# minutes, and passes spread that drift over every shape and phase instead of on whichever ran during a slow spell,
# and with three a slow pass is outvoted. With several passes of runs, one profile pass comes before each
# (`_profile_and_run`).
PROFILE_PASSES = 3


def measure_profile(
    setup: ValidationSetup,
    plans: list[ParallelPlan],
    console: Console,
    cancel: threading.Event,
    passes: int = PROFILE_PASSES,
    collectives: bool = True,
) -> HardwareProfile:
    """A profile of this machine for the plans: their layer shapes (alone, on tp ranks, and on all `nproc` ranks
    at once), in `passes` passes of all three, and, with `collectives`, the collectives of `nproc` ranks."""
    from api.profiling import CommLaunch, measure_node, merge, run_comm, sweep_for_ranks
    from profiler.collectives import sweep_command_args
    from profiler.compute import ComputeSweep

    needs = profile_needs(plans)
    sweep = ComputeSweep(
        model=setup.model,
        seq_lens=(setup.seq_len,),
        micro_batch_sizes=tuple(needs["micro_batch_sizes"]),
        tps=tuple(needs["tps"]),
        recompute_modes=tuple(needs["recompute_modes"]),
        dtype="fp32" if setup.device == "cpu" else "bf16",
        device=setup.device,
        threads=setup.threads if setup.device == "cpu" else None,
        sequence_parallel=tuple(needs["sequence_parallel"]),
        passes=passes,
    )
    sweep = sweep_for_ranks(sweep, setup.nproc)
    problems = sweep.violations()
    if problems:
        raise InputError("; ".join(f"{field}: {why}" for field, why in problems))
    compute = measure_node(sweep, setup.nproc, console, cancel)
    if setup.nproc < 2 or not collectives:
        return compute
    sweep_file = setup.out / "profile.sweep.json"
    comm = CommLaunch(setup.nproc, 1, sweep_command_args(sweep_file, max_bytes=largest_message_bytes(setup.model)))
    return merge(compute, run_comm(comm, sweep_file, console, cancel))


def largest_message_bytes(model: ModelSpec) -> int:
    """The collective sweep's largest message: the power of two that holds the model's fp32 gradients (the
    largest buffer a plan reduces), between 4 MiB (below it gloo's times are latency and noise that the fit
    cannot split) and 256 MiB. Larger messages only lengthen the sweep (a gloo sweep to 256 MiB takes minutes);
    the alpha-beta fit carries the bandwidth to any size."""
    gradient_bytes = 4 * model_params(model)
    return int(min(2**28, max(2**22, 2 ** math.ceil(math.log2(gradient_bytes)))))


# ------------------------------------------------------------------------------------------------- loop


@dataclass(frozen=True)
class Outputs:
    """Where a validation's results go: files in `setup.out`, and with `store` the database (measured runs, and
    the calibrated profile as a new stored profile). The measured runs reach the database once every run is done;
    a stopped validation keeps them in its runs.json, which `--runs` reads."""

    store: ApiStore | None
    validation_id: str
    job_id: str | None = None


def validate(
    setup: ValidationSetup,
    profile: HardwareProfile | None,
    outputs: Outputs,
    console: Console,
    cancel: threading.Event,
    earlier_runs: Path | None = None,
) -> tuple[Validation, str | None]:
    """The whole loop (module docstring); the validation and the stored id of its calibrated profile, if stored.
    With `earlier_runs` (an earlier validation's runs.json) and a profile, nothing is profiled or run: those runs
    are compared with the cost model's predictions as they are now (`read_runs`), and calibrated again."""
    if earlier_runs is not None:
        if profile is None:
            raise InputError.at("--profile", "comparing earlier runs needs the profile to predict them from")
        runs = read_runs(earlier_runs, setup, profile)
        setup.out.mkdir(parents=True, exist_ok=True)
        save_profile_json(profile, setup.out / PROFILE_FILE)
        console.print(f"comparing the {len(runs)} runs of {earlier_runs} with the cost model; results in {setup.out}")
    else:
        profile, runs = _profile_and_run(setup, profile, console, cancel)
    write_runs(setup.out / RUNS_FILE, runs, setup)
    if earlier_runs is None:
        store_measured_runs(outputs, runs, setup)
    result = compare(setup, profile, runs, utc_now())
    save_profile_json(result.calibrated, setup.out / CALIBRATED_PROFILE_FILE)
    stored = None
    if outputs.store is not None:
        name = f"calibrated by validation {outputs.validation_id}"
        stored = outputs.store.profiles.add(result.calibrated, name=name)
    return result, stored


def store_measured_runs(outputs: Outputs, runs: list[PlanRun], setup: ValidationSetup) -> None:
    """Every run that ran, as the database's measured runs of this validation (after the finalists' extra runs:
    each plan stored once, with all its steps)."""
    if outputs.store is None:
        return
    for run in runs:
        if run.measured_s is not None:
            row = measured_run_row(run_record(run, setup), outputs.validation_id, outputs.job_id)
            outputs.store.add_measured_run(row)


PROFILE_FILE, CALIBRATED_PROFILE_FILE, RUNS_FILE = "profile.json", "calibrated-profile.json", "runs.json"


def _profile_and_run(
    setup: ValidationSetup,
    profile: HardwareProfile | None,
    console: Console,
    cancel: threading.Event,
) -> tuple[HardwareProfile, list[PlanRun]]:
    """Steps 1-3 of the loop: the profile (measured unless given) and every valid plan's run. With several passes
    of runs, a profile pass is measured before each pass of runs and the profiles are pooled (profiler/pool.py),
    so that the profile samples the machine over the same stretch of time as the runs; each pass's runs are
    estimated from the pooled profile so far, and the last pass's from all of it."""
    plans = valid_plans(setup)
    if len(plans) < 2:
        raise InputError(f"the search space holds {len(plans)} plan(s) the executor can run; validating needs two")
    setup.out.mkdir(parents=True, exist_ok=True)
    console.print(f"validating {len(plans)} plans on {setup.nproc} {setup.device} rank(s); results in {setup.out}")
    if profile is None and setup.passes == 1:
        profile = measure_profile(setup, plans, console, cancel)
    if profile is not None:
        save_profile_json(profile, setup.out / PROFILE_FILE)  # before the runs: a stopped validation keeps it
        given = profile
        return profile, _run_with_progress(setup, plans, lambda attempt: given, console, cancel)
    measured: list[HardwareProfile] = []

    def profile_pass(attempt: int) -> HardwareProfile:
        measured.append(measure_profile(setup, plans, console, cancel, passes=1, collectives=attempt == 0))
        pooled_so_far = pool_profiles(measured)
        save_profile_json(pooled_so_far, setup.out / PROFILE_FILE)
        return pooled_so_far

    runs = _run_with_progress(setup, plans, profile_pass, console, cancel)
    return pool_profiles(measured), runs


def _run_with_progress(
    setup: ValidationSetup,
    plans: list[ParallelPlan],
    profile_for_pass: Callable[[int], HardwareProfile],
    console: Console,
    cancel: threading.Event,
) -> list[PlanRun]:
    progress = Progress(
        TextColumn("[bold]runs"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[what]}"),
        TimeElapsedColumn(), TimeRemainingColumn(), console=console,
    )  # fmt: skip
    with progress:
        task = progress.add_task("runs", total=len(plans) * setup.passes, what=describe(plans[0]))

        def on_attempt(attempt: Attempt) -> None:
            upcoming = describe(attempt.upcoming) if attempt.upcoming else "done"
            progress.update(task, completed=attempt.done, total=attempt.total, what=upcoming)
            # A stopped validation keeps what it measured, in the form `--runs` re-analyses.
            write_runs(setup.out / RUNS_FILE, attempt.so_far, setup)

        def paused(measure: Callable[[], HardwareProfile]) -> HardwareProfile:
            progress.stop()  # the profiler shows its own progress bars; one live display at a time
            try:
                return measure()
            finally:
                progress.start()

        def profile_for_run(plan: ParallelPlan, profile: HardwareProfile) -> HardwareProfile:
            own = paused(lambda: measure_profile(setup, [plan], console, cancel, passes=1, collectives=False))
            return overlay_profile(profile, own)

        return run_all(
            setup, plans, lambda attempt: paused(lambda: profile_for_pass(attempt)), cancel, on_attempt,
            profile_for_run if setup.paired else None,
        )  # fmt: skip


def describe(plan: ParallelPlan) -> str:
    """A plan in one short line, for progress bars and tables."""
    text = f"dp{plan.dp} tp{plan.tp} pp{plan.pp}"
    if plan.dp > 1:
        text += f" zero{plan.zero_stage}"
    text += f" mbs{plan.micro_batch_size} {plan.recompute}"
    if plan.sequence_parallel:
        text += " sp"
    if plan.pp > 1:
        text += f" {plan.schedule}" + (f" v{plan.virtual_stages}" if plan.virtual_stages > 1 else "")
    return text
