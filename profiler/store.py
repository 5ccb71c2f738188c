"""HardwareProfile storage: JSON files, and rows of the project's database (SQLAlchemy 2; SQLite by default).

A profile is measured once per machine type and software stack and then reused until either changes
(:meth:`ProfileStore.find_matching`). Both forms are versioned: a profile records its ``schema_version``
(``planner.specs.PROFILE_SCHEMA_VERSION``) and the database its own in the ``paraplan_meta`` table; what another
version wrote is refused with a message that says so, never reinterpreted.

No torch here: the command line and the REST service import this module, and neither may pay torch's import.
"""

from __future__ import annotations

import json
import os
import re
import uuid
from dataclasses import dataclass, fields
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any

import sqlalchemy
from sqlalchemy import ColumnElement, Index, Integer, String, Text, event, select
from sqlalchemy.exc import ArgumentError, IntegrityError, SQLAlchemyError
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker
from sqlalchemy.pool import StaticPool

from planner.profiles import ProfileError, load_profile_json, profile_from_data, require_profile, save_profile_json
from planner.specs import PROFILE_SCHEMA_VERSION, HardwareProfile

__all__ = [  # the file form lives in planner.profiles (the planner reads files too); re-exported for one import
    "ProfileError",
    "ProfileStore",
    "ProfileSummary",
    "load_profile_json",
    "resolve_profile",
    "save_profile_json",
]

DATA_DIR_ENV = "PARAPLAN_DATA_DIR"
DATABASE_URL_ENV = "PARAPLAN_DATABASE_URL"
DATABASE_FILE_NAME = "paraplan.db"

DATABASE_SCHEMA_VERSION = 5
"""Bumped whenever a table of the database changes. A database of an older version that `MIGRATIONS` leads from is
migrated in place when opened, rows kept; any other version is refused, not reinterpreted.
2: the REST service's tables (api/store.py: plans, jobs, measured_runs) joined the profiles.
4: plans.stored_bytes, each stored search's size (the service keeps stored searches to a byte budget)."""

SCHEMA_VERSION_KEY = "schema_version"
_PROFILE_ID = re.compile(r"[0-9a-fA-F]{32}")


# ============================================================================================ where things live


def default_data_dir() -> Path:
    """$PARAPLAN_DATA_DIR, else ~/.local/share/paraplan. Not created here: only a writer should create it."""
    configured = os.environ.get(DATA_DIR_ENV)
    if configured:
        return Path(configured).expanduser()
    return Path.home() / ".local" / "share" / "paraplan"


def default_database_url() -> str:
    """$PARAPLAN_DATABASE_URL, else a SQLite file in the data folder (any SQLAlchemy URL works)."""
    return os.environ.get(DATABASE_URL_ENV) or f"sqlite:///{default_data_dir() / DATABASE_FILE_NAME}"


# ================================================================================================== database


class Base(DeclarativeBase):
    """The project's declarative base: every paraplan table (the REST service's too) hangs off its metadata,
    so one ``create_all`` makes one database."""


class MetaRow(Base):
    """Key/value facts about the database itself; ``schema_version`` is DATABASE_SCHEMA_VERSION when created."""

    __tablename__ = "paraplan_meta"

    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(Text)


class ProfileRow(Base):
    """One stored HardwareProfile: ``body`` is the whole profile as JSON; the other columns copy what listing and
    matching need, so neither parses bodies."""

    __tablename__ = "profiles"
    __table_args__ = (Index("ix_profiles_hardware", "device_kind", "device_name", "device_count", "torch_version"),)

    id: Mapped[str] = mapped_column(String(32), primary_key=True)  # uuid4 hex
    created: Mapped[str] = mapped_column(String(40), index=True)  # when measured: ISO 8601 UTC, normalized
    stored: Mapped[str] = mapped_column(String(40))  # when added: ISO 8601 UTC, orders profiles created together
    device_kind: Mapped[str] = mapped_column(String(16))
    device_name: Mapped[str] = mapped_column(String(255))
    device_count: Mapped[int] = mapped_column(Integer)
    hosts: Mapped[str] = mapped_column(Text)  # JSON list of host names
    torch_version: Mapped[str] = mapped_column(String(64))
    cuda_version: Mapped[str | None] = mapped_column(String(64))
    nccl_version: Mapped[str | None] = mapped_column(String(64))
    profile_schema_version: Mapped[int] = mapped_column(Integer)
    name: Mapped[str | None] = mapped_column(String(255))  # a user's label
    num_layers: Mapped[int] = mapped_column(Integer)
    num_collectives: Mapped[int] = mapped_column(Integer)
    body: Mapped[str] = mapped_column(Text)


