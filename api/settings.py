"""How a paraplan server is configured: a data folder, a database, a token, limits. From the environment by
default (`Settings.from_env`), so `paraplan serve` needs no flags on a fresh machine.

pydantic-settings reads the PARAPLAN_* variables (each field's name under the prefix, except where `_ENV` below says
otherwise) and checks them with the field's constraints; `Settings` turns its validation error into a SettingsError
that names the variable, the reason and the value given."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any

from pydantic import Field, ValidationError, ValidationInfo, field_validator
from pydantic_core import ErrorDetails
from pydantic_settings import BaseSettings, SettingsConfigDict

from api.errors import InputError
from api.store import Retention
from profiler.store import DATABASE_FILE_NAME, default_data_dir

ENV_PREFIX = "PARAPLAN_"
API_TOKEN_ENV = "PARAPLAN_API_TOKEN"
MAX_JOBS_ENV = "PARAPLAN_MAX_JOBS"
MAX_REQUEST_BYTES_ENV = "PARAPLAN_MAX_REQUEST_BYTES"
MAX_JOB_PROCESSES_ENV = "PARAPLAN_MAX_JOB_PROCESSES"
MAX_STORED_PLANS_ENV = "PARAPLAN_MAX_STORED_PLANS"
SEARCH_WORKERS_ENV = "PARAPLAN_SEARCH_WORKERS"
MAX_STORED_PLAN_BYTES_ENV = "PARAPLAN_MAX_STORED_PLAN_BYTES"
MAX_VALIDATION_S_ENV = "PARAPLAN_MAX_VALIDATION_S"
JOB_GRACE_S_ENV = "PARAPLAN_JOB_GRACE_S"
SLURM_PARTITION_ENV = "PARAPLAN_SLURM_PARTITION"
SLURM_TIME_LIMIT_ENV = "PARAPLAN_SLURM_TIME_LIMIT"

DEFAULT_MAX_REQUEST_BYTES = 1 << 20
"""1 MiB: a full request with an inline model is a few KiB; a larger body is a mistake or an attack."""
MIN_MAX_REQUEST_BYTES = 1024
"""A smaller body limit would refuse the smallest real request (a preset name, a GPU and a batch)."""
DEFAULT_MAX_STORED_PLANS = 1000
DEFAULT_MAX_STORED_PLAN_BYTES = 256 << 20
"""256 MiB: 1000 searches of typical size (tens of KB) fit several times over; 1000 at the request size limit
(1 MiB each, and an answer of up to 100 ranked plans) would not."""
DEFAULT_MAX_VALIDATION_S = 24 * 3600.0
"""A day: a full CPU validation (90 plans, several passes, their profiles) takes hours on a small machine; one that
runs past a day is stuck (a hung collective that torchrun's own timeout did not end) or asked far too much."""
DEFAULT_JOB_GRACE_S = 60.0
"""A minute: a training job saves its checkpoint in seconds on a local disk; a slower one is told to stop anyway."""

_ENV = {"max_concurrent_jobs": MAX_JOBS_ENV}
"""Fields read from a variable that is not the field's name under ENV_PREFIX (the name users already set)."""

PositiveSeconds = Annotated[float, Field(gt=0, allow_inf_nan=False)]

DEFAULT_SLURM_TIME_LIMIT = "1-00:00:00"
"""A day, in Slurm's --time format (days-hours:minutes:seconds): what a Slurm job asks for unless the server is told
otherwise. Slurm ends a job past it (state TIMEOUT); a partition may allow less."""


class SettingsError(InputError):
    """A setting that cannot work; names the environment variable or flag."""


def default_max_job_processes() -> int:
    """One process per core, and at least 8 (a one-node GPU job)."""
    return max(8, os.cpu_count() or 1)


def default_search_workers() -> int:
    """One search worker per core this process may run on: a search is CPU-bound and single-threaded."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


class Settings(BaseSettings):
    """Everything a server instance needs to know; ``create_app(settings)`` builds a server from it.

    What is not passed is read from its PARAPLAN_* variable (an empty one counts as unset), else its default.
    ``api_token`` None means the endpoints that start processes (profiles, jobs) are disabled, not open.
    """

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, env_ignore_empty=True, frozen=True, extra="forbid", validate_default=True,
        validate_by_name=True, validate_by_alias=True,
    )  # fmt: skip

    data_dir: Path = Field(default_factory=default_data_dir)
    database_url: str = ""
    """A SQLAlchemy URL; empty: the SQLite file paraplan.db in the data folder."""
    api_token: str | None = None
    max_concurrent_jobs: int = Field(1, ge=1, validation_alias=MAX_JOBS_ENV)
    max_request_bytes: int = Field(DEFAULT_MAX_REQUEST_BYTES, ge=MIN_MAX_REQUEST_BYTES)
    max_job_processes: int = Field(default_factory=default_max_job_processes, ge=1)
    """Processes one job may start: a request for a 512-GPU plan must not fork 512 ranks on this machine."""
    max_stored_plans: int = Field(DEFAULT_MAX_STORED_PLANS, ge=1)
    """Plan searches kept (the newest; a search a job runs is kept too): POST /v1/plans needs no token, and each
    search stores its request (up to max_request_bytes) and its answer, so without a bound anyone could fill the
    disk. 1000 searches of typical size (tens of KB) are tens of MB."""
    search_workers: int = Field(default_factory=default_search_workers, ge=0)
    """Worker processes that run plan searches side by side (api/search_pool.py); 0 runs them in the server's own
    process, one at a time."""
    max_stored_plan_bytes: int = Field(DEFAULT_MAX_STORED_PLAN_BYTES, ge=1)
    """Bytes the kept plan searches may take (their requests and answers as stored), the oldest deleted first: the
    count alone bounds the disk only at 1000 times the largest search."""
    max_validation_s: PositiveSeconds = DEFAULT_MAX_VALIDATION_S
    """Wall time a validation job may run (from its start); past it the job is stopped and marked FAILED, naming
    this bound."""
    job_grace_s: PositiveSeconds = DEFAULT_JOB_GRACE_S
    """How long a cancelled job may take to save a checkpoint and stop before every rank is killed."""
    slurm_partition: str | None = None
    """The partition Slurm jobs are submitted to (None: the cluster's default partition)."""
    slurm_time_limit: str = DEFAULT_SLURM_TIME_LIMIT
    """The wall time a Slurm job asks for (sbatch --time)."""

    def __init__(self, **values: Any) -> None:
        try:
            super().__init__(**values)
        except ValidationError as error:
            raise _settings_error(error) from None

    @classmethod
    def from_env(cls, **overrides: Any) -> Settings:
        """Settings from PARAPLAN_* variables, then ``overrides`` (what the command line was given, None for
        "not given"). The database follows the data folder unless PARAPLAN_DATABASE_URL names one."""
        return cls(**{name: value for name, value in overrides.items() if value is not None})

    @field_validator("data_dir")
    @classmethod
    def _absolute(cls, data_dir: Path) -> Path:
        return data_dir.expanduser().resolve()

    @field_validator("database_url")
    @classmethod
    def _in_the_data_dir_by_default(cls, url: str, info: ValidationInfo) -> str:
        if url or "data_dir" not in info.data:  # no data folder: its own error is reported
            return url
        return f"sqlite:///{info.data['data_dir'] / DATABASE_FILE_NAME}"

    @field_validator("api_token")
    @classmethod
    def _usable_token(cls, token: str | None) -> str | None:
        if token is not None:
            _check_token(token)
        return token

    @field_validator("slurm_partition", "slurm_time_limit")
    @classmethod
    def _one_word(cls, value: str | None) -> str | None:
        # A batch script's #SBATCH line ends at a blank, so a value with one would be cut short there.
        if value is not None and (not value or any(ch.isspace() for ch in value)):
            raise ValueError(f"must be one word (a batch script's #SBATCH line ends at a blank), got {value!r}")
        return value

    @property
    def plan_retention(self) -> Retention:
        return Retention(searches=self.max_stored_plans, stored_bytes=self.max_stored_plan_bytes)

    @property
    def jobs_dir(self) -> Path:
        """Each job's files live in ``jobs_dir/<id>``."""
        return self.data_dir / "jobs"

    @property
    def datasets_dir(self) -> Path:
        """Text files a training job may name as its ``data`` (by file name only)."""
        return self.data_dir / "datasets"


def env_name(field: str) -> str:
    """The environment variable that sets `field` (a name of Settings, or already a variable's)."""
    if field.startswith(ENV_PREFIX):
        return field
    return _ENV.get(field, f"{ENV_PREFIX}{field.upper()}")


def _settings_error(error: ValidationError) -> SettingsError:
    """One SettingsError for all the settings pydantic refused, each named by its variable."""
    problems = [(env_name(str(detail["loc"][0]) if detail["loc"] else "settings"), _reason(detail))
                for detail in error.errors(include_url=False)]  # fmt: skip
    return SettingsError("; ".join(f"{variable}: {reason}" for variable, reason in problems))


def _reason(detail: ErrorDetails) -> str:
    """Why a value was refused: a check's own message, or pydantic's with the value given (never for a value
    error: the token's checks must not print the token)."""
    if detail["type"] == "value_error":
        return str(detail.get("ctx", {}).get("error", detail["msg"]))
    return f"{detail['msg'].removeprefix('Input ')}, got {detail['input']!r}"


def _check_token(token: str) -> None:
    """A token a client can send: not blank, no whitespace at its ends (the server strips what a client sends, so
    a token of 16 spaces would start the server "token: on" with nobody able to authenticate), not guessable."""
    if not token.strip():
        raise ValueError(
            "is blank (only whitespace); set a token of at least 16 characters, or leave it unset "
            "to disable the endpoints that start processes"
        )
    if token != token.strip():
        raise ValueError("has whitespace at its start or end, which no client can send; remove it")
    if len(token) < 16:
        raise ValueError("use a token of at least 16 characters (a guessable one is open)")
