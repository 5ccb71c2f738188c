"""Export a plan to the configuration of the stack that runs it: Megatron-LM's arguments, DeepSpeed's
ds_config.json, torchtitan's TOML, Accelerate's config YAML, or the contract's own request.

`export_plan(req, to)` checks the plan under the target's stack (planner/rules.py, with the target as
`training.framework`, then what the target's format cannot express) and refuses it whole, naming every field
and why, rather than write a configuration that would run another plan. The Export carries the request under
that stack, whose estimate (the stack's regime, planner/cost/runtime.py) describes what the file runs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from planner.errors import InfeasiblePlanError, Violation
from planner.export import accelerate, deepspeed, megatron, request, torchtitan
from planner.export.base import NOT_EXPRESSIBLE, Export, Exporter, with_framework
from planner.rules import FRAMEWORK_ZERO_RULE, plan_violations

if TYPE_CHECKING:
    from planner.request import EstimateRequest

EXPORTERS: dict[str, Exporter] = {
    module.EXPORTER.target: module.EXPORTER for module in (megatron, deepspeed, torchtitan, accelerate, request)
}
TARGETS: tuple[str, ...] = tuple(EXPORTERS)


class UnknownTargetError(ValueError):
    """An export target that does not exist."""

    def __init__(self, target: str):
        self.target = target
        super().__init__(f"unknown export target {target!r}; one of {', '.join(TARGETS)}")


def export_plan(req: EstimateRequest, to: str) -> Export:
    """`req`'s plan as `to`'s configuration; InfeasiblePlanError (`not_expressible`) naming every plan field the
    target cannot run, UnknownTargetError for an unknown `to`."""
    if to not in EXPORTERS:
        raise UnknownTargetError(to)
    exporter = EXPORTERS[to]
    under_stack = with_framework(req, exporter.framework(req))
    model, training, cluster = under_stack.model, under_stack.training, under_stack.cluster
    broken = plan_violations(under_stack.plan, model, training, cluster)
    if any(v.code != FRAMEWORK_ZERO_RULE for v in broken):  # the plan runs nowhere: not a question of the stack
        raise InfeasiblePlanError("invalid_plan", broken)
    violations = [*(_for_target(v, to) for v in broken), *exporter.refusals(under_stack)]
    if violations:
        raise InfeasiblePlanError(NOT_EXPRESSIBLE, violations)
    rendered = exporter.render(under_stack)
    return Export(target=to, framework=training.framework, filename=exporter.filename,
                  media_type=exporter.media_type, text=rendered.text, request=under_stack,
                  notes=rendered.notes)  # fmt: skip


def _for_target(violation: Violation, to: str) -> Violation:
    """A rule of the stack (its ZeRO stages) names the stack by its target, which is what the user asked for."""
    if to == "request":
        return violation
    return Violation(violation.field, violation.code, f"{to}: {violation.message}")


__all__ = ["EXPORTERS", "TARGETS", "Export", "UnknownTargetError", "export_plan"]
