"""paraplan's planner: specs, presets, the cost model and the search. Pure Python; imports no torch."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from planner.request import EstimateRequest
    from planner.specs import StepEstimate


def estimate(request: dict[str, Any] | EstimateRequest, resolve_profile: Any = None) -> StepEstimate:
    """Predict one training step of the contract's request (with `plan`). See planner/estimates.py."""
    from planner.estimates import estimate_request

    return estimate_request(request, resolve_profile)


def __getattr__(name: str) -> Any:
    """`planner.search(request)`: the search package, imported on first use (PEP 562) and callable."""
    if name == "search":
        import planner.search

        return planner.search
    raise AttributeError(f"module 'planner' has no attribute {name!r}")


__all__ = ["estimate", "search"]
