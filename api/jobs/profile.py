"""Profiling jobs: `POST /v1/profiles` -> the `profile compute|comm|all` command (api/commands/profile.py) run
from its options record by a job supervisor; the profile it writes is stored under the job's id, so the id a
client got back is what `cluster.profile` takes.

The body holds the command's options under their record's names (`seq_len`). They are checked by the same code
the command runs, before anything starts; the model is resolved here (a preset or a ModelSpec), so a request can
never make the command read a file.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from api.commands.flags import error_payload, flag_name
from api.commands.inputs import model_spec
from api.errors import InputError
from api.jobs.runner import Outcome
from api.jobs.supervise import OUTPUT_FILE, write_command
from api.jobs.train import check_process_count
from api.settings import Settings
from api.store import ApiStore, JobRow, utc_now
from planner.profiles import load_profile_json
from planner.specs import Int, Text

PROFILE_FILE = "profile.json"
# Tokens in one micro-batch (seq_len x mbs) a profiling or validation job may ask for: a layer's activations grow
# with them, and a job asking for 10^12 would be accepted and then fail allocating terabytes. 2^20 is 8x the
# longest context trained (Llama 3.1's 128K) at mbs 1, and far above what one GPU holds at any model width.
MAX_JOB_TOKENS = 2**20
Recompute = Literal["none", "selective", "full"]


class ProfileJobBody(BaseModel):
    """What to measure: `what` picks the command; the other fields are its flags."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    what: Literal["compute", "comm", "all"] = "all"
    name: Text | None = Field(None, max_length=255, description="a label for the stored profile")
    model: Text | dict[str, Any] | None = Field(None, description="a preset name or a ModelSpec (compute, all)")
    seq_len: list[Int] | None = Field(
        None, min_length=1, max_length=16, description=f"seq_len x mbs at most {MAX_JOB_TOKENS} tokens"
    )
    mbs: list[Int] | None = Field(
        None, min_length=1, max_length=16, description=f"seq_len x mbs at most {MAX_JOB_TOKENS} tokens"
    )
    tp: list[Int] | None = Field(None, min_length=1, max_length=8)
    recompute: list[Recompute] | None = Field(None, min_length=1, max_length=3)
    device: Literal["cpu", "cuda"] | None = None
    dtype: Literal["fp32", "bf16", "fp16"] | None = None
    optimizer: Literal["adamw", "sgd"] | None = None
    warmup: Int | None = Field(None, ge=0, le=1000)
    repeats: Int | None = Field(None, ge=1, le=10_000)
    threads: Int | None = Field(None, ge=1, le=1024)
    passes: Int | None = Field(None, ge=1, le=100)
    nproc: Int | None = Field(None, ge=2, description="processes of the collective sweep (comm, all)")
    min_bytes: Int | None = Field(None, ge=1, le=2**34)
    max_bytes: Int | None = Field(None, ge=1, le=2**34)
    ops: list[Text] | None = Field(None, min_length=1, max_length=8)
    backend: Literal["gloo", "nccl"] | None = None


_COMPUTE = ("model", "seq_len", "mbs", "tp", "recompute", "device", "dtype", "optimizer", "warmup", "repeats",
            "threads", "passes")  # fmt: skip
# The body fields each kind of profile takes (the others are refused, naming the field).
FIELDS = {
    "compute": frozenset(_COMPUTE),
    "comm": frozenset({"nproc", "min_bytes", "max_bytes", "ops", "warmup", "repeats", "backend"}),
    "all": frozenset({*_COMPUTE, "nproc", "max_bytes"}),
}
REQUIRED = {"compute": ("model", "seq_len"), "comm": (), "all": ("model", "seq_len")}


