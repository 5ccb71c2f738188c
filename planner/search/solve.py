"""The search: enumerate, cost best-first with a lower bound, balance the leaders' stages, rank and explain.

1. planner/search/space.py enumerates every candidate (numpy columns) and counts what it leaves out.
2. Every candidate gets a cheap lower bound on its step time (search/evaluate.py). Candidates are costed
   exactly in increasing order of that bound, a growing chunk at a time, until the k-th best plan that fits
   is faster than the next bound: nothing left can enter the top k (branch and bound).
3. The leading candidates with a pipeline get their layers re-split over stages by the partition ILP
   (search/partition.py), which moves layers off the stages that hold the embedding or LM head or more
   micro-batches; the re-split plan replaces the even split when it is faster or fits where that did not.
4. The top k are estimated in full; the answer says why the winner wins and what binds it.

With `search.memory_safety` every step holds the estimated peaks to the memory limit divided by the regime's upper
memory band (search/safety.py), and the plans that fit only at their point estimate are counted apart.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from planner.cost.step import TIME_TERMS, estimate_step
from planner.describe import describe_plan
from planner.request import PlanRequest, ProfileResolver, parse_plan_request
from planner.search.evaluate import OVER_FRACTION_DECIMALS, CandidateCosts, RowCosts
from planner.search.rank import LAYOUT_TIE_TOLERANCE, model_parallel_axes, simplest_first
from planner.search.result import (
    CandidateCounts,
    ClosestPlan,
    Explanation,
    RankedPlan,
    Rejection,
    SearchResult,
    SearchTiming,
    TermComparison,
)
from planner.search.safety import MemorySafety, memory_safety
from planner.search.space import Candidates, Rejections, search_space
from planner.specs import ParallelPlan, StepEstimate
from planner.units import GiB

FIRST_CHUNK = 4096  # candidates costed in the first round; each round doubles it
# A candidate is faster than the winner when its step time is shorter by more than rounding: the same plan's batched
# and scalar costs agree to 1e-12 (tests/unit/test_search.py), so a relative margin far above that and far below
# any real difference.
FASTER_RELATIVE = 1e-9


def search(request: dict[str, Any] | PlanRequest, resolve_profile: ProfileResolver | None = None) -> SearchResult:
    """The fastest plans that fit, ranked and explained (or, when none fits, the closest ones). With
    `cluster.profile`, from the measurements (`resolve_profile` finds it; default: a file path)."""
    req = parse_plan_request(request, resolve_profile)
    options = req.search
    started = time.perf_counter()
    candidates, rejected = search_space(req.model, req.training, req.cluster, options)
    enumerated = time.perf_counter()

    safety = memory_safety(req)
    # Every plan's estimated peak is held to this: the limit, less the headroom memory_safety asks for.
    limit = options.max_memory_fraction * req.cluster.gpu.memory_bytes / safety.factor
    if len(candidates) == 0:
        return _no_valid_candidate(rejected, limit, safety, time.perf_counter() - started)
    costs = CandidateCosts(req.model, req.training, req.cluster, candidates, req.measured, req.runtime)
    costed, pruned = _branch_and_bound(costs, limit, options.top_k, options.overlap_grad_reduce)
    evaluated = time.perf_counter()

    # The k fastest that fit; when none fits, the k nearest to fitting, which a re-split may yet make fit.
    leaders = _leaders(costed, candidates, limit, options.top_k)
    if len(leaders) == 0:
        leaders = costed.rows[costed.nearest_to_fitting(limit)[: options.top_k]]
    estimated = [_full(req, candidates.plan(int(r), options.overlap_grad_reduce)) for r in leaders]
    partitioned = 0
    if options.partition:
        from planner.search.balance import rebalance  # OR-Tools is imported only when the ILP runs

        estimated, partitioned = rebalance(req, estimated, limit)
    ranked = _rank(estimated, limit)[: options.top_k]
    finished = time.perf_counter()

    fits = costed.fits(limit)
    over_band = ~fits & ~costed.host_over & (costed.peak_bytes <= limit * safety.factor)
    return SearchResult(
        plans=[RankedPlan(rank=i + 1, plan=plan, estimate=est) for i, (plan, est) in enumerate(ranked)],
        closest=[] if ranked else _closest(estimated, limit),
        memory_limit_bytes=limit,
        memory_safety_factor=safety.factor,
        notes=safety.notes,
        counts=CandidateCounts(
            layouts=costs.num_layouts,
            enumerated=len(candidates),
            evaluated=len(costed.rows),
            pruned_by_bound=pruned,
            out_of_memory=int((~fits & ~over_band & ~costed.host_over).sum()),
            over_memory_band=int(over_band.sum()),
            over_host_memory=int(costed.host_over.sum()),
            fits=int(fits.sum()),
            partitioned=partitioned,
        ),
        rejected=_rejections(rejected, costed, limit, safety, pruned),
        explanation=_explain(ranked, candidates, costed, limit, options.overlap_grad_reduce) if ranked else None,
        timing=SearchTiming(
            enumerate_s=enumerated - started,
            evaluate_s=evaluated - enumerated,
            partition_s=finished - evaluated,
            total_s=finished - started,
            candidates_per_s=len(candidates) / max(finished - started, 1e-9),
        ),
    )


def _no_valid_candidate(rejected: Rejections, limit: float, safety: MemorySafety, elapsed_s: float) -> SearchResult:
    """Every layout breaks a structural rule: no plan, no closest candidate, and the reasons."""
    empty = RowCosts.concat([])
    return SearchResult(
        plans=[],
        closest=[],
        memory_limit_bytes=limit,
        memory_safety_factor=safety.factor,
        notes=safety.notes,
        counts=CandidateCounts(
            layouts=0, enumerated=0, evaluated=0, pruned_by_bound=0, out_of_memory=0, fits=0, partitioned=0
        ),
        rejected=_rejections(rejected, empty, limit, safety, pruned=0),
        explanation=None,
        timing=SearchTiming(
            enumerate_s=elapsed_s, evaluate_s=0.0, partition_s=0.0, total_s=elapsed_s, candidates_per_s=0.0
        ),
    )


# ------------------------------------------------------------------------------------ branch and bound


def _branch_and_bound(costs: CandidateCosts, limit: float, top_k: int, overlap: bool) -> tuple[RowCosts, int]:
    """Cost candidates in order of their lower bound until the k-th best fitting step time, widened by the tie
    tolerance, is below the next bound. Returns what was costed and how many were never costed."""
    total = len(costs.candidates)
    bound = costs.lower_bound_s()
    order = BoundOrder(bound)
    parts: list[RowCosts] = []
    best = np.zeros(0)  # the k fastest fitting step times so far
    start, chunk = 0, FIRST_CHUNK
    while start < total:
        # A plan up to LAYOUT_TIE_TOLERANCE slower than the k-th best may still rank above it (search/rank.py).
        if len(best) == top_k and bound[order.first(start + 1)[start]] > best[-1] * (1 + LAYOUT_TIE_TOLERANCE):
            break
        rows = order.first(start + chunk)[start:]
        part = costs.cost(rows, overlap)
        parts.append(part)
        best = np.sort(np.concatenate([best, part.step_time_s[part.fits(limit)]]))[:top_k]
        start, chunk = start + len(rows), chunk * 2
    return RowCosts.concat(parts), total - start


class BoundOrder:
    """The rows in increasing order of their lower bound, ties in row order (`np.argsort(bound, kind="stable")`),
    sorted only as far as the search reads: most searches stop after a few rounds, a small share of the rows, and
    selecting that share (np.partition) costs a fraction of sorting them all."""

    def __init__(self, bound: np.ndarray):
        self.bound = bound
        self.order = np.zeros(0, dtype=np.int64)  # the first len(order) rows of the full order

    def first(self, count: int) -> np.ndarray:
        """The first `count` rows (all, when there are fewer)."""
        if count > len(self.order) and len(self.order) < len(self.bound):
            self.order = self._sorted_prefix(max(count, 2 * len(self.order), FIRST_CHUNK * 16))
        return self.order[:count]

    def _sorted_prefix(self, count: int) -> np.ndarray:
        """At least the first `count` rows: every row whose bound is at most the count-th smallest, sorted."""
        bound = self.bound
        if 2 * count >= len(bound):
            return np.argsort(bound, kind="stable")
        kth = np.partition(bound, count - 1)[count - 1]
        if np.isnan(kth):
            return np.argsort(bound, kind="stable")
        rows = np.flatnonzero(bound <= kth)  # ascending, so the stable sort keeps ties in row order
        return rows[np.argsort(bound[rows], kind="stable")]


def _leaders(costed: RowCosts, candidates: Candidates, limit: float, top_k: int) -> np.ndarray:
    """Rows of the first k fitting candidates in rank order (search/rank.py: fastest first, near ties to the simpler
    layout)."""
    fits = np.flatnonzero(costed.fits(limit))
    rows = costed.rows[fits]
    order = simplest_first(
        costed.step_time_s[fits], costed.peak_bytes[fits], candidates.cp[rows], candidates.tp[rows],
        candidates.pp[rows], top_k, candidates.ep[rows],
    )  # fmt: skip
    return rows[order]


def _full(req: PlanRequest, plan: ParallelPlan) -> tuple[ParallelPlan, StepEstimate]:
    return plan, estimate_step(req.model, req.training, req.cluster, plan, req.measured, req.runtime)


def _rank(plans: list[tuple[ParallelPlan, StepEstimate]], limit: float) -> list[tuple[ParallelPlan, StepEstimate]]:
    """The fitting plans in rank order (search/rank.py)."""
    fitting = [(p, e) for p, e in plans if _fits(e, limit)]
    cp, tp, pp, ep = np.array([(p.cp, p.tp, p.pp, p.ep) for p, _ in fitting]).reshape(-1, 4).T
    times = np.array([e.step_time_s for _, e in fitting])
    peaks = np.array([e.memory.peak_bytes for _, e in fitting])
    order = simplest_first(times, peaks, cp, tp, pp, len(fitting), ep)
    return [fitting[i] for i in order]


def _fits(estimate: StepEstimate, limit: float) -> bool:
    """Under the GPU memory limit, and its offload (if any) within a node's RAM."""
    memory = estimate.memory
    host_fits = memory.host_capacity_bytes is None or memory.host_bytes_per_node <= memory.host_capacity_bytes
    return memory.peak_bytes <= limit and host_fits


