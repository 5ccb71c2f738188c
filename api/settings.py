"""How a paraplan server is configured: a data folder, a database, a token, limits. From the environment by
default (`Settings.from_env`), so `paraplan serve` needs no flags on a fresh machine."""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar

from api.errors import InputError
from api.store import Retention
from profiler.store import DATABASE_FILE_NAME, DATABASE_URL_ENV, default_data_dir

T = TypeVar("T", int, float)

API_TOKEN_ENV = "PARAPLAN_API_TOKEN"
MAX_JOBS_ENV = "PARAPLAN_MAX_JOBS"
MAX_REQUEST_BYTES_ENV = "PARAPLAN_MAX_REQUEST_BYTES"
MAX_JOB_PROCESSES_ENV = "PARAPLAN_MAX_JOB_PROCESSES"
MAX_STORED_PLANS_ENV = "PARAPLAN_MAX_STORED_PLANS"
SEARCH_WORKERS_ENV = "PARAPLAN_SEARCH_WORKERS"
MAX_STORED_PLAN_BYTES_ENV = "PARAPLAN_MAX_STORED_PLAN_BYTES"
MAX_VALIDATION_S_ENV = "PARAPLAN_MAX_VALIDATION_S"
SLURM_PARTITION_ENV = "PARAPLAN_SLURM_PARTITION"
SLURM_TIME_LIMIT_ENV = "PARAPLAN_SLURM_TIME_LIMIT"

DEFAULT_MAX_REQUEST_BYTES = 1 << 20
"""1 MiB: a full request with an inline model is a few KiB; a larger body is a mistake or an attack."""
DEFAULT_MAX_STORED_PLANS = 1000
DEFAULT_MAX_STORED_PLAN_BYTES = 256 << 20
"""256 MiB: 1000 searches of typical size (tens of KB) fit several times over; 1000 at the request size limit
(1 MiB each, and an answer of up to 100 ranked plans) would not."""
DEFAULT_MAX_VALIDATION_S = 24 * 3600.0
"""A day: a full CPU validation (90 plans, several passes, their profiles) takes hours on a small machine; one that
runs past a day is stuck (a hung collective that torchrun's own timeout did not end) or asked far too much."""
DEFAULT_SLURM_TIME_LIMIT = "1-00:00:00"
"""A day, in Slurm's --time format (days-hours:minutes:seconds): what a Slurm job asks for unless the server is told
otherwise. Slurm ends a job past it (state TIMEOUT); a partition may allow less."""


class SettingsError(InputError):
    """A setting that cannot work; names the environment variable or flag."""


