"""`search.memory_safety`: plans that fit even at the upper memory band of their regime (planner/uncertainty.py).

A plan's estimated peak is multiplied by the band's upper ratio (the 95th percentile of measured / predicted peak
over the regime's measured runs) before it is held to the memory limit; equivalently, the estimated peak is held
to the limit divided by that ratio. The factor never goes below 1: a regime whose runs all peaked under their
estimates would otherwise loosen the limit, and the option only ever asks for more headroom.
"""

from __future__ import annotations

from dataclasses import dataclass

from planner.request import PlanRequest
from planner.uncertainty import memory_band, scale_of
from planner.units import GiB


@dataclass(frozen=True)
class MemorySafety:
    factor: float  # the estimated peak x this must fit the limit (1: no safety asked, or no band to take it from)
    notes: list[str]  # what the search did about memory_safety, for the result

    def rejection(self, limit_bytes: float) -> str:
        """Why a plan that fits at its estimated peak was left out."""
        return (
            f"fits at its estimated peak but not at its upper memory band: peak x {self.factor:.3f} above the limit "
            f"of {limit_bytes / GiB:.2f} GiB (search.memory_safety)"
        )


def memory_safety(req: PlanRequest) -> MemorySafety:
    """The factor `req`'s search holds estimated peaks to, and a note saying where it came from."""
    if not req.search.memory_safety:
        return MemorySafety(1.0, [])
    regime, num_nodes = req.runtime.name, req.cluster.num_nodes
    where = f"regime {regime} on {scale_of(num_nodes)}"
    band = memory_band(regime, num_nodes)
    if band is None or band.high_ratio is None:
        return MemorySafety(1.0, [
            f"search.memory_safety: {where} has no memory band (no validated run of it measured its peak "
            "memory), so plans are held to their estimated peak alone"
        ])  # fmt: skip
    factor = max(1.0, band.high_ratio)
    return MemorySafety(factor, [
        f"search.memory_safety: each plan's estimated peak x {factor:.3f} must fit (the upper memory band of "
        f"{where}: {band.basis})"
    ])  # fmt: skip
