"""profiler.store: HardwareProfiles as JSON files and as rows of a real SQLite database under tmp_path."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import update
from sqlalchemy.orm import Session

from planner.presets import model_preset
from planner.specs import (
    PROFILE_SCHEMA_VERSION,
    CollectiveFit,
    CollectiveMeasurement,
    HardwareProfile,
    LayerMeasurement,
    OptimizerMeasurement,
    TimingStats,
)
from profiler.store import (
    DATABASE_SCHEMA_VERSION,
    MetaRow,
    ProfileError,
    ProfileRow,
    ProfileStore,
    ProfileSummary,
    default_data_dir,
    default_database_url,
    load_profile_json,
    resolve_profile,
    save_profile_json,
)


def _timing(median_s: float, spread: float = 0.05, repeats: int = 20) -> TimingStats:
    return TimingStats(median_s=median_s, spread=spread, repeats=repeats)


def _collective(size_bytes: int, time_s: float) -> CollectiveMeasurement:
    algbw_GBps = size_bytes / time_s / 1e9
    return CollectiveMeasurement(
        op="all_reduce",
        tier="intra_node",
        group_size=8,
        size_bytes=size_bytes,
        time=_timing(time_s),
        algbw_GBps=algbw_GBps,
        busbw_GBps=algbw_GBps * 2 * 7 / 8,  # nccl-tests all_reduce factor 2(n-1)/n
    )


@pytest.fixture
def profile() -> HardwareProfile:
    """A small but complete profile, as the profiler would write one for an 8-GPU H100 node."""
    return HardwareProfile(
        device_kind="cuda",
        device_name="NVIDIA H100 80GB HBM3",
        device_count=8,
        hosts=["node-a"],
        torch_version="2.13.0+cu128",
        cuda_version="12.8",
        nccl_version="2.27.3",
        created="2025-06-01T12:00:00+00:00",
        settings={"warmup": 5, "repeats": 20},
        model=model_preset("gpt3-1.7b"),
        layers=[
            LayerMeasurement(
                layer="block",
                tp=1,
                micro_batch_size=1,
                seq_len=2048,
                dtype="bf16",
                forward=_timing(1.25e-3),
                backward=_timing(2.6e-3, spread=0.31),
                saved_bytes=201_326_592,
                peak_allocated_bytes=1_073_741_824,
            ),
            LayerMeasurement(
                layer="head",
                tp=2,
                micro_batch_size=1,
                seq_len=2048,
                dtype="bf16",
                recompute="full",
                forward=_timing(0.8e-3),
                backward=_timing(1.7e-3),
                saved_bytes=0,
            ),
        ],
        optimizer=[OptimizerMeasurement(optimizer="adamw", num_params=1_700_000_000, time=_timing(0.021))],
        collectives=[_collective(1 << 20, 3.1e-5), _collective(1 << 28, 1.2e-3)],
        collective_fits=[
            CollectiveFit(
                op="all_reduce",
                tier="intra_node",
                group_size=8,
                latency_s=2.4e-5,
                bandwidth_GBps=380.0,
                r2=0.998,
                max_rel_error=0.04,
                num_samples=2,
            )
        ],
    )


@pytest.fixture
def db_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'db' / 'paraplan.db'}"


@pytest.fixture
def store(db_url: str):
    with ProfileStore(db_url) as opened:
        yield opened


@pytest.fixture
def no_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No configured database, and a data folder of the test's own (never the user's)."""
    data_dir = tmp_path / "data"
    monkeypatch.setenv("PARAPLAN_DATA_DIR", str(data_dir))
    monkeypatch.delenv("PARAPLAN_DATABASE_URL", raising=False)
    return data_dir


def _raised(call) -> ProfileError:
    with pytest.raises(ProfileError) as caught:
        call()
    return caught.value


# ================================================================================================= JSON files


def test_json_round_trip_is_equal(profile: HardwareProfile, tmp_path: Path) -> None:
    path = save_profile_json(profile, tmp_path / "new" / "dir" / "h100.json")
    assert path == tmp_path / "new" / "dir" / "h100.json"
    assert load_profile_json(path) == profile
    assert json.loads(path.read_text())["layers"][0]["forward"]["median_s"] == 1.25e-3
    assert path.read_text().startswith('{\n  "schema_version": 1,')  # indent=2, readable by people
    assert [p.name for p in path.parent.iterdir()] == ["h100.json"]  # no temporary file left behind


def test_save_replaces_an_existing_file(profile: HardwareProfile, tmp_path: Path) -> None:
    path = tmp_path / "p.json"
    path.write_text("old")
    save_profile_json(profile.model_copy(update={"device_name": "second"}), path)
    assert load_profile_json(path).device_name == "second"


