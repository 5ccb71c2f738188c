"""What a plan search answers (the contract's plan-search response)."""

from __future__ import annotations

from typing import Literal

from planner.specs import Frozen, ParallelPlan, StepEstimate


class RankedPlan(Frozen):
    rank: int
    plan: ParallelPlan
    estimate: StepEstimate


class ClosestPlan(Frozen):
    """A candidate that does not fit, and by how much (when nothing fits)."""

    plan: ParallelPlan
    estimate: StepEstimate
    over_bytes: float  # peak bytes above the search's memory limit
    over_stage: int
    # Host bytes per node its CPU offload needs above a node's RAM (0: within it, or no offload).
    over_host_bytes: float = 0.0


class Rejection(Frozen):
    """Layouts (dp x tp x pp x cp) or candidates left out for one reason (a layout that breaks several rules
    counts under each)."""

    code: str
    level: Literal["layout", "candidate"]
    count: int
    example: str


class CandidateCounts(Frozen):
    layouts: int  # valid dp x tp x pp x cp factorizations
    enumerated: int  # candidates built from them
    evaluated: int  # costed exactly
    pruned_by_bound: int  # never costed: their lower bound was slower than the k-th best plan
    out_of_memory: int  # costed and over the memory limit
    over_memory_band: int = 0  # costed, under the limit, but over it at the upper memory band (search.memory_safety)
    over_host_memory: int = 0  # costed, but their CPU offload needs more than a node's RAM
    fits: int  # costed and within it
    partitioned: int  # leading candidates re-split by the layer-to-stage ILP


class TermComparison(Frozen):
    term: str
    winner_s: float
    runner_up_s: float
    difference_s: float  # runner-up minus winner: positive where the winner is faster


class Explanation(Frozen):
    summary: list[str]
    versus_runner_up: list[TermComparison]  # largest differences first
    binding_constraint: str


class SearchTiming(Frozen):
    enumerate_s: float
    evaluate_s: float
    partition_s: float
    total_s: float
    candidates_per_s: float  # enumerated candidates / total time


class SearchResult(Frozen):
    plans: list[RankedPlan]  # fastest first; empty when nothing fits
    closest: list[ClosestPlan]  # when nothing fits: the candidates nearest to fitting
    # What each plan's estimated peak is held to: max_memory_fraction x GPU memory / memory_safety_factor.
    memory_limit_bytes: float
    memory_safety_factor: float = 1.0  # with search.memory_safety: the regime's upper memory band (search/safety.py)
    counts: CandidateCounts
    rejected: list[Rejection]  # commonest first
    explanation: Explanation | None
    timing: SearchTiming
    notes: list[str] = []  # what the search assumed beyond the request (search.memory_safety)

    @property
    def found(self) -> bool:
        return bool(self.plans)
