"""The public surfaces, pinned (issue 27, item 5): the CLI's commands and options, and the REST API's OpenAPI
schema. A change to either fails here with a diff, so that it is made on purpose; after a deliberate change,
regenerate the snapshots with

    PARAPLAN_UPDATE_SNAPSHOTS=1 python -m pytest tests/api/test_surfaces.py

and commit them with the change."""

from __future__ import annotations

import difflib
import json
import os
from pathlib import Path
from typing import Any

import pytest
import typer

from api.app import create_app
from api.cli import app as cli_app
from api.settings import Settings

SNAPSHOTS = Path(__file__).resolve().parent / "snapshots"
UPDATE_ENV = "PARAPLAN_UPDATE_SNAPSHOTS"


def option_record(parameter: Any) -> dict[str, Any]:
    """What a user of an option depends on: its spelling, type, default and whether it must be given (not its
    help text, which may be reworded freely)."""
    record: dict[str, Any] = {
        "name": parameter.name,
        "kind": parameter.param_type_name,  # argument or option
        "flags": [*parameter.opts, *parameter.secondary_opts],
        "type": _type_name(parameter.type_descriptor.annotation),
        "required": parameter.required,
        "default": None if callable(parameter.default) else _jsonable(parameter.default),
    }
    for bound in ("min", "max"):
        if getattr(parameter, bound, None) is not None:
            record[bound] = getattr(parameter, bound)
    if getattr(parameter, "hidden", False):
        record["hidden"] = True
    return record


def _type_name(annotation: Any) -> str:
    """`int`, `pathlib.Path`: the option's type as the code spells it (typer has already taken `| None` off)."""
    if not isinstance(annotation, type):
        return str(annotation)
    module = "" if annotation.__module__ == "builtins" else annotation.__module__ + "."
    return module + annotation.__qualname__


def _jsonable(value: Any) -> Any:
    return value if isinstance(value, (str, int, float, bool, type(None))) else str(value)


def command_tree(command: Any) -> dict[str, Any]:
    """A command and, for a group, its subcommands by name, with their options in declaration order. (Duck-typed:
    typer builds its commands on a copy of click of its own.)"""
    tree: dict[str, Any] = {"options": [option_record(p) for p in command.params if p.name != "help"]}
    if hasattr(command, "commands"):
        tree["commands"] = {name: command_tree(sub) for name, sub in sorted(command.commands.items())}
    return tree


def cli_surface() -> dict[str, Any]:
    return command_tree(typer.main.get_command(cli_app))


def openapi_surface(tmp_path: Path) -> dict[str, Any]:
    return create_app(Settings.from_env(data_dir=tmp_path, api_token=None)).openapi()


def check_snapshot(name: str, surface: dict[str, Any]) -> None:
    """`surface` against tests/api/snapshots/<name>; rewritten instead when PARAPLAN_UPDATE_SNAPSHOTS is set."""
    path = SNAPSHOTS / name
    text = json.dumps(surface, indent=2, sort_keys=True) + "\n"
    if os.environ.get(UPDATE_ENV):
        path.write_text(text)
        return
    if not path.is_file():
        pytest.fail(f"{path} is missing; write it with {UPDATE_ENV}=1 python -m pytest {__file__}")
    expected = path.read_text()
    if text != expected:
        diff = "".join(difflib.unified_diff(expected.splitlines(True), text.splitlines(True), str(path), "now"))
        pytest.fail(
            f"the surface changed; if on purpose, regenerate with {UPDATE_ENV}=1 python -m pytest {__file__}\n{diff}",
            pytrace=False,
        )


def test_the_cli_commands_and_options_are_the_snapshot():
    check_snapshot("cli.json", cli_surface())


def test_the_openapi_schema_is_the_snapshot(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    for name in ("PARAPLAN_API_TOKEN", "PARAPLAN_MAX_JOBS", "PARAPLAN_MAX_REQUEST_BYTES", "PARAPLAN_DATABASE_URL"):
        monkeypatch.delenv(name, raising=False)
    check_snapshot("openapi.json", openapi_surface(tmp_path))
