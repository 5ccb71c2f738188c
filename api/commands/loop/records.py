"""A validation's files and rows: runs.json (written as the runs go, read back by `--runs`), and a measured run as the
database stores it."""

from __future__ import annotations

import json
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from api.commands.loop.compare import own_profile, trained_request
from api.commands.loop.runs import PlanRun
from api.commands.loop.setup import ValidationSetup, estimate_of
from api.commands.loop.techniques import entry_setup
from api.errors import InputError
from api.store import ApiStore, MeasuredRunRow, new_id, utc_now
from planner.describe import describe_plan_compact
from planner.request import parse_estimate_request
from planner.specs import HardwareProfile, ParallelPlan
from profiler.worker import write_json_atomically


def run_record(run: PlanRun, setup: ValidationSetup) -> dict[str, Any]:
    """A run as runs.json keeps it: what it measured, with the full request it trained."""
    return {**asdict(run), "plan": run.plan.model_dump(mode="json"), "request": trained_request(run, setup),
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
        try:
            own_setup = entry_setup(setup, run.technique)  # a technique entry trains its own model or precision
        except ValueError as error:
            raise InputError.at("--runs", f"{where}: {error}") from error
        _require_same_setup(trained[number], own_setup, run.plan, where)
        _require_same_count(record, "steps", setup.steps, where)
        _require_same_count(record, "passes", setup.passes, where)  # the report counts each plan's runs from it
        try:
            own = own_profile(run)  # a paired validation's run is estimated from its own profile
        except ValueError as error:
            raise InputError.at("--runs", f"{where}: {error}") from error
        estimated.append(replace(run, estimate=estimate_of(own_setup, run.plan, own or profile)))
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
        technique=record.get("technique"),
        request=record["request"],
    )


def _require_same_setup(trained: Any, setup: ValidationSetup, plan: ParallelPlan, where: str) -> None:
    """The request a run trained is the one this setup asks of its plan: same model, training and cluster."""
    asked = parse_estimate_request(setup.request(plan))
    for part in ("model", "training", "cluster"):
        if getattr(trained, part) != getattr(asked, part):
            raise InputError.at(
                "--runs",
                f"{where} ({describe_plan_compact(plan)}) trained another {part} than this validation's: "
                f"{getattr(trained, part).model_dump(exclude_defaults=True)}; give the flags it was run with",
            )


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


PROFILE_FILE, CALIBRATED_PROFILE_FILE, RUNS_FILE = "profile.json", "calibrated-profile.json", "runs.json"


def store_runs(store: ApiStore, records: list[dict[str, Any]], validation_id: str, job_id: str | None) -> None:
    """Every run of runs.json that ran, as the database's measured runs of the validation (each plan once, with
    all its steps). The one way a validation's runs reach the database: from the CLI's loop as from a job's
    files when its process ends."""
    for record in records:
        if record["measured_s"] is not None:
            store.add_measured_run(measured_run_row(record, validation_id, job_id))


def store_calibrated(
    store: ApiStore, profile: HardwareProfile, validation_id: str, profile_id: str | None = None
) -> str:
    """The calibrated profile as a stored profile (under `profile_id`, a job's id, when given); its id."""
    return store.profiles.add(profile, name=f"calibrated by validation {validation_id}", profile_id=profile_id)