@dataclass(frozen=True)
class ProfileSummary:
    """One stored profile as a listing shows it (no measurements)."""

    id: str
    name: str | None
    created: str
    device_kind: str
    device_name: str
    device_count: int
    torch_version: str
    cuda_version: str | None
    nccl_version: str | None
    num_layers: int
    num_collectives: int


class ProfileStore:
    """HardwareProfiles in a database: add, get, list, and find one measured on the same hardware and software.

    Thread-safe to share (one engine; every call opens its own session), as the REST service does.
    """

    def __init__(self, url: str | None = None):
        self.url = url or default_database_url()
        self.engine = _create_engine(self.url)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        try:
            _open_schema(self.engine, self._sessions, self.url)
        except BaseException:
            self.engine.dispose()
            raise

    def add(self, profile: HardwareProfile, name: str | None = None, profile_id: str | None = None) -> str:
        """Store ``profile`` (with an optional label) and return its id: ``profile_id`` when given (the REST
        service stores a profiling job's result under the job's id, so one id names both), else a new one."""
        row = _row_for(profile, name, profile_id or uuid.uuid4().hex)
        with self._sessions.begin() as session:
            session.add(row)
        return row.id

    def get(self, profile_id: str) -> HardwareProfile:
        """The stored profile ``profile_id``; ProfileError if none, or if it is of another schema version."""
        with self._sessions() as session:
            row = session.get(ProfileRow, profile_id)
        if row is None:
            raise ProfileError(f"no profile with id {profile_id!r} in {_safe_url(self.url)}", field="id")
        return profile_from_data(json.loads(row.body), where=f"stored profile {profile_id}")

    def summaries(self) -> list[ProfileSummary]:
        """Every stored profile, newest measurement first (bodies are not read)."""
        query = select(*_summary_columns()).order_by(*_newest_first())
        with self._sessions() as session:
            return [ProfileSummary(*values) for values in session.execute(query)]

    def summary(self, profile_id: str) -> ProfileSummary | None:
        """One stored profile's summary, or None if there is no such id."""
        query = select(*_summary_columns()).where(ProfileRow.id == profile_id)
        with self._sessions() as session:
            found = session.execute(query).first()
        return None if found is None else ProfileSummary(*found)

    def find_matching(
        self,
        *,
        device_kind: str,
        device_name: str,
        device_count: int,
        torch_version: str,
        cuda_version: str | None = None,
        nccl_version: str | None = None,
    ) -> str | None:
        """The id of the newest profile of this paraplan's schema version measured on the same hardware and
        software (every argument equal, None matching only None), else None: a profile is measured once and
        reused until the machine or its torch / CUDA / NCCL changes."""
        query = (
            select(ProfileRow.id)
            .where(
                ProfileRow.profile_schema_version == PROFILE_SCHEMA_VERSION,
                ProfileRow.device_kind == device_kind,
                ProfileRow.device_name == device_name,
                ProfileRow.device_count == device_count,
                ProfileRow.torch_version == torch_version,
                # `== None` is rendered `IS NULL`: a profile without CUDA matches only a query without CUDA.
                ProfileRow.cuda_version == cuda_version,
                ProfileRow.nccl_version == nccl_version,
            )
            .order_by(*_newest_first())
            .limit(1)
        )
        with self._sessions() as session:
            return session.scalars(query).first()

    def close(self) -> None:
        """Release the engine's connections (the SQLite file is then free to move or delete)."""
        self.engine.dispose()

    def __enter__(self) -> ProfileStore:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.close()


