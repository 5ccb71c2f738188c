"""Training jobs: `POST /v1/jobs` -> a checked run in the job's folder, run under torchrun by its supervisor;
when it ends, its measured step time is stored next to the step time the cost model predicted.

The body is the contract's request with `plan` (or `plan_id` of a stored plan search, whose `plan_rank`-th plan
is run) plus the run's own fields (`TrainJobOptions`). Nothing a request names is executed or read outside the
data folder: `data` is the name of a text in `<data dir>/datasets/` or a text shipped with paraplan.

`launcher` says where it runs: `local`, on this server's host under a supervisor; or `slurm`, as a Slurm batch job
over `nodes` nodes (api/jobs/slurm.py), `nproc` processes split evenly over them.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from api.commands.train import Summary, TrainOptions, failure_text, local_spec, prepare
from api.errors import InputError
from api.jobs import slurm
from api.jobs.runner import Outcome
from api.jobs.supervise import OUTPUT_FILE, write_command
from api.service import parse_estimate, stored_plan_request
from api.settings import Settings
from api.store import LOCAL, SLURM, ApiStore, JobRow, MeasuredRunRow, new_id, utc_now
from executor import launch
from executor.config import RunDir
from executor.data import SHIPPED_TEXT
from planner.specs import Int, Real, Text

RUN_FOLDER = "run"


class TrainJobOptions(BaseModel):
    """A training job's own fields, beside the contract request."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    steps: Int = Field(ge=1, le=10_000_000, description="optimizer steps to run")
    nproc: Int | None = Field(None, ge=1, description="processes (over all nodes); default: the plan's GPU count")
    launcher: Literal["local", "slurm"] = Field(
        LOCAL, description="local: on this server's host; slurm: a Slurm batch job (sbatch, srun, torchrun per node)"
    )
    nodes: Int = Field(1, ge=1, le=100_000, description="nodes to run on (more than 1 takes launcher slurm)")
    data: Text | None = Field(
        None, max_length=255, description="a text file in <data dir>/datasets (by name), or 'founding' (shipped)"
    )
    checkpoint_every: Int = Field(0, ge=0, description="save every N steps; 0: at the end and when cancelled")
    lr: Real = Field(3e-4, gt=0, le=10)
    warmup_steps: Int | None = Field(None, ge=0)
    seed: Int = Field(0, ge=0, le=2**63 - 1)
    device: Literal["cpu", "cuda"] = "cpu"
    plan_id: Text | None = Field(None, max_length=32, description="run a plan of this stored search")
    plan_rank: Int = Field(1, ge=1, description="with plan_id: which of its ranked plans (1 = the best)")


OPTION_FIELDS = frozenset(TrainJobOptions.model_fields)
REQUEST_FIELDS = ("model", "training", "cluster", "plan")


def split_body(body: dict[str, Any]) -> tuple[TrainJobOptions, dict[str, Any]]:
    """The job's options, and the rest of the body: the contract request."""
    options = TrainJobOptions.model_validate({key: value for key, value in body.items() if key in OPTION_FIELDS})
    return options, {key: value for key, value in body.items() if key not in OPTION_FIELDS}


def request_of(options: TrainJobOptions, request: dict[str, Any], store: ApiStore) -> dict[str, Any]:
    """The request to run: as given, or the stored search's plan when `plan_id` names one."""
    if options.plan_id is None:
        return request
    given = [key for key in REQUEST_FIELDS if key in request]
    if given:
        raise InputError.at("plan_id", f"give either plan_id or {', '.join(given)}, not both")
    return stored_plan_request(store, options.plan_id, options.plan_rank)


def dataset_path(name: str | None, settings: Settings) -> Path | None:
    """The text file `data` names: a plain file name in the datasets folder (no path, so nothing outside it), or
    a text shipped with paraplan."""
    if name is None:
        return None
    if name == SHIPPED_TEXT.stem:
        return SHIPPED_TEXT
    folder = settings.datasets_dir.resolve()
    candidate = (folder / name).resolve()
    if Path(name).name != name or name.startswith(".") or candidate.parent != folder or not candidate.is_file():
        known = sorted(p.name for p in folder.glob("*") if p.is_file()) if folder.is_dir() else []
        raise InputError.at(
            "data",
            f"no dataset named {name!r}; give the name of a file in {folder} ({', '.join(known) or 'none there'}) "
            f"or {SHIPPED_TEXT.stem!r}",
        )
    return candidate


def check_launcher(options: TrainJobOptions) -> None:
    """A job over several nodes needs Slurm, and Slurm needs its commands on this server's PATH."""
    if options.nodes > 1 and options.launcher == LOCAL:
        raise InputError.at("nodes", f"{options.nodes} nodes need launcher 'slurm'; a local job runs on this "
                                     "server's host only")  # fmt: skip
    if options.launcher == SLURM and (missing := slurm.missing_reason()) is not None:
        raise InputError.at("launcher", missing)


def processes_per_node(nproc: int, nodes: int) -> int:
    """Each node runs as many processes (one torchrun per node, with --nproc-per-node)."""
    if nproc % nodes:
        raise InputError.at("nodes", f"{nproc} processes do not split evenly over {nodes} nodes")
    return nproc // nodes


