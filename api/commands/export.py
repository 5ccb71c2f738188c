"""`export`: a plan as the configuration of the stack that runs it (planner/export), with the estimate of the plan
under that stack's regime. The plan is a contract request with `plan` (for a stored search's plan, the request that
api/service.py `stored_plan_request` makes of it); the CLI and the REST route both call this."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from api.commands.estimate import ProfileResolver, parse, resolve_profile
from api.errors import InputError

if TYPE_CHECKING:
    from planner.export import Export
    from planner.specs import StepEstimate


@dataclass(frozen=True)
class ExportAnswer:
    """The exported file and the estimate of the plan it runs, under the target's stack."""

    export: Export
    estimate: StepEstimate

    def to_json(self) -> dict[str, Any]:
        """The answer of `paraplan export --json` and `GET /v1/plans/{id}/export`."""
        export = self.export
        return {"to": export.target, "framework": export.framework, "filename": export.filename,
                "media_type": export.media_type, "content": export.text, "notes": list(export.notes),
                "request": export.request.model_dump(mode="json"),
                "estimate": self.estimate.model_dump(mode="json")}  # fmt: skip


def require_target(to: str) -> str:
    """`to` if it names an exporter; InputError naming `to` (with the known targets) otherwise."""
    from planner.export import TARGETS

    if to not in TARGETS:
        raise InputError.at("to", f"unknown export target {to!r}; one of {', '.join(TARGETS)}")
    return to


def export(request: dict[str, Any], to: str, resolve: ProfileResolver = resolve_profile) -> ExportAnswer:
    """`request`'s plan exported to `to`; ValueError naming the field at fault (InputError for `to`,
    InfeasiblePlanError `not_expressible` for what the target cannot run)."""
    import planner
    from planner.export import export_plan

    require_target(to)
    exported = export_plan(parse(request, "estimate", resolve), to)
    return ExportAnswer(exported, planner.estimate(exported.request))
