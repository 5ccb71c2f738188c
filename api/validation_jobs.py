"""Validation jobs: `POST /v1/validations` -> `paraplan validate` run by a job supervisor.

The body holds the command's options under their flag names (`warm_steps` for `--warm-steps`), checked by the
command's own code before anything starts. A stored profile the body names is exported into the job's folder, so
the command never needs the server's database; when the command ends, the server stores what it measured: each
run (with its plan's request and estimate) as a measured run of the job, and the calibrated profile under the
job's id, which is then what `cluster.profile` takes.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from api.errors import InputError
from api.jobs import Outcome
from api.profile_jobs import last_error, renamed_error
from api.settings import Settings
from api.store import ApiStore, JobRow, utc_now
from api.supervise import OUTPUT_FILE, write_command
from api.train_jobs import check_process_count
from api.validation import CALIBRATED_PROFILE_FILE, RUNS_FILE, measured_run_row
from planner.profiles import ProfileError, load_profile_json, save_profile_json

OUT_FOLDER = "validation"
INPUT_PROFILE = "input-profile.json"
FIGURES_FILE = "validation.json"


class ValidationJobBody(BaseModel):
    """`paraplan validate`'s options; all but `nproc` may be left to the command's defaults."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    nproc: int = Field(ge=1, le=1024, description="ranks on the server's machine; every plan uses all of them")
    model: str | dict[str, Any] | None = Field(None, description="a preset name or a ModelSpec")
    seq_len: int | None = Field(None, ge=1, le=2**20)
    global_batch: int | None = Field(None, ge=1, le=2**20)
    steps: int | None = Field(None, ge=2, le=10_000, description="steps each plan trains")
    warm_steps: int | None = Field(None, ge=0, le=10_000, description="first steps left out of the median")
    passes: int | None = Field(None, ge=1, le=100, description="runs of every plan, in alternating order, pooled")
    confirm: int | None = Field(
        None, ge=0, le=100, description="runs more of the plans predicted and measured fastest, pooled (0: none)"
    )
    max_plans: int | None = Field(None, ge=2, le=10_000)
    zero: list[Literal[0, 1, 2, 3]] | None = Field(None, min_length=1, max_length=4)
    mbs: list[int] | None = Field(None, min_length=1, max_length=16)
    recompute: list[Literal["none", "selective", "full"]] | None = Field(None, min_length=1, max_length=3)
    schedule: list[Literal["gpipe", "1f1b", "interleaved_1f1b"]] | None = Field(None, min_length=1, max_length=3)
    device: Literal["cpu", "cuda"] | None = None
    gpu: str | None = Field(None, max_length=64, description="GPU preset of the cuda device")
    threads: int | None = Field(None, ge=1, le=1024)
    paired: bool | None = Field(
        None, description="profile each plan's layer shapes again just before its run and predict it from that "
        "profile (with passes 1)",
    )
    profile: str | None = Field(None, max_length=64, description="a stored profile id to use instead of measuring")


def prepare_validation_job(body: dict[str, Any], job_id: str, settings: Settings, store: ApiStore) -> JobRow:
    """Check the job and write its folder; ValueError naming the body field at fault otherwise."""
    from api.cli import flag_name

    job = ValidationJobBody.model_validate(body)
    options = _command_options(job)
    check_process_count(job.nproc, settings, job.device or "cpu")
    _check_with_the_command(options)
    profile = _stored_profile(job.profile, store) if job.profile else None
    job_dir = settings.jobs_dir / job_id
    job_dir.mkdir(parents=True)
    try:
        flags = [token for name, value in options.items() for token in _flag_tokens(flag_name(name), value)]
        argv = [sys.executable, "-m", "api.cli", "validate", "--out", str(job_dir / OUT_FOLDER), "--no-store",
                "--json", *flags]  # fmt: skip
        if profile is not None:
            argv += ["--profile", str(save_profile_json(profile, job_dir / INPUT_PROFILE))]
        write_command(job_dir, argv, settings.job_grace_s)
    except BaseException:
        shutil.rmtree(job_dir, ignore_errors=True)
        raise
    return JobRow(id=job_id, kind="validate", state="QUEUED", created=utc_now(), nproc=job.nproc)