def test_save_refuses_what_is_not_a_profile(tmp_path: Path) -> None:
    not_a_profile: Any = {"device_kind": "cpu"}  # what a caller holding raw JSON might pass
    error = _raised(lambda: save_profile_json(not_a_profile, tmp_path / "p.json"))
    assert error.field == "profile"
    assert not (tmp_path / "p.json").exists()


def test_load_missing_file(tmp_path: Path) -> None:
    error = _raised(lambda: load_profile_json(tmp_path / "absent.json"))
    assert error.field == "profile"
    assert "no profile file" in str(error) and "absent.json" in str(error)


def test_load_not_json(tmp_path: Path) -> None:
    path = tmp_path / "p.json"
    path.write_text("{not json")
    error = _raised(lambda: load_profile_json(path))
    assert error.field == "profile"
    assert "is not JSON" in str(error)


def test_load_list_instead_of_object(tmp_path: Path, profile: HardwareProfile) -> None:
    path = tmp_path / "p.json"
    path.write_text(json.dumps([profile.model_dump(mode="json")]))
    error = _raised(lambda: load_profile_json(path))
    assert error.field == "profile"
    assert "JSON list, not a profile object" in str(error)


@pytest.mark.parametrize("version", [0, 2, "1", True])
def test_load_refuses_another_schema_version(tmp_path: Path, profile: HardwareProfile, version: object) -> None:
    data = profile.model_dump(mode="json") | {"schema_version": version}
    path = tmp_path / "p.json"
    path.write_text(json.dumps(data))
    error = _raised(lambda: load_profile_json(path))
    assert error.field == "schema_version"
    assert f"profile schema version {version!r} is not this paraplan's ({PROFILE_SCHEMA_VERSION}); measure again" in (
        str(error)
    )


def test_load_refuses_a_profile_without_version(tmp_path: Path, profile: HardwareProfile) -> None:
    data = profile.model_dump(mode="json")
    del data["schema_version"]
    path = tmp_path / "p.json"
    path.write_text(json.dumps(data))
    assert _raised(lambda: load_profile_json(path)).field == "schema_version"


def test_load_names_the_invalid_field_and_lists_every_problem(tmp_path: Path, profile: HardwareProfile) -> None:
    data = profile.model_dump(mode="json")
    data["layers"][0]["forward"]["median_s"] = -1.0
    data["collectives"][1]["group_size"] = 1
    path = tmp_path / "p.json"
    path.write_text(json.dumps(data))
    error = _raised(lambda: load_profile_json(path))
    assert error.field == "layers.0.forward.median_s"
    assert "layers.0.forward.median_s: Input should be greater than or equal to 0" in str(error)
    assert "collectives.1.group_size" in str(error)
    assert str(path) in str(error)


# ================================================================================================== database


def test_add_get_round_trip(store: ProfileStore, profile: HardwareProfile) -> None:
    profile_id = store.add(profile, name="h100 node")
    assert len(profile_id) == 32 and uuid.UUID(hex=profile_id).version == 4
    assert store.get(profile_id) == profile


def test_profiles_survive_reopening_the_database(db_url: str, profile: HardwareProfile) -> None:
    with ProfileStore(db_url) as first:
        profile_id = first.add(profile)
    with ProfileStore(db_url) as second:
        assert second.get(profile_id) == profile
        assert [s.id for s in second.summaries()] == [profile_id]


def test_store_creates_the_sqlite_folder(tmp_path: Path) -> None:
    db_file = tmp_path / "deep" / "er" / "p.db"
    with ProfileStore(f"sqlite:///{db_file}"):
        pass
    assert db_file.is_file()


def test_in_memory_database_is_one_database_across_threads(profile: HardwareProfile) -> None:
    from concurrent.futures import ThreadPoolExecutor

    with ProfileStore("sqlite://") as memory:
        profile_id = memory.add(profile)
        with ThreadPoolExecutor(max_workers=1) as pool:
            assert pool.submit(memory.get, profile_id).result() == profile


def test_row_columns_copy_the_profile(store: ProfileStore, profile: HardwareProfile) -> None:
    profile_id = store.add(profile, name="label")
    with Session(store.engine) as session:
        row = session.get_one(ProfileRow, profile_id)
        assert (row.device_kind, row.device_name, row.device_count) == ("cuda", "NVIDIA H100 80GB HBM3", 8)
        assert (row.torch_version, row.cuda_version, row.nccl_version) == ("2.13.0+cu128", "12.8", "2.27.3")
        assert json.loads(row.hosts) == ["node-a"]
        assert row.profile_schema_version == PROFILE_SCHEMA_VERSION
        assert row.created == "2025-06-01T12:00:00+00:00"
        assert HardwareProfile.model_validate_json(row.body) == profile


