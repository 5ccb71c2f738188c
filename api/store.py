"""The REST service's tables: stored plan searches, jobs (training and profiling runs) and measured runs.

They hang off profiler.store's declarative base, so the service, the CLI and the profiler share one database
(SQLite in the data folder by default, any SQLAlchemy URL by PARAPLAN_DATABASE_URL) under one schema version,
which ProfileStore checks when it opens it. Bodies (requests, results, estimates) are kept as JSON text: the
contract defines them, and the columns beside them copy only what listing and filtering need.
"""

from __future__ import annotations

import json
import threading
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Boolean, Float, ForeignKey, Integer, String, Text, delete, func, or_, select, text, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Mapped, Session, mapped_column, sessionmaker

from profiler.store import Base, ProfileStore

JOB_STATES = ("QUEUED", "RUNNING", "SUCCEEDED", "FAILED", "CANCELLED")
FINAL_STATES = frozenset({"SUCCEEDED", "FAILED", "CANCELLED"})
JOB_KINDS = ("train", "profile")
LOCAL, SLURM = "local", "slurm"
LAUNCHERS = (LOCAL, SLURM)
"""Where a job runs: on the server's own host, under a supervisor process; or as a Slurm batch job."""


def new_id() -> str:
    return uuid.uuid4().hex


def utc_now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


class PlanRow(Base):
    """One plan search: the request as posted and the SearchResult it got."""

    __tablename__ = "plans"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    created: Mapped[str] = mapped_column(String(40), index=True)
    model_name: Mapped[str] = mapped_column(String(255))
    num_gpus: Mapped[int] = mapped_column(Integer)
    found: Mapped[int] = mapped_column(Integer)  # plans that fit, ranked
    best_step_time_s: Mapped[float | None] = mapped_column(Float)
    request: Mapped[str] = mapped_column(Text)
    result: Mapped[str] = mapped_column(Text)
    stored_bytes: Mapped[int] = mapped_column(Integer, default=0)  # request and result as stored (UTF-8)

    @staticmethod
    def size_of(request: str, result: str) -> int:
        """The bytes a search's request and answer take in the database (their UTF-8 text)."""
        return len(request.encode()) + len(result.encode())


@dataclass(frozen=True)
class Retention:
    """How many stored plan searches are kept, and how many bytes they may take: past either bound the oldest go
    first. A search a job runs is kept whatever its age and counts toward neither (jobs need the token)."""

    searches: int
    stored_bytes: int


class JobRow(Base):
    """A training or profiling run the service started (or will start: QUEUED).

    ``pid`` is the job's supervisor (api/jobs/supervise.py), which outlives the server that started it; a restarted
    server finds it again by pid and job folder. A job of the ``slurm`` launcher has no supervisor: Slurm runs it,
    and a restarted server follows it again by ``slurm_job_id`` (api/jobs/slurm.py). ``idempotency_key`` makes a
    retried POST return this job.
    """

    __tablename__ = "jobs"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    kind: Mapped[str] = mapped_column(String(16), index=True)
    state: Mapped[str] = mapped_column(String(16), index=True)
    created: Mapped[str] = mapped_column(String(40), index=True)
    started: Mapped[str | None] = mapped_column(String(40))
    finished: Mapped[str | None] = mapped_column(String(40))
    body: Mapped[str] = mapped_column(Text)  # the POSTed body, as JSON
    body_hash: Mapped[str] = mapped_column(String(64))
    idempotency_key: Mapped[str | None] = mapped_column(String(255), unique=True)
    plan_id: Mapped[str | None] = mapped_column(String(32), ForeignKey("plans.id"))
    estimate: Mapped[str | None] = mapped_column(Text)  # the StepEstimate predicted for a training job
    nproc: Mapped[int] = mapped_column(Integer)
    pid: Mapped[int | None] = mapped_column(Integer)
    returncode: Mapped[int | None] = mapped_column(Integer)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    failure_reason: Mapped[str | None] = mapped_column(Text)
    profile_id: Mapped[str | None] = mapped_column(String(32))  # what a profiling job stored
    launcher: Mapped[str] = mapped_column(String(16), default=LOCAL, server_default=LOCAL)  # one of LAUNCHERS
    nodes: Mapped[int] = mapped_column(Integer, default=1, server_default="1")
    slurm_job_id: Mapped[str | None] = mapped_column(String(32))  # set once sbatch has accepted the job
    slurm_state: Mapped[str | None] = mapped_column(String(32))  # Slurm's (PENDING, RUNNING, ...) when last asked


class MeasuredRunRow(Base):
    """What a finished training run measured, next to what the cost model predicted for it."""

    __tablename__ = "measured_runs"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    created: Mapped[str] = mapped_column(String(40), index=True)
    job_id: Mapped[str | None] = mapped_column(String(32), ForeignKey("jobs.id"), index=True)
    plan_id: Mapped[str | None] = mapped_column(String(32))
    validation_id: Mapped[str | None] = mapped_column(String(32), index=True)  # the `paraplan validate` run
    device: Mapped[str] = mapped_column(String(16))
    steps: Mapped[int] = mapped_column(Integer)
    predicted_step_time_s: Mapped[float | None] = mapped_column(Float)
    measured_step_time_s: Mapped[float | None] = mapped_column(Float)
    measured_tokens_per_s: Mapped[float | None] = mapped_column(Float)
    predicted_peak_bytes: Mapped[int | None] = mapped_column(Integer)
    measured_peak_bytes: Mapped[int | None] = mapped_column(Integer)
    request: Mapped[str] = mapped_column(Text)  # the contract request with its plan
    estimate: Mapped[str | None] = mapped_column(Text)


