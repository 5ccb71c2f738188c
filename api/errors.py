"""One error body for every bad input: `{"error": {"kind", "message", "fields" | "violations", ...}}`, printed by
the command line (`--json`) and answered by the REST service with the HTTP status of its kind.

No FastAPI or torch here: the command line imports this module.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

FlagFor = Callable[[str], str | None]

HTTP_STATUS = {
    "invalid_request": 422,
    "missing_input": 422,
    "invalid_plan": 422,
    "unknown_preset": 422,
    "bad_profile": 422,
    "bad_input": 422,
    "run_refused": 422,
    "unauthorized": 401,
    "forbidden": 403,
    "disabled": 403,
    "not_found": 404,
    "method_not_allowed": 405,
    "conflict": 409,
    "too_large": 413,
    "unsupported_media_type": 415,
    "not_ready": 503,
    "unavailable": 503,
    "internal": 500,
}


class InputError(ValueError):
    """Input rejected at the edge before the planner sees it: unreadable files, bad JSON, missing fields.

    A ValueError like the planner's own errors, so one `except ValueError` reports every kind of bad input.
    """

    def __init__(self, message: str, kind: str = "bad_input", fields: list[dict[str, Any]] | None = None):
        super().__init__(message)
        self.kind, self.fields = kind, fields or []

    @classmethod
    def at(cls, field: str, message: str, kind: str = "bad_input") -> InputError:
        """An error about one field."""
        return cls(f"{field}: {message}", kind, [{"field": field, "message": message}])


# What an InfeasiblePlanError's reason means, for people; any other reason is an invalid plan.
_INFEASIBLE_MESSAGES = {"not_expressible": "the target stack cannot run this plan as given"}


def error_payload(exc: ValueError, flag_for: FlagFor | None = None) -> dict[str, Any]:
    """The machine-readable form of a bad-input error. ``flag_for`` (the command line's) adds the flag that
    sets each field named. Anything but the known kinds is a bug and is raised again, traceback and all."""
    from pydantic import ValidationError

    from planner.errors import InfeasiblePlanError, UnknownPresetError
    from planner.profiles import ProfileError

    if isinstance(exc, InputError):
        return {"kind": exc.kind, "message": str(exc), **({"fields": exc.fields} if exc.fields else {})}
    if isinstance(exc, InfeasiblePlanError):
        details = exc.to_dict()
        message = _INFEASIBLE_MESSAGES.get(exc.reason, "plan is invalid for this setup")
        return {"kind": "invalid_plan", "reason": details["reason"], "message": message,
                "violations": details["violations"]}  # fmt: skip
    if isinstance(exc, UnknownPresetError):
        return {"kind": "unknown_preset", "message": str(exc), "closest": exc.closest}
    if isinstance(exc, ProfileError):
        return {"kind": "bad_profile", "message": str(exc), "fields": [{"field": exc.field, "message": str(exc)}]}
    if isinstance(exc, ValidationError):
        return _validation_payload(exc, flag_for)
    return _runner_payload(exc)


def _runner_payload(exc: ValueError) -> dict[str, Any]:
    """Errors of the executor and profiler (imported only here: neither is needed to report planner errors)."""
    from executor.launch import LaunchError
    from executor.prepare import RunRefused
    from profiler.compute import ComputeSweepError

    if isinstance(exc, RunRefused):
        violations = [{"field": v.field, "code": v.code, "message": v.message} for v in exc.violations]
        return {"kind": "run_refused", "message": "cannot start this training run", "violations": violations}
    if isinstance(exc, ComputeSweepError):
        return {"kind": "bad_input", "message": str(exc), "fields": [{"field": exc.field, "message": str(exc)}]}
    if isinstance(exc, LaunchError):
        return {"kind": "bad_input", "message": str(exc)}
    raise exc


def _validation_payload(exc: Any, flag_for: FlagFor | None) -> dict[str, Any]:
    from planner.errors import UnknownPresetError

    errors = exc.errors()
    # The request layer resolves preset names inside validators, so pydantic wraps UnknownPresetError.
    presets = [e["ctx"]["error"] for e in errors if isinstance(e.get("ctx", {}).get("error"), UnknownPresetError)]
    if presets and len(presets) == len(errors):
        return {"kind": "unknown_preset", "message": "\n".join(str(p) for p in presets),
                "closest": [name for p in presets for name in p.closest]}  # fmt: skip
    fields = [field for error in errors for field in validation_fields(error, flag_for)]
    return {"kind": "invalid_request", "message": "invalid request", "fields": fields}


def validation_fields(error: dict[str, Any], flag_for: FlagFor | None = None, prefix: str = "") -> list[dict[str, Any]]:
    """One entry per problem of one pydantic error. The specs join several rules broken at once into one
    ValueError ("plan.tp: ...; plan.schedule: ..."); split them so each names its own field. A rule of the whole
    request (one that relates two sections, such as the precision and the GPU) has no location of its own: its
    message names the field."""
    where = ".".join(str(part) for part in (*([prefix] if prefix else []), *error["loc"]) if not _union_tag(part))
    entries = []
    for part in error["msg"].removeprefix("Value error, ").split("; "):
        field, message = where, part
        head, sep, rest = part.partition(": ")
        names_field = head.startswith(f"{where}.") if where else "." in head
        if sep and names_field and " " not in head:
            field, message = head, rest
        entry = {"field": field or "(request)", "message": message}
        if flag_for is not None:
            entry["flag"] = flag_for(field)
        entries.append(entry)
    return entries


def _union_tag(part: Any) -> bool:
    """A part of a location that names the member of a union a value was tried as (`str`, `dict[str,any]`,
    `function-after[_text(), str]`) rather than a field: pydantic's tags of types, never a field name here."""
    return isinstance(part, str) and (part in {"str", "int", "float", "bool"} or "[" in part)


def error_text(payload: dict[str, Any]) -> str:
    """The human-readable form of an error payload."""
    if "violations" in payload:
        lines = [f"  - {v['field']}: {v['message']}" for v in payload["violations"]]
    elif "fields" in payload:
        lines = [f"  - {f['field']}{_flag_hint(f)}: {f['message']}" for f in payload["fields"]]
    else:
        return f"error: {payload['message']}"
    return "\n".join([f"error: {payload['message']}:", *lines])


def _flag_hint(field: dict[str, Any]) -> str:
    flag = field.get("flag")
    return f" ({flag})" if flag and flag not in field["message"] else ""
