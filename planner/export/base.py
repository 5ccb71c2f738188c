"""What every exporter shares: the record of one export, the exporter's description, and a refusal.

An exporter turns one plan (an EstimateRequest: model, training, cluster and plan) into the configuration a
training stack reads. It never writes a configuration that would run something other than the plan: what the
stack cannot express is a `Violation` naming the plan's field and why, and the export is refused whole
(`InfeasiblePlanError` with reason `not_expressible`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from planner.errors import Violation

if TYPE_CHECKING:
    from planner.request import EstimateRequest

NOT_EXPRESSIBLE = "not_expressible"


@dataclass(frozen=True)
class Rendered:
    """An exporter's output: the file's text and what the user must still set in code (the plan needs it, the
    file format has no key for it)."""

    text: str
    notes: tuple[str, ...] = ()


@dataclass(frozen=True)
class Exporter:
    """One target: the training stack (`framework`, the contract's `training.framework` whose cost regime an
    exported plan is estimated under), what it cannot express, and how it writes the plan."""

    target: str
    filename: str
    media_type: str
    framework: Callable[[EstimateRequest], str]
    refusals: Callable[[EstimateRequest], list[Violation]]
    render: Callable[[EstimateRequest], Rendered]


@dataclass(frozen=True)
class Export:
    """One exported plan: the file, the stack that reads it, and the request (with that stack as its
    `training.framework`) whose estimate describes it."""

    target: str
    framework: str
    filename: str
    media_type: str
    text: str
    request: EstimateRequest
    notes: tuple[str, ...] = field(default=())


def cannot(target: str, plan_field: str, why: str) -> Violation:
    """A refusal: `target` has no way to run what `plan_field` asks, and why."""
    return Violation(plan_field, f"{target}_cannot_express", f"{target}: {why}")


def with_framework(req: EstimateRequest, framework: str) -> EstimateRequest:
    """`req` run by `framework`: the same plan, estimated under that stack's regime (planner/cost/runtime.py).
    pydantic's model_copy keeps the private `_measured` profile costs."""
    if req.training.framework == framework:
        return req
    training = req.training.model_copy(update={"framework": framework})
    return req.model_copy(update={"training": training})


def fixed(framework: str) -> Callable[[EstimateRequest], str]:
    """The `framework` of an exporter whose stack does not depend on the plan."""
    return lambda req: framework