class ApiStore:
    """The service's database: the profile store plus plans, jobs and measured runs, over one engine.

    Thread-safe to share: every call opens its own session.
    """

    def __init__(self, url: str):
        self.profiles = ProfileStore(url)  # opens (and version-checks) the database, creating these tables too
        self._sessions = sessionmaker(self.profiles.engine, expire_on_commit=False)
        # One writer at a time in this process: SQLite takes one writer anyway, and waiting here is fair and
        # quick where waiting in SQLite's busy handler is neither (it sleeps and retries).
        self._write_lock = threading.Lock()

    @contextmanager
    def _writing(self) -> Iterator[Session]:
        with self._write_lock, self._sessions.begin() as session:
            yield session

    def close(self) -> None:
        self.profiles.close()

    def ping(self) -> None:
        """Raise SQLAlchemyError unless the database answers."""
        with self._sessions() as session:
            session.execute(text("SELECT 1"))

    # ------------------------------------------------------------------------------------------------ plans

    def add_plan(self, row: PlanRow, keep: Retention | None = None) -> PlanRow:
        """Insert ``row``; with ``keep``, then delete the oldest searches beyond its bounds (never ``row``, nor a
        search a job runs: the job's view links it)."""
        with self._writing() as session:
            session.add(row)
            if keep is not None:
                session.flush()
                session.execute(_older_plans(keep, row.id))
        return row

    def get_plan(self, plan_id: str) -> PlanRow | None:
        with self._sessions() as session:
            return session.get(PlanRow, plan_id)

    def plans(self, limit: int, offset: int) -> Sequence[PlanRow]:
        query = select(PlanRow).order_by(PlanRow.created.desc(), PlanRow.id).limit(limit).offset(offset)
        with self._sessions() as session:
            return session.scalars(query).all()

    # ------------------------------------------------------------------------------------------------- jobs

    def add_job(self, row: JobRow) -> tuple[JobRow, bool]:
        """Insert ``row``; (row, True). When its idempotency key is taken: (the job holding it, False)."""
        try:
            with self._writing() as session:
                session.add(row)
            return row, True
        except IntegrityError:
            existing = self.job_by_key(row.idempotency_key) if row.idempotency_key else None
            if existing is None:
                raise
            return existing, False

    def job_by_key(self, key: str) -> JobRow | None:
        with self._sessions() as session:
            return session.scalars(select(JobRow).where(JobRow.idempotency_key == key)).first()

    def get_job(self, job_id: str) -> JobRow | None:
        with self._sessions() as session:
            return session.get(JobRow, job_id)

    def jobs(self, kind: str | None = None, states: Sequence[str] = (), limit: int = 100, offset: int = 0,
             oldest_first: bool = False, launcher: str | None = None) -> Sequence[JobRow]:  # fmt: skip
        query = select(JobRow)
        if kind is not None:
            query = query.where(JobRow.kind == kind)
        if launcher is not None:
            query = query.where(JobRow.launcher == launcher)
        if states:
            query = query.where(JobRow.state.in_(states))
        order = JobRow.created.asc() if oldest_first else JobRow.created.desc()
        query = query.order_by(order, JobRow.id).limit(limit).offset(offset)
        with self._sessions() as session:
            return session.scalars(query).all()

    def update_job(self, job_id: str, *, only_if_state: Sequence[str] = (), **values: Any) -> bool:
        """Set ``values`` on the job; with ``only_if_state``, only while it is in one of those states (an atomic
        compare-and-set, so a cancel and a start cannot both win). True if the row changed."""
        statement = update(JobRow).where(JobRow.id == job_id).values(**values)
        if only_if_state:
            statement = statement.where(JobRow.state.in_(only_if_state))
        with self._writing() as session:
            return session.execute(statement).rowcount > 0

    # ------------------------------------------------------------------------------------------ measured runs

    def add_measured_run(self, row: MeasuredRunRow) -> MeasuredRunRow:
        with self._writing() as session:
            session.add(row)
        return row

    def measured_runs(
        self, job_id: str | None = None, limit: int = 100, validation_id: str | None = None
    ) -> Sequence[MeasuredRunRow]:
        query = select(MeasuredRunRow).order_by(MeasuredRunRow.created.desc()).limit(limit)
        if job_id is not None:
            query = query.where(MeasuredRunRow.job_id == job_id)
        if validation_id is not None:
            query = query.where(MeasuredRunRow.validation_id == validation_id)
        with self._sessions() as session:
            return session.scalars(query).all()


def _older_plans(keep: Retention, newest: str) -> Any:
    """DELETE of the plan searches past `keep`'s bounds, newest first (by `created`): those after the first
    `keep.searches`, and those from where the running total of their sizes passes `keep.stored_bytes` on; never
    `newest`, nor those jobs run."""
    in_use = select(JobRow.plan_id).where(JobRow.plan_id.is_not(None))
    newest_first = (PlanRow.created.desc(), PlanRow.id.desc())  # a total order: no two rows are peers
    ranked = (
        select(
            PlanRow.id,
            func.row_number().over(order_by=newest_first).label("position"),
            func.sum(PlanRow.stored_bytes).over(order_by=newest_first).label("bytes_so_far"),
        )
        .where(PlanRow.id.not_in(in_use))
        .subquery()
    )
    past_bounds = select(ranked.c.id).where(
        or_(ranked.c.position > keep.searches, ranked.c.bytes_so_far > keep.stored_bytes)
    )
    return delete(PlanRow).where(PlanRow.id != newest, PlanRow.id.in_(past_bounds))


def dumps(value: Any) -> str:
    """JSON text for a body column (compact; keys kept in the order given)."""
    return json.dumps(value, separators=(",", ":"))