def _command_options(job: ValidationJobBody) -> dict[str, Any]:
    """The body's options as the command's flags take them: lists comma-separated, the model as inline JSON."""
    given = job.model_dump(exclude_none=True, exclude={"profile"})
    if "model" in given:
        given["model"] = json.dumps(_model_spec(given["model"]).model_dump(mode="json"))
    return {name: ",".join(map(str, v)) if isinstance(v, list) else v for name, v in given.items()}


def _flag_tokens(flag: str, value: Any) -> list[str]:
    """A flag with its value; a bool option is a switch: the bare flag when true, nothing when false."""
    if isinstance(value, bool):
        return [flag] if value else []
    return [flag, str(value)]


def _model_spec(value: str | dict[str, Any]) -> Any:
    """A preset name or a ModelSpec (with a preset's overrides) -> the full ModelSpec; never a file."""
    from pydantic import ValidationError

    from planner.request import resolve_model
    from planner.specs import ModelSpec

    try:
        return ModelSpec.model_validate(resolve_model(value))
    except ValidationError as error:
        problem = error.errors()[0]
        where = ".".join(["model", *map(str, problem["loc"])])
        raise InputError.at(where, problem["msg"]) from None


def _check_with_the_command(options: dict[str, Any]) -> None:
    """The command's own checks of its flags (no torch), and a search space with two runnable plans."""
    import inspect

    from api import cli
    from api.validation import valid_plans

    parameters = inspect.signature(cli.validation_setup).parameters
    defaults = {name: p.default for name, p in inspect.signature(cli.validate).parameters.items()}
    values = {name: options.get(name, defaults.get(name)) for name in parameters}
    try:
        setup = cli.validation_setup(**(values | {"out": Path("validation")}))
        plans = valid_plans(setup)
    except ValueError as error:
        raise renamed_error(error, ValidationJobBody) from None
    if len(plans) < 2:
        raise InputError(f"the search space holds {len(plans)} plan(s) the executor can run; validating needs two")


def _stored_profile(profile_id: str, store: ApiStore) -> Any:
    try:
        return store.profiles.get(profile_id)
    except ProfileError:
        raise InputError.at("profile", f"no stored profile with id {profile_id!r}") from None


class ValidationJobs:
    """The validation kind of job: store its measured runs and its calibrated profile (under the job's id)."""

    def __init__(self, store: ApiStore):
        self._store = store

    def outcome(self, row: JobRow, job_dir: Path, returncode: int) -> Outcome:
        if returncode != 0:
            return Outcome("FAILED", last_error(job_dir / OUTPUT_FILE, returncode, command="paraplan validate"))
        out = job_dir / OUT_FOLDER
        try:
            records = json.loads((out / RUNS_FILE).read_text())
            calibrated = load_profile_json(out / CALIBRATED_PROFILE_FILE)
        except (OSError, ValueError) as error:
            return Outcome("FAILED", f"paraplan validate exited cleanly but its results cannot be read: {error}")
        for record in records:
            if record["measured_s"] is not None:
                self._store.add_measured_run(measured_run_row(record, validation_id=row.id, job_id=row.id))
        self._store.profiles.add(calibrated, name=f"calibrated by validation {row.id}", profile_id=row.id)
        return Outcome("SUCCEEDED", updates={"profile_id": row.id})


def validation_details(row: JobRow, job_dir: Path) -> dict[str, Any]:
    """Progress (plans run so far) and, once done, the figures of a validation job."""
    out = job_dir / OUT_FOLDER
    runs = out / "runs"
    figures = out / FIGURES_FILE
    return {
        "runs_started": sum(1 for _ in runs.iterdir()) if runs.is_dir() else 0,
        "figures": json.loads(figures.read_text()) if figures.is_file() else None,
        "calibrated_profile_id": row.profile_id,
    }