def _create_engine(url: str) -> sqlalchemy.Engine:
    """An engine for ``url``. SQLite: the file's folder is created, and connections may cross threads (the web
    service's worker threads share the store); an in-memory database is one connection, or every thread would
    see its own empty database."""
    try:
        parsed = sqlalchemy.make_url(url)
    except ArgumentError as error:
        raise ProfileError(f"{url!r} is not a database URL: {error}", field="database") from error
    if parsed.get_backend_name() != "sqlite":
        return _engine_or_error(url)
    database = parsed.database or ""
    if database in ("", ":memory:"):
        return _engine_or_error(url, connect_args={"check_same_thread": False}, poolclass=StaticPool)
    if not database.startswith("file:"):  # a `file:` URI is SQLite's to interpret
        Path(database).expanduser().parent.mkdir(parents=True, exist_ok=True)
    engine = _engine_or_error(url, connect_args={"check_same_thread": False, "timeout": 30})
    event.listen(engine, "connect", _use_write_ahead_log)
    return engine


def _use_write_ahead_log(connection: Any, record: Any) -> None:
    """WAL lets readers (the server's request threads, a CLI) go on while one writer commits, and with
    synchronous=NORMAL a commit does not wait for the disk twice; a crash can lose the last commits but never
    corrupts the file (https://www.sqlite.org/wal.html)."""
    cursor = connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()


def _engine_or_error(url: str, **options: Any) -> sqlalchemy.Engine:
    try:
        return sqlalchemy.create_engine(url, future=True, **options)
    except (ArgumentError, ImportError) as error:  # unknown dialect, or its driver is not installed
        raise ProfileError(f"cannot use database {_safe_url(url)}: {error}", field="database") from error


def _open_schema(engine: sqlalchemy.Engine, sessions: sessionmaker, url: str) -> None:
    """Check the database's schema version before creating any table in it (a database of another version must
    not gain this version's tables), stamping a fresh database with this version."""
    try:
        Base.metadata.tables[MetaRow.__tablename__].create(engine, checkfirst=True)
        found = _database_version(sessions)
        if found.isdigit() and int(found) < DATABASE_SCHEMA_VERSION:
            found = _migrate(engine, int(found))
        if found != str(DATABASE_SCHEMA_VERSION):
            raise ProfileError(
                f"database {_safe_url(url)} has schema version {found}, expected {DATABASE_SCHEMA_VERSION}; "
                "use another database (PARAPLAN_DATABASE_URL) or move this one aside",
                field="database",
            )
        Base.metadata.create_all(engine)
    except SQLAlchemyError as error:  # not a database, unreachable, no permission
        raise ProfileError(f"cannot open database {_safe_url(url)}: {error}", field="database") from error


def _add_plan_sizes(connection: sqlalchemy.Connection) -> None:
    """3 -> 4: each stored plan search's size in bytes (its request and its answer, as stored), counted for the rows
    already there. A database that never held the service's tables gets them from `create_all`, size included."""
    if not sqlalchemy.inspect(connection).has_table("plans"):
        return
    octets = "length(CAST({} AS BLOB))" if connection.dialect.name == "sqlite" else "octet_length({})"
    size = f"{octets.format('request')} + {octets.format('result')}"
    connection.execute(sqlalchemy.text("ALTER TABLE plans ADD COLUMN stored_bytes INTEGER NOT NULL DEFAULT 0"))
    connection.execute(sqlalchemy.text(f"UPDATE plans SET stored_bytes = {size}"))


def _add_job_launchers(connection: sqlalchemy.Connection) -> None:
    """4 -> 5: where each job runs: its launcher (`local` for the jobs already there, the only kind before), its node
    count (1), and the id and state Slurm gave it (none). A database without the service's tables gets them from
    `create_all`."""
    if not sqlalchemy.inspect(connection).has_table("jobs"):
        return
    for column in ("launcher VARCHAR(16) NOT NULL DEFAULT 'local'", "nodes INTEGER NOT NULL DEFAULT 1",
                   "slurm_job_id VARCHAR(32)", "slurm_state VARCHAR(32)"):  # fmt: skip
        connection.execute(sqlalchemy.text(f"ALTER TABLE jobs ADD COLUMN {column}"))


MIGRATIONS = {3: _add_plan_sizes, 4: _add_job_launchers}
"""Schema version -> the step that brings a database of that version to the next one."""


def _migrate(engine: sqlalchemy.Engine, version: int) -> str:
    """Bring a database of `version` up to DATABASE_SCHEMA_VERSION, one step after another, each in one
    transaction with the version stamp (a failed step leaves the database as it was). The stamp is moved first: that
    takes the write lock, and a process that opened the database at the same time finds the step done and skips it.
    The version reached (an older one if no step leads on from it, which the caller refuses)."""
    while version < DATABASE_SCHEMA_VERSION and version in MIGRATIONS:
        with engine.begin() as connection:
            stamped = connection.execute(
                sqlalchemy.update(MetaRow)
                .where(MetaRow.key == SCHEMA_VERSION_KEY, MetaRow.value == str(version))
                .values(value=str(version + 1))
            )
            if stamped.rowcount:
                MIGRATIONS[version](connection)
        version += 1
    return str(version)