# ------------------------------------------------------------------------------------------- answers


def _closest(estimated: list[tuple[ParallelPlan, StepEstimate]], limit: float) -> list[ClosestPlan]:
    """When nothing fits: the candidates nearest to fitting, by how much they are over."""
    nearest = sorted(estimated, key=lambda pe: _over_fraction(pe[1], limit))
    return [
        ClosestPlan(
            plan=plan,
            estimate=est,
            over_bytes=est.memory.peak_bytes - limit,
            over_stage=est.memory.peak_stage,
            over_host_bytes=_host_over_bytes(est),
        )
        for plan, est in nearest
    ]


def _over_fraction(estimate: StepEstimate, limit: float) -> tuple[float, float]:
    """How far a plan is over, as a fraction of what it is held to, then its GPU peak's fraction (evaluate.py
    `RowCosts.nearest_to_fitting`)."""
    memory = estimate.memory
    host = memory.host_bytes_per_node / memory.host_capacity_bytes if memory.host_capacity_bytes else 0.0
    return round(max(memory.peak_bytes / limit, host), OVER_FRACTION_DECIMALS), memory.peak_bytes / limit


def _host_over_bytes(estimate: StepEstimate) -> float:
    memory = estimate.memory
    if memory.host_capacity_bytes is None:
        return 0.0
    return max(0.0, memory.host_bytes_per_node - memory.host_capacity_bytes)


