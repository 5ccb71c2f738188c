"""The CLI is a thin front over the commands layer (issue 27, item 4): each command's options are checked here
against the options record the REST service uses too, and the imports keep their direction (nothing outside the
CLI imports it; rich stays in the CLI)."""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Any

import pytest
import typer

from api.cli import app
from api.cli.flags import FLAG_FIELDS
from api.cli.profile import options_of as profile_options_of
from api.cli.validate import options_of as validate_options_of
from api.commands.profile import OPTIONS as PROFILE_OPTIONS
from api.commands.train import TrainOptions
from api.commands.validate import ValidateOptions
from api.jobs.train import TrainJobOptions
from planner.request import EstimateRequest, PlanRequest
from planner.specs import FixedPlanFields

API = Path(__file__).resolve().parents[2] / "api"
CLI_ONLY = {"as_json"}  # how the CLI prints, not what the command does


def cli_defaults(*path: str) -> dict[str, Any]:
    """The options of `paraplan <path>` by parameter name, with their defaults."""
    command: Any = typer.main.get_command(app)
    for name in path:
        command = command.commands[name]
    return {parameter.name: parameter.default for parameter in command.params}


@pytest.mark.parametrize("command", ["estimate", "plan"])
def test_every_estimate_and_plan_flag_sets_a_field_of_the_request(command: str):
    """`estimate` and `plan` take the contract request (the REST body): each flag names one of its fields; `plan`
    keeps the plan flags as `search.fixed` fields."""
    record = EstimateRequest if command == "estimate" else PlanRequest
    flags = set(cli_defaults(command)) & set(FLAG_FIELDS)
    assert flags, command
    for flag in flags:
        section, field = FLAG_FIELDS[flag]
        if command == "plan" and section == "plan":
            assert field in FixedPlanFields.model_fields, flag
            continue
        assert field in record.model_fields[section].annotation.model_fields, (flag, section, field)  # type: ignore[union-attr]


def test_validate_takes_its_records_options_with_its_defaults(tmp_path: Path):
    defaults = cli_defaults("validate")
    assert set(defaults) - CLI_ONLY <= set(ValidateOptions.model_fields)
    given = {"nproc": 2, "out": tmp_path}
    from_cli = validate_options_of(defaults | given)
    assert from_cli.model_dump() == ValidateOptions(**given).model_dump()


@pytest.mark.parametrize("what", ["compute", "comm", "all"])
def test_profile_takes_its_records_options_with_its_defaults(what: str, tmp_path: Path):
    defaults = cli_defaults("profile", what)
    record = PROFILE_OPTIONS[what]
    assert set(defaults) <= set(record.model_fields), set(defaults) - set(record.model_fields)
    given = {"out": tmp_path / "profile.json"} | ({"model": "llama3-8b", "seq_len": "128"} if what != "comm" else {})
    from_cli = profile_options_of(what, defaults | given)
    expected = record.model_validate(
        given | ({"model": from_cli.model, "seq_len": (128,)} if what != "comm" else {})  # type: ignore[attr-defined]
    )
    assert from_cli.model_dump() == expected.model_dump()


@pytest.mark.parametrize("command", ["train", "launch-script"])
def test_train_and_launch_script_take_the_records_options_with_its_defaults(command: str):
    """Both write the run from a TrainOptions record; launch-script runs on GPUs by default, train here."""
    defaults = cli_defaults(command)
    shared = set(defaults) & set(TrainOptions.model_fields)
    assert set(TrainOptions.model_fields) - {"nproc"} <= shared
    for name in shared - {"steps", "out", "nproc", *(["device"] if command == "launch-script" else [])}:
        assert defaults[name] == TrainOptions.model_fields[name].default, name


def test_a_training_job_takes_the_records_defaults():
    """A training job's body (beside its request) sets the same options, with the same defaults; `data` names a
    text in the server's datasets folder instead of a path."""
    shared = set(TrainJobOptions.model_fields) & set(TrainOptions.model_fields) - {"data"}
    assert shared == {"steps", "nproc", "checkpoint_every", "lr", "warmup_steps", "seed", "device"}
    for name in shared - {"steps"}:
        assert TrainJobOptions.model_fields[name].default == TrainOptions.model_fields[name].default, name


def imported_modules(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def modules_outside(folder: str) -> list[Path]:
    return [path for path in API.rglob("*.py") if folder not in path.relative_to(API).parts[:1]]


def test_nothing_outside_the_cli_imports_it():
    offenders = {
        str(path.relative_to(API)): sorted(
            m for m in imported_modules(path) if m == "api.cli" or m.startswith("api.cli.")
        )
        for path in modules_outside("cli")
    }
    assert {path: names for path, names in offenders.items() if names} == {}


@pytest.mark.parametrize("package", ["commands", "loop"])
def test_the_commands_and_the_loop_draw_nothing(package: str):
    """Progress goes through a callback (api/commands/progress.py); rich is the CLI's."""
    offenders = {
        str(path.relative_to(API)): sorted(m for m in imported_modules(path) if m.split(".")[0] == "rich")
        for path in (API / package).rglob("*.py")
    }
    assert {path: names for path, names in offenders.items() if names} == {}