def _database_version(sessions: sessionmaker) -> str:
    """The stored schema version; a fresh database is stamped with this paraplan's. When two processes open a
    fresh database at once, the one that stamps second finds the first one's stamp."""
    try:
        with sessions.begin() as session:
            row = session.get(MetaRow, SCHEMA_VERSION_KEY)
            if row is not None:
                return row.value
            session.add(MetaRow(key=SCHEMA_VERSION_KEY, value=str(DATABASE_SCHEMA_VERSION)))
        return str(DATABASE_SCHEMA_VERSION)
    except IntegrityError:
        with sessions() as session:
            return session.get_one(MetaRow, SCHEMA_VERSION_KEY).value


def _row_for(profile: HardwareProfile, name: str | None, profile_id: str) -> ProfileRow:
    require_profile(profile)
    if not _PROFILE_ID.fullmatch(profile_id):
        raise ProfileError(f"a profile id is 32 hex digits, got {profile_id!r}", field="id")
    return ProfileRow(
        id=profile_id.lower(),
        created=_utc_iso(profile.created),
        stored=datetime.now(UTC).isoformat(timespec="microseconds"),
        device_kind=profile.device_kind,
        device_name=profile.device_name,
        device_count=profile.device_count,
        hosts=json.dumps(profile.hosts),
        torch_version=profile.torch_version,
        cuda_version=profile.cuda_version,
        nccl_version=profile.nccl_version,
        profile_schema_version=profile.schema_version,
        name=name,
        num_layers=len(profile.layers),
        num_collectives=len(profile.collectives),
        body=profile.model_dump_json(),
    )


def _utc_iso(created: str) -> str:
    """``created`` in one ISO 8601 UTC form, so that comparing the column's strings compares the instants
    (profiles written with another offset or with a 'Z' sort where they belong). No offset means UTC."""
    try:
        moment = datetime.fromisoformat(created)
    except ValueError:
        raise ProfileError(f"created {created!r} is not an ISO 8601 time", field="created") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC).isoformat()


def _summary_columns() -> list[Any]:
    return [getattr(ProfileRow, field.name) for field in fields(ProfileSummary)]


def _newest_first() -> tuple[ColumnElement[Any], ...]:
    """Latest measurement first; of profiles measured in the same second, the one stored last."""
    return ProfileRow.created.desc(), ProfileRow.stored.desc()


def _safe_url(url: str) -> str:
    """The URL for messages, without its password."""
    try:
        return sqlalchemy.make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return repr(url)


# ================================================================================================ references


def is_profile_id(ref: str) -> bool:
    """True if ``ref`` has the form of a stored profile's id (32 hex digits)."""
    return _PROFILE_ID.fullmatch(ref) is not None


def resolve_profile(ref: str, store: ProfileStore | None = None) -> HardwareProfile:
    """The profile that ``ref`` names (the contract's ``cluster.profile``): a JSON file path, or a stored id.

    With no ``store``, the default database is opened only when one is configured or exists, so that resolving a
    file never creates a database as a side effect.
    """
    path = Path(ref).expanduser()
    if path.is_file():
        return load_profile_json(path)
    if _PROFILE_ID.fullmatch(ref):
        found = _stored_profile(ref.lower(), store)
        if found is not None:
            return found
    raise ProfileError(f"{ref!r} is neither a profile file nor a stored profile id", field="cluster.profile")


def _stored_profile(profile_id: str, store: ProfileStore | None) -> HardwareProfile | None:
    """The stored profile, or None where there is no such id or no database to look in."""
    if store is None:
        if not _default_database_present():
            return None
        with ProfileStore() as opened:
            return _stored_profile(profile_id, opened)
    try:
        return store.get(profile_id)
    except ProfileError as error:
        if error.field == "id":
            return None
        raise


def _default_database_present() -> bool:
    return bool(os.environ.get(DATABASE_URL_ENV)) or (default_data_dir() / DATABASE_FILE_NAME).is_file()