def prepare_profile_job(body: dict[str, Any], job_id: str, settings: Settings) -> JobRow:
    """Check the job and write its folder; ValueError naming the body field at fault otherwise."""
    from api.commands import profile
    from api.commands.run import RECORD_FILE, argv, write_record

    job = ProfileJobBody.model_validate(body)
    job_dir = settings.jobs_dir / job_id
    options = _options(job, job_dir / PROFILE_FILE)
    if job.what != "comm":
        check_tokens(max(options.seq_len), "seq_len", max(options.mbs), "mbs")
    try:
        profile.check(options)
    except ValueError as error:
        raise renamed_error(error, ProfileJobBody) from None
    processes = 1 if job.what == "compute" else (job.nproc or 2)
    needs_gpus = job.device == "cuda" or job.backend == "nccl"
    check_process_count(processes, settings, "cuda" if needs_gpus else "cpu")
    job_dir.mkdir(parents=True)
    try:
        write_command(job_dir, argv(write_record(job_dir / RECORD_FILE, f"profile {job.what}", options)),
                      settings.job_grace_s)  # fmt: skip
    except BaseException:
        shutil.rmtree(job_dir, ignore_errors=True)
        raise
    return JobRow(id=job_id, kind="profile", state="QUEUED", created=utc_now(), nproc=processes)


def _options(job: ProfileJobBody, out: Path) -> Any:
    """The command's options record: the body's fields (after checking they belong to `what`) over the record's
    defaults; written to `out`, not stored (the server stores it when the job ends)."""
    from api.commands.profile import OPTIONS

    given = job.model_dump(exclude_none=True, exclude={"what", "name"})
    for field in sorted(set(given) - FIELDS[job.what]):
        raise InputError.at(field, f"not an option of a {job.what!r} profile (those are: {_names(job.what)})")
    for field in REQUIRED[job.what]:
        if field not in given:
            raise InputError.at(field, f"required for a {job.what!r} profile")
    if "model" in given:
        given["model"] = model_spec(given["model"])
    return OPTIONS[job.what](out=out, store=False, **given)


def check_tokens(seq_len: int, seq_field: str, mbs: int, mbs_field: str) -> None:
    """InputError when one micro-batch of `seq_len` x `mbs` tokens is over MAX_JOB_TOKENS, naming the body
    field of whichever is over alone (both when only their product is)."""
    if seq_len * mbs <= MAX_JOB_TOKENS:
        return
    over = [name for name, value in ((seq_field, seq_len), (mbs_field, mbs)) if value > MAX_JOB_TOKENS]
    message = (
        f"{seq_field} {seq_len} x {mbs_field} {mbs} = {seq_len * mbs} tokens in one micro-batch, over the "
        f"{MAX_JOB_TOKENS} a job may ask for (a layer's activations grow with them; this would fail allocating "
        "after the job was accepted)"
    )
    fields = [{"field": name, "message": message} for name in over or (seq_field, mbs_field)]
    raise InputError(message, fields=fields)


def _names(what: str) -> str:
    return ", ".join(sorted(FIELDS[what]))


def _field(flag: str) -> str:
    return flag.removeprefix("--").replace("-", "_")


def renamed_error(error: ValueError, body: type[BaseModel]) -> ValueError:
    """A command's refusal, naming the fields of the job's `body` instead of the command's flags."""

    def unflagged(text: str) -> str:
        for flag in sorted({flag_name(name) for name in body.model_fields}, key=len, reverse=True):
            text = text.replace(flag, _field(flag))
        return text

    fields = [{"field": _field(f["field"]) if f["field"].startswith("--") else f["field"],
               "message": unflagged(f["message"])} for f in error_payload(error).get("fields", [])]  # fmt: skip
    text = unflagged(str(error))
    return InputError(text, fields=fields or [{"field": "(request)", "message": text}])


class ProfileJobs:
    """The profiling kind of job: store the profile it wrote under the job's id."""

    def __init__(self, store: ApiStore):
        self._store = store

    def outcome(self, row: JobRow, job_dir: Path, returncode: int) -> Outcome:
        if returncode != 0:
            return Outcome("FAILED", last_error(job_dir / OUTPUT_FILE, returncode))
        try:
            profile = load_profile_json(job_dir / PROFILE_FILE)
        except ValueError as error:
            return Outcome("FAILED", f"the profiler exited cleanly but its profile cannot be read: {error}")
        name = json.loads(row.body).get("name")
        self._store.profiles.add(profile, name=name, profile_id=row.id)
        return Outcome("SUCCEEDED", updates={"profile_id": row.id})


def last_error(output: Path, returncode: int, lines: int = 8, command: str = "the profiler") -> str:
    """The end of a failed command's output: where its error message is."""
    try:
        tail = [line for line in output.read_text(errors="replace").splitlines() if line.strip()][-lines:]
    except OSError:
        tail = []
    return "\n".join([f"{command} exited with {returncode}", *tail])