def test_get_unknown_id(store: ProfileStore) -> None:
    error = _raised(lambda: store.get("0" * 32))
    assert error.field == "id"
    assert "no profile with id '00000000000000000000000000000000'" in str(error)


def test_get_refuses_a_stored_profile_of_another_schema_version(store: ProfileStore, profile: HardwareProfile) -> None:
    profile_id = store.add(profile)
    stale_body = json.dumps(profile.model_dump(mode="json") | {"schema_version": 0})
    with Session(store.engine) as session, session.begin():
        session.execute(update(ProfileRow).values(body=stale_body, profile_schema_version=0))
    error = _raised(lambda: store.get(profile_id))
    assert error.field == "schema_version"
    assert "profile schema version 0 is not this paraplan's" in str(error)


def test_add_refuses_a_created_time_that_is_not_iso(store: ProfileStore, profile: HardwareProfile) -> None:
    error = _raised(lambda: store.add(profile.model_copy(update={"created": "yesterday"})))
    assert error.field == "created"
    assert store.summaries() == []


def test_summaries_newest_first_with_fields(store: ProfileStore, profile: HardwareProfile) -> None:
    cpu = profile.model_copy(
        update={
            "device_kind": "cpu",
            "device_name": "AMD EPYC",
            "device_count": 2,
            "cuda_version": None,
            "nccl_version": None,
            "layers": profile.layers[:1],
            "collectives": [],
            "created": "2025-06-02T09:00:00Z",
        }
    )
    # 14:00 at +02:00 is 12:00 UTC: one hour before the profile below, though its text sorts after it.
    middle = profile.model_copy(update={"created": "2025-06-01T13:00:00+00:00"})
    oldest = profile.model_copy(update={"created": "2025-06-01T14:00:00+02:00"})
    ids = {"oldest": store.add(oldest, name="old"), "cpu": store.add(cpu), "middle": store.add(middle)}
    summaries = store.summaries()
    assert [s.id for s in summaries] == [ids["cpu"], ids["middle"], ids["oldest"]]
    assert summaries[0] == ProfileSummary(
        id=ids["cpu"],
        name=None,
        created="2025-06-02T09:00:00+00:00",
        device_kind="cpu",
        device_name="AMD EPYC",
        device_count=2,
        torch_version="2.13.0+cu128",
        cuda_version=None,
        nccl_version=None,
        num_layers=1,
        num_collectives=0,
    )
    assert (summaries[2].name, summaries[2].num_layers, summaries[2].num_collectives) == ("old", 2, 2)
    assert summaries[2].created == "2025-06-01T12:00:00+00:00"


def _hardware(profile: HardwareProfile) -> dict[str, Any]:
    return {
        "device_kind": profile.device_kind,
        "device_name": profile.device_name,
        "device_count": profile.device_count,
        "torch_version": profile.torch_version,
        "cuda_version": profile.cuda_version,
        "nccl_version": profile.nccl_version,
    }


def test_find_matching_same_hardware_and_software(store: ProfileStore, profile: HardwareProfile) -> None:
    profile_id = store.add(profile)
    assert store.find_matching(**_hardware(profile)) == profile_id


@pytest.mark.parametrize(
    "changed",
    [
        {"torch_version": "2.14.0+cu128"},
        {"device_count": 4},
        {"device_name": "NVIDIA H200"},
        {"nccl_version": None},
        {"cuda_version": "12.9"},
    ],
)
def test_find_matching_refuses_other_hardware_or_software(
    store: ProfileStore, profile: HardwareProfile, changed: dict[str, Any]
) -> None:
    store.add(profile)
    assert store.find_matching(**(_hardware(profile) | changed)) is None


def test_find_matching_none_matches_only_none(store: ProfileStore, profile: HardwareProfile) -> None:
    cpu = profile.model_copy(update={"device_kind": "cpu", "cuda_version": None, "nccl_version": None})
    cpu_id = store.add(cpu)
    store.add(profile.model_copy(update={"device_kind": "cpu"}))  # same, but with CUDA and NCCL versions
    assert store.find_matching(**_hardware(cpu)) == cpu_id


def test_find_matching_newest_wins(store: ProfileStore, profile: HardwareProfile) -> None:
    newer_id = store.add(profile.model_copy(update={"created": "2025-07-01T00:00:00+00:00"}))
    store.add(profile)  # stored later, measured earlier
    assert store.find_matching(**_hardware(profile)) == newer_id
    same_second_id = store.add(profile.model_copy(update={"created": "2025-07-01T00:00:00+00:00"}))
    assert store.find_matching(**_hardware(profile)) == same_second_id  # measured together: stored last wins


def test_find_matching_skips_profiles_of_another_schema_version(store: ProfileStore, profile: HardwareProfile) -> None:
    profile_id = store.add(profile)
    with Session(store.engine) as session, session.begin():
        session.execute(update(ProfileRow).where(ProfileRow.id == profile_id).values(profile_schema_version=0))
    assert store.find_matching(**_hardware(profile)) is None


