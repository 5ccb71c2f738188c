"""What the user hands a command, read at the edge: JSON objects from files or inline text, and the model, given
as a preset name, a ModelSpec (JSON), a Hugging Face config.json or a Hub id. Errors are InputError naming the
source."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from api import errors
from api.commands.hub import hub_config_path, looks_like_hub_id
from api.errors import InputError


def model_from_flag(value: str) -> Any:
    """`--model`: inline JSON (`{...}`), a JSON file (a ModelSpec or a Hugging Face config.json, or a folder
    holding config.json), a Hugging Face Hub id (`owner/name`, no such file: api/commands/hub.py), or else a preset
    name, which the request layer resolves."""
    if value.lstrip().startswith("{"):
        return model_from_json(parse_json_object(value, "--model"), "--model", default_name=None)
    if looks_like_hub_id(value):
        return model_from_json(read_json_object(hub_config_path(value)), value, default_name=value)
    path = Path(value)
    if value.endswith(".json") or "/" in value or path.is_dir():
        if path.is_dir():
            path = path / "config.json"
        default_name = path.parent.name if path.name == "config.json" else path.stem
        return model_from_json(read_json_object(path), str(path), default_name=default_name or None)
    return {"name": value}


def is_hf_config(config: dict[str, Any]) -> bool:
    """A Hugging Face config.json names its class; a ModelSpec never has these keys."""
    return "model_type" in config or "architectures" in config


def model_from_json(config: dict[str, Any], source: str, default_name: str | None) -> dict[str, Any]:
    if not is_hf_config(config):
        return config  # a ModelSpec (or a preset with overrides): the request layer validates it
    from pydantic import ValidationError

    from planner.presets import model_from_hf_config

    try:
        model = model_from_hf_config(config)
    except ValidationError as exc:
        problems = "; ".join(f"{f['field']}: {f['message']}" for e in exc.errors() for f in errors.validation_fields(e))
        raise InputError(f"{source}: not a usable Hugging Face config: {problems}") from None
    except ValueError as exc:
        raise InputError(f"{source}: not a usable Hugging Face config: {exc}") from None
    if model.name is None and default_name:
        model = model.model_copy(update={"name": default_name})
    return model.model_dump()


def read_text(path: Path) -> str:
    try:
        return path.read_text()
    except FileNotFoundError:
        raise InputError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: cannot read: {exc}") from None


def parse_json_object(text: str, source: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InputError(f"{source}: not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise InputError(f"{source}: expected a JSON object, got {type(value).__name__}")
    return value


def read_json_object(path: Path) -> dict[str, Any]:
    return parse_json_object(read_text(path), str(path))


def parse_int_list(flag: str, text: str) -> tuple[int, ...]:
    """ "1,2,4" -> (1, 2, 4); InputError naming the flag for anything else."""
    try:
        values = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise InputError(f"{flag}: expected comma-separated integers, got {text!r}") from None
    if not values:
        raise InputError(f"{flag}: give at least one value")
    return values


def model_spec(value: str | dict[str, Any], field: str = "model") -> Any:
    """A preset name or a ModelSpec (with a preset's overrides) -> the full ModelSpec; never a file (what a REST body
    may name). InputError naming `field` and the model's field at fault."""
    from pydantic import ValidationError

    from planner.request import resolve_model
    from planner.specs import ModelSpec

    try:
        return ModelSpec.model_validate(resolve_model(value))
    except ValidationError as error:
        problem = error.errors()[0]
        where = ".".join([field, *map(str, problem["loc"])])
        raise InputError.at(where, problem["msg"]) from None