def _rejections(
    rejected: Rejections, costed: RowCosts, limit: float, safety: MemorySafety, pruned: int
) -> list[Rejection]:
    """`limit`: what estimated peaks are held to, the memory limit / `safety.factor`."""
    memory_limit = limit * safety.factor  # search.max_memory_fraction x GPU memory
    over = (costed.peak_bytes > memory_limit) & ~costed.host_over
    rejected.add(
        "candidate",
        "host_memory_exceeded",
        int(costed.host_over.sum()),
        "CPU offload needs more host memory per node than cluster.host_memory_per_node_bytes",
    )
    rejected.add(
        "candidate",
        "out_of_memory",
        int(over.sum()),
        f"peak memory above the limit of {memory_limit / GiB:.2f} GiB (search.max_memory_fraction x GPU memory)",
    )
    rejected.add(
        "candidate",
        "memory_safety",
        int(((costed.peak_bytes > limit) & ~over & ~costed.host_over).sum()),
        safety.rejection(memory_limit),
    )
    rejected.add(
        "candidate",
        "pruned_by_bound",
        pruned,
        "a lower bound on its step time is already slower than the k-th best plan that fits",
    )
    found = [
        Rejection(code=code, level=level, count=count, example=rejected.examples[code])
        for (level, code), count in rejected.counts.items()
    ]
    return sorted(found, key=lambda r: -r.count)


def _explain(
    ranked: list[tuple[ParallelPlan, StepEstimate]],
    candidates: Candidates,
    costed: RowCosts,
    limit: float,
    overlap: bool,
) -> Explanation:
    plan, est = ranked[0]
    summary = [
        f"{describe_plan(plan)}: {est.step_time_s:.3f} s per step, {est.tokens_per_s:,.0f} tokens/s, "
        f"MFU {est.mfu:.1%}, peak {est.memory.peak_bytes / GiB:.2f} GiB of the {limit / GiB:.2f} GiB limit"
    ]
    versus: list[TermComparison] = []
    if len(ranked) > 1:
        runner_plan, runner = ranked[1]
        summary.append(_runner_up(plan, est, runner_plan, runner))
        versus = _term_differences(est, runner)
    return Explanation(
        summary=summary,
        versus_runner_up=versus,
        binding_constraint=_binding_constraint(est, candidates, costed, limit, overlap),
    )


