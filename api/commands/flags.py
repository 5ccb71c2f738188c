"""The commands' refusals name the option at fault by its command-line flag (`--warm-steps`), the form people type;
a REST job renames each flag to its body field (`warm_steps`, api/jobs/profile.py `renamed_error`)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from api import errors

# ComputeSweep's fields -> the `profile compute` flag that sets each, for refusals.
SWEEP_FLAGS = {"seq_lens": "--seq-len", "micro_batch_sizes": "--mbs", "tps": "--tp", "recompute_modes": "--recompute"}


def flag_name(parameter: str) -> str:
    return "--" + parameter.replace("_", "-")


def error_payload(exc: ValueError, flag_for_field: Callable[[str], str | None] | None = None) -> dict[str, Any]:
    """The machine-readable form of a bad-input error (the `error` object of `--json` output), naming the flag
    that sets each field at fault. Anything but the known kinds is a bug and is raised again."""
    from profiler.compute import ComputeSweepError

    if isinstance(exc, ComputeSweepError):  # a sweep field is set by exactly one flag: name the flag
        flag = exc.field if exc.field.startswith("--") else SWEEP_FLAGS.get(exc.field, flag_name(exc.field))
        return {"kind": "bad_input", "message": str(exc), "fields": [{"field": flag, "message": str(exc)}]}
    return errors.error_payload(exc, flag_for_field)