def test_fresh_database_is_stamped_with_its_schema_version(store: ProfileStore) -> None:
    with Session(store.engine) as session:
        assert session.get_one(MetaRow, "schema_version").value == str(DATABASE_SCHEMA_VERSION)


def test_database_of_another_schema_version_is_refused(db_url: str, profile: HardwareProfile) -> None:
    with ProfileStore(db_url) as store:
        store.add(profile)
        with Session(store.engine) as session, session.begin():
            session.get_one(MetaRow, "schema_version").value = "0"
    error = _raised(lambda: ProfileStore(db_url))
    assert error.field == "database"
    assert f"has schema version 0, expected {DATABASE_SCHEMA_VERSION}" in str(error)


def test_a_file_that_is_not_a_database_is_refused(tmp_path: Path) -> None:
    not_db = tmp_path / "notes.db"
    not_db.write_text("these are my notes, not a database " * 100)
    error = _raised(lambda: ProfileStore(f"sqlite:///{not_db}"))
    assert error.field == "database"
    assert "cannot open database" in str(error)


def test_a_bad_database_url_is_refused() -> None:
    error = _raised(lambda: ProfileStore("not a url"))
    assert error.field == "database"


# ================================================================================================ references


def test_resolve_by_path(tmp_path: Path, profile: HardwareProfile, no_env: Path) -> None:
    path = save_profile_json(profile, tmp_path / "p.json")
    assert resolve_profile(str(path)) == profile
    assert not no_env.exists()  # resolving a file opens no database


def test_resolve_by_id_in_the_given_store(store: ProfileStore, profile: HardwareProfile) -> None:
    profile_id = store.add(profile)
    assert resolve_profile(profile_id, store) == profile
    assert resolve_profile(profile_id.upper(), store) == profile


def test_resolve_by_id_in_the_configured_database(
    monkeypatch: pytest.MonkeyPatch, db_url: str, profile: HardwareProfile
) -> None:
    with ProfileStore(db_url) as store:
        profile_id = store.add(profile)
    monkeypatch.setenv("PARAPLAN_DATABASE_URL", db_url)
    assert resolve_profile(profile_id) == profile


def test_resolve_by_id_in_the_default_sqlite_file(no_env: Path, profile: HardwareProfile) -> None:
    with ProfileStore() as store:
        profile_id = store.add(profile)
    assert (no_env / "paraplan.db").is_file()
    assert resolve_profile(profile_id) == profile


@pytest.mark.parametrize("ref", ["nowhere.json", "f" * 32, "not-an-id"])
def test_resolve_neither_file_nor_stored_id(store: ProfileStore, profile: HardwareProfile, ref: str) -> None:
    store.add(profile)
    error = _raised(lambda: resolve_profile(ref, store))
    assert error.field == "cluster.profile"
    assert str(error) == f"{ref!r} is neither a profile file nor a stored profile id"


def test_resolve_id_without_any_database(no_env: Path) -> None:
    error = _raised(lambda: resolve_profile(uuid.uuid4().hex))
    assert error.field == "cluster.profile"
    assert not no_env.exists()  # looking up an id creates no database


# ======================================================================================== environment defaults


def test_data_dir_from_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PARAPLAN_DATA_DIR", str(tmp_path / "mine"))
    monkeypatch.delenv("PARAPLAN_DATABASE_URL", raising=False)
    assert default_data_dir() == tmp_path / "mine"
    assert default_database_url() == f"sqlite:///{tmp_path / 'mine' / 'paraplan.db'}"
    assert not (tmp_path / "mine").exists()


def test_data_dir_defaults_to_the_users_share_folder(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("PARAPLAN_DATA_DIR", raising=False)
    monkeypatch.delenv("PARAPLAN_DATABASE_URL", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert default_data_dir() == tmp_path / ".local" / "share" / "paraplan"
    assert default_database_url() == f"sqlite:///{tmp_path}/.local/share/paraplan/paraplan.db"


def test_database_url_from_environment(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, profile: HardwareProfile
) -> None:
    url = f"sqlite:///{tmp_path / 'elsewhere' / 'profiles.db'}"
    monkeypatch.setenv("PARAPLAN_DATABASE_URL", url)
    monkeypatch.setenv("PARAPLAN_DATA_DIR", str(tmp_path / "unused"))
    assert default_database_url() == url
    with ProfileStore() as store:
        assert store.url == url
        store.add(profile)
    assert (tmp_path / "elsewhere" / "profiles.db").is_file()
    assert not (tmp_path / "unused").exists()


def test_importing_the_store_imports_no_torch() -> None:
    code = "import sys, profiler.store; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).parents[2]).returncode == 0