def _runner_up(plan: ParallelPlan, est: StepEstimate, runner_plan: ParallelPlan, runner: StepEstimate) -> str:
    """How the runner-up compares: slower, or (a near tie that went to the simpler layout, search/rank.py) faster by
    less than the tie tolerance."""
    gap_s = runner.step_time_s - est.step_time_s
    line = f"runner-up {describe_plan(runner_plan)} is {abs(gap_s):.3f} s {'slower' if gap_s >= 0 else 'faster'}"
    line += f" ({abs(runner.step_time_s / est.step_time_s - 1):.1%})"
    if gap_s >= 0:
        return line
    return line + (
        f", within the {LAYOUT_TIE_TOLERANCE:.0%} tie tolerance, but uses {_layout_words(runner_plan)} against "
        f"{_layout_words(plan)}: near ties go to the simpler layout"
    )


def _layout_words(plan: ParallelPlan) -> str:
    axes = int(model_parallel_axes(plan.cp, plan.tp, plan.pp, plan.ep))
    experts = f" ep{plan.ep}" if plan.ep > 1 else ""
    return f"{axes} model-parallel axes (cp{plan.cp} tp{plan.tp} pp{plan.pp}{experts})"


def _term_differences(winner: StepEstimate, runner_up: StepEstimate) -> list[TermComparison]:
    rows = [
        TermComparison(
            term=term,
            winner_s=getattr(winner.breakdown, term),
            runner_up_s=getattr(runner_up.breakdown, term),
            difference_s=getattr(runner_up.breakdown, term) - getattr(winner.breakdown, term),
        )
        for term in TIME_TERMS
    ]
    return sorted((r for r in rows if abs(r.difference_s) > 1e-9), key=lambda r: -abs(r.difference_s))


def _binding_constraint(
    winner: StepEstimate, candidates: Candidates, costed: RowCosts, limit: float, overlap: bool
) -> str:
    """What keeps faster candidates from ranking first: memory, when some do not fit (then the faster one nearest to
    fitting, and by how much it is over); layout simplicity, when some that fit lost a near tie (search/rank.py)."""
    faster = costed.step_time_s < winner.step_time_s * (1 - FASTER_RELATIVE)
    over = costed.peak_bytes > limit
    reasons = []
    if (faster & over).any():
        reasons.append(_memory_binds(np.flatnonzero(faster & over), candidates, costed, limit, overlap))
    if (faster & costed.host_over & ~over).any():
        count = int((faster & costed.host_over & ~over).sum())
        reasons.append(f"host memory: {count:,} faster candidates offload more than a node's RAM holds")
    if (faster & costed.fits(limit)).any():
        reasons.append(_simplicity_binds(np.flatnonzero(faster & costed.fits(limit)), winner, costed))
    if reasons:
        return "; ".join(reasons)
    headroom = (limit - winner.memory.peak_bytes) / GiB
    return (
        f"none: no candidate in the space is faster, fitting or not ({headroom:.2f} GiB of memory headroom "
        "below the limit)"
    )


def _memory_binds(faster: np.ndarray, candidates: Candidates, costed: RowCosts, limit: float, overlap: bool) -> str:
    """`faster`: the costed rows faster than the winner that do not fit."""
    nearest = faster[np.argmin(costed.peak_bytes[faster])]
    plan = candidates.plan(int(costed.rows[nearest]), overlap)
    over = costed.peak_bytes[nearest] - limit
    return (
        f"memory: {len(faster):,} faster candidates do not fit; the nearest to fitting, {describe_plan(plan)} "
        f"({costed.step_time_s[nearest]:.3f} s), needs {costed.peak_bytes[nearest] / GiB:.2f} GiB on stage "
        f"{int(costed.peak_stage[nearest])}, {over:,.0f} bytes ({over / GiB:.2f} GiB) over the limit"
    )


def _simplicity_binds(faster: np.ndarray, winner: StepEstimate, costed: RowCosts) -> str:
    """`faster`: the costed rows faster than the winner that fit, each within the tie tolerance of it."""
    gain = winner.step_time_s / costed.step_time_s[faster].min() - 1
    return (
        f"layout simplicity: {len(faster):,} faster candidates fit, at most {gain:.1%} faster, within the "
        f"{LAYOUT_TIE_TOLERANCE:.0%} tie tolerance, and use more model-parallel axes or larger degrees"
    )
