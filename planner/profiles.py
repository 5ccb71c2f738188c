"""HardwareProfile files: the JSON form of a profile, read and written with checks that name what is wrong.

Pure pydantic + json, so the planner can read the profile a request names (`cluster.profile`) without the
profiler; profiler/store.py adds the database form.
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from planner.specs import PROFILE_SCHEMA_VERSION, HardwareProfile


class ProfileError(ValueError):
    """Bad profile input (a file, a stored row, a reference, a database URL); ``field`` names what is wrong.

    A ValueError like the planner's own input errors, so the CLI and the API report it as bad input.
    """

    def __init__(self, message: str, field: str = "profile"):
        super().__init__(message)
        self.field = field


# ================================================================================================= JSON files


def save_profile_json(profile: HardwareProfile, path: str | Path) -> Path:
    """Write ``profile`` to ``path`` (parent folders created) and return the path.

    Atomic (a temporary file in the same folder, then ``os.replace``), so a reader never sees half a profile and
    an interrupted write leaves any earlier file intact.
    """
    require_profile(profile)
    path = Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    # A name of our own (not tempfile's, which would leave the file readable by its owner alone).
    tmp_path = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp")
    try:
        with tmp_path.open("x", encoding="utf-8") as f:
            f.write(profile.model_dump_json(indent=2) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise
    return path


def load_profile_json(path: str | Path) -> HardwareProfile:
    """The profile in ``path``; ProfileError saying what is wrong for anything that is not one of this version."""
    path = Path(path).expanduser()
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ProfileError(f"no profile file at {path}") from None
    except (OSError, UnicodeDecodeError) as error:
        raise ProfileError(f"cannot read profile file {path}: {error}") from error
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise ProfileError(f"{path} is not JSON: {error}") from error
    return profile_from_data(data, where=str(path))


def profile_from_data(data: Any, where: str = "profile") -> HardwareProfile:
    """Validate decoded JSON as a HardwareProfile of this paraplan's schema version; ``where`` names the source
    in messages (a file path, a stored id)."""
    if not isinstance(data, dict):
        raise ProfileError(f"{where} holds a JSON {type(data).__name__}, not a profile object")
    _check_profile_version(data.get("schema_version"))
    try:
        return HardwareProfile.model_validate(data)
    except ValidationError as error:
        raise _validation_error(error, where) from error


def _check_profile_version(version: Any) -> None:
    """Refuse before field validation: another version's fields may mean something else, and the version is
    the one thing to tell a user whose profile is merely old."""
    if version is None:
        raise ProfileError(
            f"profile has no schema_version; this paraplan reads version {PROFILE_SCHEMA_VERSION}; measure again",
            field="schema_version",
        )
    # `type(...) is int`: True == 1 in Python, and a boolean is not a version.
    if type(version) is not int or version != PROFILE_SCHEMA_VERSION:
        raise ProfileError(
            f"profile schema version {version!r} is not this paraplan's ({PROFILE_SCHEMA_VERSION}); measure again",
            field="schema_version",
        )


def _validation_error(error: ValidationError, where: str) -> ProfileError:
    """One ProfileError for all of pydantic's complaints: ``field`` is the first one's dotted location, the
    message lists every one so a hand-edited file is fixed in one round trip."""
    problems = error.errors()
    locations = [".".join(str(part) for part in problem["loc"]) or "profile" for problem in problems]
    lines = "; ".join(f"{loc}: {problem['msg']}" for loc, problem in zip(locations, problems, strict=True))
    return ProfileError(f"{where} is not a valid profile: {lines}", field=locations[0] if locations else "profile")


def require_profile(profile: Any) -> None:
    """ProfileError unless `profile` is a HardwareProfile (callers outside pydantic can pass anything)."""
    if not isinstance(profile, HardwareProfile):
        raise ProfileError(f"expected a HardwareProfile, got {type(profile).__name__}")
