"""Errors the planner raises. Everything else is a bug. (`Violation`, one broken rule, is a spec: planner/specs.)"""

from __future__ import annotations

from typing import Any

from planner.specs.plan import Violation  # re-exported: rules and the API name it from here


class _PicklableError(ValueError):
    """An error that survives pickling (the service's search workers send the planner's errors back to the server).
    An exception pickles as `(its class, its args)` plus its attributes, and unpickling calls the class with those
    args: here only the message, which constructors taking more than the message refuse. Rebuilt without calling
    `__init__`, then given its attributes back."""

    def __reduce__(self) -> tuple[Any, ...]:
        return _rebuilt, (type(self), self.args), self.__dict__


def _rebuilt(cls: type[ValueError], args: tuple[Any, ...]) -> ValueError:
    return cls.__new__(cls, *args)


class InfeasiblePlanError(_PicklableError):
    """This plan cannot run on this model, training setup and cluster.

    `reason` is a stable code (e.g. "invalid_plan"); `violations` names every broken rule, not just the first,
    so a user fixes a request in one round trip. The search prunes on this error; the API answers 422 with it.
    """

    def __init__(self, reason: str, violations: list[Violation]):
        self.reason = reason
        self.violations = list(violations)
        lines = "\n".join(f"  - {v}" for v in self.violations)
        super().__init__(f"{reason}: {len(self.violations)} rule(s) broken\n{lines}")

    def to_dict(self) -> dict[str, object]:
        return {
            "reason": self.reason,
            "violations": [{"field": v.field, "code": v.code, "message": v.message} for v in self.violations],
        }


class UnknownPresetError(_PicklableError):
    """A preset name that does not exist; the message lists the closest known names."""

    def __init__(self, kind: str, name: str, known: list[str]):
        import difflib

        self.kind, self.name = kind, name
        close = difflib.get_close_matches(name.lower(), known, n=5, cutoff=0.4)
        hint = f" Closest: {', '.join(close)}." if close else ""
        super().__init__(f"unknown {kind} preset {name!r}.{hint} Known: {', '.join(sorted(known))}.")
        self.closest = close


__all__ = ["InfeasiblePlanError", "UnknownPresetError", "Violation"]
