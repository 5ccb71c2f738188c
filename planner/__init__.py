"""paraplan's planner: specs, presets, the cost model and the search. Pure Python; imports no torch."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from planner.request import EstimateRequest
    from planner.specs import StepEstimate


def estimate(request: dict[str, Any] | EstimateRequest) -> StepEstimate:
    """Predict one training step of the contract's request (with `plan`). See planner.cost.step."""
    from planner.cost.step import estimate_request

    return estimate_request(request)


__all__ = ["estimate"]