def check_process_count(nproc: int, settings: Settings, device: str = "cpu") -> None:
    """A job may not start more processes than the server allows, nor more CUDA ranks than it has GPUs."""
    gpus = launch.visible_gpu_count()
    if device == "cuda" and nproc > gpus:
        raise InputError.at("device", f"cuda with {nproc} process(es), but this server sees {gpus} GPU(s)")
    if nproc > settings.max_job_processes:
        raise InputError.at(
            "nproc",
            f"{nproc} processes exceed this server's limit of {settings.max_job_processes} per job "
            "(PARAPLAN_MAX_JOB_PROCESSES)",
        )


def prepare_train_job(body: dict[str, Any], job_id: str, store: ApiStore, settings: Settings) -> JobRow:
    """Check the job and write its folder (run.json, the supervisor's command); ValueError naming the field
    at fault otherwise, with nothing left behind."""
    import planner

    options, request = split_body(body)
    check_launcher(options)
    parsed = parse_estimate(request_of(options, request, store), store)
    nproc = options.nproc or parsed.plan.num_gpus
    if options.launcher == LOCAL:  # a Slurm job's processes run on the cluster's nodes, within what Slurm grants
        check_process_count(nproc, settings, options.device)
    per_node = processes_per_node(nproc, options.nodes)
    job_dir = settings.jobs_dir / job_id
    run_options = TrainOptions(
        steps=options.steps, out=job_dir / RUN_FOLDER, nproc=nproc, data=dataset_path(options.data, settings),
        checkpoint_every=options.checkpoint_every, lr=options.lr, warmup_steps=options.warmup_steps,
        seed=options.seed, device=options.device,
    )  # fmt: skip
    run_options.config()  # its refusals (a warm-up beyond the steps, ...) before anything is written
    job_dir.mkdir(parents=True)
    try:
        run = prepare(parsed, run_options)
        predicted = planner.estimate(run.request)
        spec = replace(local_spec(RunDir(job_dir / RUN_FOLDER), per_node, resume=False), nnodes=options.nodes)
        if options.launcher == SLURM:
            slurm.write_script(job_dir, spec, settings.slurm_partition, settings.slurm_time_limit,
                               cpu_only=options.device == "cpu")  # fmt: skip
        else:
            write_command(job_dir, launch.watched_torchrun_command(spec), settings.job_grace_s, job_dir / RUN_FOLDER)
    except BaseException:
        shutil.rmtree(job_dir, ignore_errors=True)
        raise
    return JobRow(
        id=job_id, kind="train", state="QUEUED", created=utc_now(), nproc=nproc, plan_id=options.plan_id,
        estimate=predicted.model_dump_json(), launcher=options.launcher, nodes=options.nodes,
    )  # fmt: skip


class TrainJobs:
    """The training kind of job: what its files say when it ends."""

    def __init__(self, store: ApiStore):
        self._store = store

    def outcome(self, row: JobRow, job_dir: Path, returncode: int) -> Outcome:
        if returncode != 0:
            return Outcome("FAILED", self._failure(row, job_dir, returncode))
        self._store.add_measured_run(measured_run(row, RunDir(job_dir / RUN_FOLDER)))
        return Outcome("SUCCEEDED")

    @staticmethod
    def _failure(row: JobRow, job_dir: Path, returncode: int) -> str:
        spec = local_spec(RunDir(job_dir / RUN_FOLDER), row.nproc, resume=False)
        with (job_dir / OUTPUT_FILE).open(encoding="utf-8", errors="replace") as output:
            return failure_text(launch.result_from_output(spec, output, returncode))


def measured_run(row: JobRow, run_dir: RunDir) -> MeasuredRunRow:
    """What a finished run measured (median of its steady steps), next to its prediction."""
    summary = Summary.of(run_dir.read_metrics())
    run = run_dir.read_run()
    estimate = json.loads(row.estimate) if row.estimate else None
    return MeasuredRunRow(
        id=new_id(),
        created=utc_now(),
        job_id=row.id,
        plan_id=row.plan_id,
        device=run.config.device,
        steps=summary.steps,
        predicted_step_time_s=estimate["step_time_s"] if estimate else None,
        measured_step_time_s=summary.median_step_time_s,
        measured_tokens_per_s=summary.median_tokens_per_s,
        predicted_peak_bytes=int(estimate["memory"]["peak_bytes"]) if estimate else None,
        measured_peak_bytes=summary.peak_memory_bytes,
        request=run.request.model_dump_json(),
        estimate=row.estimate,
    )


def train_job_view(row: JobRow, job_dir: Path) -> dict[str, Any]:
    """Progress of a training job: steps done and its latest metrics; when it has ended, its summary."""
    run_dir = RunDir(job_dir / RUN_FOLDER)
    records = run_dir.read_metrics() if run_dir.root.is_dir() else []
    total = run_dir.read_run().config.steps if run_dir.run_file.is_file() else None
    return {"steps": total, "steps_done": records[-1]["step"] if records else 0,
            "latest_metrics": records[-1] if records else None, "summary": vars(Summary.of(records))}  # fmt: skip
