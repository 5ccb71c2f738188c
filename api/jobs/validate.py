"""Validation jobs: `POST /v1/validations` -> the `validate` command (api/commands/validate.py) run from its
options record by a job supervisor.

The body holds the command's options under their record's names (`warm_steps`), checked by the command's own
code before anything starts. A stored profile the body names is exported into the job's folder, so
the command never needs the server's database; when the command ends, the server stores what it measured: each
run (with its plan's request and estimate) as a measured run of the job, and the calibrated profile under the
job's id, which is then what `cluster.profile` takes.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from api.commands.inputs import model_spec
from api.commands.loop.records import CALIBRATED_PROFILE_FILE, RUNS_FILE, store_calibrated, store_runs
from api.commands.validate import FIGURES_FILE
from api.errors import InputError
from api.jobs.profile import check_tokens, last_error, renamed_error
from api.jobs.runner import Outcome
from api.jobs.supervise import OUTPUT_FILE, write_command
from api.jobs.train import check_process_count
from api.settings import Settings
from api.store import ApiStore, JobRow, utc_now
from planner.profiles import ProfileError, load_profile_json, save_profile_json
from planner.specs import Int, Text, ZeroStage

OUT_FOLDER = "validation"
INPUT_PROFILE = "input-profile.json"
STOP_GRACE_S = 5.0
"""How long a cancelled validation may take to stop before its supervisor kills every process it started. A
validation saves nothing on the way out (its runs keep no checkpoints, and runs.json is written after each run), so
a training job's grace (time to save a checkpoint, a minute) would only keep a cancelled one running."""


class ValidationJobBody(BaseModel):
    """`paraplan validate`'s options; all but `nproc` may be left to the command's defaults."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    nproc: Int = Field(ge=1, le=1024, description="ranks on the server's machine; every plan uses all of them")
    model: Text | dict[str, Any] | None = Field(None, description="a preset name or a ModelSpec")
    seq_len: Int | None = Field(None, ge=1, le=2**20)
    global_batch: Int | None = Field(None, ge=1, le=2**20)
    steps: Int | None = Field(None, ge=2, le=10_000, description="steps each plan trains")
    warm_steps: Int | None = Field(None, ge=0, le=10_000, description="first steps left out of the median")
    passes: Int | None = Field(None, ge=1, le=100, description="runs of every plan, in alternating order, pooled")
    confirm: Int | None = Field(
        None, ge=0, le=100, description="runs more of the plans predicted and measured fastest, pooled (0: none)"
    )
    max_plans: Int | None = Field(None, ge=2, le=10_000)
    zero: list[ZeroStage] | None = Field(None, min_length=1, max_length=4)
    mbs: list[Int] | None = Field(None, min_length=1, max_length=16)
    recompute: list[Literal["none", "selective", "full"]] | None = Field(None, min_length=1, max_length=3)
    schedule: list[Literal["gpipe", "1f1b", "interleaved_1f1b"]] | None = Field(None, min_length=1, max_length=3)
    techniques: list[Literal["cp", "fp16", "offload", "ep"]] | None = Field(
        None, max_length=4, description="technique entries added to the plans, each where the machine runs it"
    )
    device: Literal["cpu", "cuda"] | None = None
    gpu: Text | None = Field(None, min_length=1, max_length=64, description="GPU preset of the cuda device")
    threads: Int | None = Field(None, ge=1, le=1024)
    paired: bool | None = Field(
        None,
        description="profile each plan's layer shapes again just before its run and predict it from that "
        "profile (with passes 1)",
    )
    # Not empty: an empty id would read as "none given" and start the full validation, profiling included.
    profile: Text | None = Field(
        None, min_length=1, max_length=64, description="a stored profile id to use instead of measuring"
    )


def prepare_validation_job(body: dict[str, Any], job_id: str, settings: Settings, store: ApiStore) -> JobRow:
    """Check the job and write its folder; ValueError naming the body field at fault otherwise."""
    from api.commands import validate
    from api.commands.run import RECORD_FILE, argv, write_record

    job = ValidationJobBody.model_validate(body)
    job_dir = settings.jobs_dir / job_id
    given = job.model_dump(exclude_none=True, exclude={"profile"})
    if "model" in given:
        given["model"] = model_spec(given["model"])
    options = validate.ValidateOptions(out=job_dir / OUT_FOLDER, store=False, job_id=job_id, **given)
    check_process_count(job.nproc, settings, job.device or "cpu")
    # Without `mbs` the search tries every divisor of the per-replica batch: the whole global batch at most.
    largest_mbs, mbs_field = (max(options.mbs), "mbs") if options.mbs else (options.global_batch, "global_batch")
    check_tokens(options.seq_len, "seq_len", largest_mbs, mbs_field)
    try:
        validate.check(options)
    except ValueError as error:
        raise renamed_error(error, ValidationJobBody) from None
    profile = None if job.profile is None else _stored_profile(job.profile, store)
    job_dir.mkdir(parents=True)
    try:
        if profile is not None:
            options = options.model_copy(update={"profile": str(save_profile_json(profile, job_dir / INPUT_PROFILE))})
        write_command(job_dir, argv(write_record(job_dir / RECORD_FILE, "validate", options)), STOP_GRACE_S)
    except BaseException:
        shutil.rmtree(job_dir, ignore_errors=True)
        raise
    return JobRow(id=job_id, kind="validate", state="QUEUED", created=utc_now(), nproc=job.nproc)


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
        store_runs(self._store, records, validation_id=row.id, job_id=row.id)
        store_calibrated(self._store, calibrated, validation_id=row.id, profile_id=row.id)
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