@dataclass(frozen=True)
class Settings:
    """Everything a server instance needs to know; ``create_app(settings)`` builds a server from it.

    ``api_token`` None means the endpoints that start processes (profiles, jobs) are disabled, not open.
    """

    data_dir: Path
    database_url: str
    api_token: str | None = None
    max_concurrent_jobs: int = 1
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES
    max_job_processes: int = field(default_factory=lambda: default_max_job_processes())
    """Processes one job may start: a request for a 512-GPU plan must not fork 512 ranks on this machine."""
    max_stored_plans: int = DEFAULT_MAX_STORED_PLANS
    """Plan searches kept (the newest; a search a job runs is kept too): POST /v1/plans needs no token, and each
    search stores its request (up to max_request_bytes) and its answer, so without a bound anyone could fill the
    disk. 1000 searches of typical size (tens of KB) are tens of MB."""
    search_workers: int = field(default_factory=lambda: default_search_workers())
    """Worker processes that run plan searches side by side (api/search_pool.py); 0 runs them in the server's own
    process, one at a time."""
    max_stored_plan_bytes: int = DEFAULT_MAX_STORED_PLAN_BYTES
    """Bytes the kept plan searches may take (their requests and answers as stored), the oldest deleted first: the
    count alone bounds the disk only at 1000 times the largest search."""
    max_validation_s: float = DEFAULT_MAX_VALIDATION_S
    """Wall time a validation job may run (from its start); past it the job is stopped and marked FAILED, naming
    this bound."""
    job_grace_s: float = 60.0
    """How long a cancelled job may take to save a checkpoint and stop before every rank is killed."""
    slurm_partition: str | None = None
    """The partition Slurm jobs are submitted to (None: the cluster's default partition)."""
    slurm_time_limit: str = DEFAULT_SLURM_TIME_LIMIT
    """The wall time a Slurm job asks for (sbatch --time)."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "data_dir", Path(self.data_dir).expanduser().resolve())
        if self.max_concurrent_jobs < 1:
            raise SettingsError(f"{MAX_JOBS_ENV}: must be at least 1, got {self.max_concurrent_jobs}")
        if self.max_job_processes < 1:
            raise SettingsError(f"{MAX_JOB_PROCESSES_ENV}: must be at least 1, got {self.max_job_processes}")
        if self.max_stored_plans < 1:
            raise SettingsError(f"{MAX_STORED_PLANS_ENV}: must be at least 1, got {self.max_stored_plans}")
        if self.search_workers < 0:
            raise SettingsError(f"{SEARCH_WORKERS_ENV}: must be 0 or more (0: none), got {self.search_workers}")
        if self.max_stored_plan_bytes < 1:
            raise SettingsError(f"{MAX_STORED_PLAN_BYTES_ENV}: must be at least 1, got {self.max_stored_plan_bytes}")
        if not (self.max_validation_s > 0 and math.isfinite(self.max_validation_s)):
            raise SettingsError(
                f"{MAX_VALIDATION_S_ENV}: must be a positive number of seconds, got {self.max_validation_s}"
            )
        if self.max_request_bytes < 1024:
            raise SettingsError(f"{MAX_REQUEST_BYTES_ENV}: must be at least 1024, got {self.max_request_bytes}")
        if self.api_token is not None:
            _check_token(self.api_token)
        for name, value in ((SLURM_PARTITION_ENV, self.slurm_partition), (SLURM_TIME_LIMIT_ENV, self.slurm_time_limit)):
            if value is not None and (not value or any(ch.isspace() for ch in value)):
                raise SettingsError(f"{name}: must be one word (a batch script's #SBATCH line ends at a blank), "
                                    f"got {value!r}")  # fmt: skip

    @classmethod
    def from_env(cls, **overrides: Any) -> Settings:
        """Settings from PARAPLAN_* variables, then ``overrides`` (what the command line was given, None for
        "not given"). The database follows the data folder unless PARAPLAN_DATABASE_URL names one."""
        given = {name: value for name, value in overrides.items() if value is not None}
        data_dir = Path(given.pop("data_dir", None) or default_data_dir()).expanduser().resolve()
        settings = cls(
            data_dir=data_dir,
            database_url=os.environ.get(DATABASE_URL_ENV) or f"sqlite:///{data_dir / DATABASE_FILE_NAME}",
            api_token=os.environ.get(API_TOKEN_ENV) or None,
            max_concurrent_jobs=_int_env(MAX_JOBS_ENV, 1),
            max_request_bytes=_int_env(MAX_REQUEST_BYTES_ENV, DEFAULT_MAX_REQUEST_BYTES),
            max_job_processes=_int_env(MAX_JOB_PROCESSES_ENV, default_max_job_processes()),
            max_stored_plans=_int_env(MAX_STORED_PLANS_ENV, DEFAULT_MAX_STORED_PLANS),
            search_workers=_int_env(SEARCH_WORKERS_ENV, default_search_workers()),
            max_stored_plan_bytes=_int_env(MAX_STORED_PLAN_BYTES_ENV, DEFAULT_MAX_STORED_PLAN_BYTES),
            max_validation_s=_float_env(MAX_VALIDATION_S_ENV, DEFAULT_MAX_VALIDATION_S),
            slurm_partition=os.environ.get(SLURM_PARTITION_ENV) or None,
            slurm_time_limit=os.environ.get(SLURM_TIME_LIMIT_ENV) or DEFAULT_SLURM_TIME_LIMIT,
        )
        return replace(settings, **given)

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


def _check_token(token: str) -> None:
    """A token a client can send: not blank, no whitespace at its ends (the server strips what a client sends, so
    a token of 16 spaces would start the server "token: on" with nobody able to authenticate), not guessable."""
    if not token.strip():
        raise SettingsError(
            f"{API_TOKEN_ENV}: is blank (only whitespace); set a token of at least 16 characters, or leave it unset "
            "to disable the endpoints that start processes"
        )
    if token != token.strip():
        raise SettingsError(f"{API_TOKEN_ENV}: has whitespace at its start or end, which no client can send; remove it")
    if len(token) < 16:
        raise SettingsError(f"{API_TOKEN_ENV}: use a token of at least 16 characters (a guessable one is open)")


def default_max_job_processes() -> int:
    """One process per core, and at least 8 (a one-node GPU job)."""
    return max(8, os.cpu_count() or 1)


def default_search_workers() -> int:
    """One search worker per core this process may run on: a search is CPU-bound and single-threaded."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _int_env(name: str, default: int) -> int:
    return _number_env(name, default, int, "an integer")


def _float_env(name: str, default: float) -> float:
    return _number_env(name, default, float, "a number")


def _number_env(name: str, default: T, parse: Callable[[str], T], expected: str) -> T:
    """The environment variable `name` read by `parse`, `default` when unset or empty; SettingsError naming it."""
    text = os.environ.get(name)
    if not text:
        return default
    try:
        return parse(text)
    except ValueError:
        raise SettingsError(f"{name}: expected {expected}, got {text!r}") from None
