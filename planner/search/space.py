"""The search space: every candidate plan for a model, training setup and cluster, as numpy columns.

Two levels. A *layout* is a dp x tp x pp x cp factorization of the GPU count; the structural rules of
planner/rules.py are checked once per layout. Each valid layout then expands into *candidates*: every ZeRO
stage, micro-batch size dividing the per-replica batch, recompute mode, sequence-parallel choice and schedule
with its virtual-stage count, built as numpy arrays (one row per candidate, never one object per candidate).
Whatever is left out is counted by reason, so the search can say why the space is the size it is.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections import Counter
from dataclasses import dataclass, field, fields, replace

import numpy as np

from planner.errors import InfeasiblePlanError, Violation
from planner.rules import (
    framework_offload_violation,
    framework_runs_zero_stage,
    framework_zero_violation,
    host_side_violations,
    interleaved_round_violation,
    offload_zero_violation,
    paraplan_expert_violations,
    partial_interleaved_round,
    plan_violations,
    sequence_parallel_splits,
    sequence_parallel_violation,
)
from planner.specs import MESH_AXES, ClusterSpec, Degrees, ModelSpec, ParallelPlan, SearchOptions, TrainingSpec

SCHEDULES = ("gpipe", "1f1b", "interleaved_1f1b")
RECOMPUTE = ("none", "selective", "full")
OFFLOADS = ("none", "optimizer", "optimizer_and_params")


@dataclass
class Rejections:
    """How many layouts or candidates were left out, by reason code, with one example message per code."""

    counts: Counter = field(default_factory=Counter)  # (level, code) -> count
    examples: dict[str, str] = field(default_factory=dict)

    def add(self, level: str, code: str, count: int, example: str) -> None:
        if count:
            self.counts[(level, code)] += count
            self.examples.setdefault(code, example)


@dataclass(frozen=True)
class Candidates:
    """One row per candidate plan. Schedules, recompute modes and offloads are stored as indices into SCHEDULES,
    RECOMPUTE and OFFLOADS so every column is an integer array."""

    dp: np.ndarray
    tp: np.ndarray
    pp: np.ndarray
    cp: np.ndarray
    ep: np.ndarray
    zero_stage: np.ndarray
    micro_batch_size: np.ndarray
    sequence_parallel: np.ndarray
    recompute: np.ndarray
    schedule: np.ndarray
    virtual_stages: np.ndarray
    offload: np.ndarray

    def __len__(self) -> int:
        return len(self.dp)

    def take(self, rows: np.ndarray) -> Candidates:
        return Candidates(**{f.name: getattr(self, f.name)[rows] for f in fields(self)})

    @classmethod
    def concat(cls, parts: list[Candidates]) -> Candidates:
        if not parts:
            return cls(**{f.name: np.zeros(0, dtype=np.int64) for f in fields(cls)})
        return cls(**{f.name: np.concatenate([getattr(p, f.name) for p in parts]) for f in fields(cls)})

    def degrees(self, row: int) -> Degrees:
        return Degrees(*(int(getattr(self, axis)[row]) for axis in MESH_AXES))

    def plan(self, row: int, overlap_grad_reduce: bool = True) -> ParallelPlan:
        return ParallelPlan(
            dp=int(self.dp[row]),
            tp=int(self.tp[row]),
            pp=int(self.pp[row]),
            cp=int(self.cp[row]),
            ep=int(self.ep[row]),
            zero_stage=int(self.zero_stage[row]),
            micro_batch_size=int(self.micro_batch_size[row]),
            sequence_parallel=bool(self.sequence_parallel[row]),
            recompute=RECOMPUTE[self.recompute[row]],
            schedule=SCHEDULES[self.schedule[row]],
            virtual_stages=int(self.virtual_stages[row]),
            overlap_grad_reduce=overlap_grad_reduce,
            offload=OFFLOADS[self.offload[row]],
        )


@functools.lru_cache(maxsize=4096)
def divisors(n: int) -> tuple[int, ...]:
    """The divisors of n, ascending: the pairs (d, n // d) for d up to sqrt(n), so a batch of 2**24 costs
    4,096 trials instead of 2**24 (it is asked for every layout's per-replica batch)."""
    small = [d for d in range(1, math.isqrt(n) + 1) if n % d == 0]
    return tuple(small + [n // d for d in reversed(small) if d * d != n])


# ------------------------------------------------------------------------------------ the options


def check_options(model: ModelSpec, training: TrainingSpec, cluster: ClusterSpec, options: SearchOptions) -> None:
    """Refuse options that leave nothing to search, naming the option: a fixed value the model or the other
    options rule out."""
    found = _fixed_against_rules(model, training, cluster, options) + _fixed_against_options(cluster, options)
    if found:
        raise InfeasiblePlanError("contradictory_search_options", found)


def _fixed_against_rules(
    model: ModelSpec, training: TrainingSpec, cluster: ClusterSpec, options: SearchOptions
) -> list[Violation]:
    """The plan rules a fixed field breaks whatever the other fields are. A plan with only the fixed fields
    set is checked and only the violations blaming a fixed field are kept."""
    fixed = options.fixed.model_dump(exclude_none=True)
    # An unfixed ZeRO stage is probed at the highest allowed, which every offload accepts.
    probe = ParallelPlan.model_construct(**{"zero_stage": max(options.zero_stages), **fixed})
    found = [
        Violation(f"search.fixed.{v.field.removeprefix('plan.')}", v.code, v.message)
        for v in [*probe._intrinsic_violations(), *plan_violations(probe, model, training, cluster)]
        if v.field.removeprefix("plan.") in fixed and not _probed_degree(v, fixed)
    ]
    degrees = [fixed[d] for d in MESH_AXES if d in fixed]
    if degrees and cluster.num_gpus % int(np.prod(degrees)):
        found.append(
            Violation(
                "search.fixed",
                "degrees_product",
                f"the fixed degrees multiply to {int(np.prod(degrees))}, which does not divide the cluster's "
                f"{cluster.num_gpus} GPUs",
            )
        )
    replicas = fixed.get("dp", 1) * fixed.get("micro_batch_size", 1)
    if training.global_batch_size % replicas:
        found.append(
            Violation(
                "search.fixed",
                "batch_divisible",
                f"global_batch_size={training.global_batch_size} is not divisible by the fixed dp x "
                f"micro_batch_size = {replicas}",
            )
        )
    return found


def _probed_degree(violation: Violation, fixed: dict) -> bool:
    """Whether `violation` blames a fixed ep only against the probe's stand-in dp or cp (1 where not fixed): the
    search still chooses those, so it is no contradiction."""
    return violation.code == "ep_divides_dp_cp" and not {"dp", "cp"} <= fixed.keys()


def _fixed_against_options(cluster: ClusterSpec, options: SearchOptions) -> list[Violation]:
    fixed, found = options.fixed, []
    allowed = {
        "schedule": options.schedules,
        "recompute": options.recompute,
        "zero_stage": options.zero_stages,
        "offload": options.offloads,
    }
    if options.micro_batch_sizes is not None:
        allowed["micro_batch_size"] = options.micro_batch_sizes
    for name, values in allowed.items():
        value = getattr(fixed, name)
        if value is not None and value not in values:
            found.append(
                Violation(f"search.fixed.{name}", "fixed_not_allowed", f"{value!r} is not among the allowed {values}")
            )
    if fixed.tp is not None:
        reason = _tp_option_conflict(fixed.tp, cluster, options)
        if reason:
            found.append(Violation("search.fixed.tp", reason[0], reason[1]))
    if fixed.cp is not None and options.max_cp is not None and fixed.cp > options.max_cp:
        found.append(Violation("search.fixed.cp", "cp_above_max_cp", f"{fixed.cp} > search.max_cp={options.max_cp}"))
    return found


def _tp_option_conflict(tp: int, cluster: ClusterSpec, options: SearchOptions) -> tuple[str, str] | None:
    max_tp = options.max_tp or cluster.gpus_per_node
    if options.max_tp is not None and tp > max_tp:
        return "tp_above_max_tp", f"tp={tp} > search.max_tp={max_tp}"
    if options.tp_within_node and cluster.gpus_per_node % tp:
        return (
            "tp_crosses_nodes",
            f"tp={tp} groups would cross nodes of {cluster.gpus_per_node} GPUs (search.tp_within_node is true)",
        )
    return None


# ------------------------------------------------------------------------------------------ layouts


def layouts(
    model: ModelSpec, training: TrainingSpec, cluster: ClusterSpec, options: SearchOptions, rejected: Rejections
) -> list[Degrees]:
    """Every dp x tp x pp x cp factorization of the GPU count that the fixed degrees, the options and the
    structural rules allow."""
    n, fixed = cluster.num_gpus, options.fixed
    valid = []
    for tp, pp, cp in itertools.product(divisors(n), repeat=3):
        if n % (tp * pp * cp):
            continue
        layout = Degrees(pp=pp, dp=n // (tp * pp * cp), cp=cp, tp=tp)
        if any(getattr(fixed, d) not in (None, getattr(layout, d)) for d in MESH_AXES):
            continue
        reason = _layout_option_conflict(layout, cluster, options)
        if reason:
            rejected.add("layout", *reason)
            continue
        broken = plan_violations(_probe_plan(layout), model, training, cluster)
        for violation in broken:
            rejected.add("layout", violation.code, 1, violation.message)
        if not broken:
            valid.append(layout)
    return valid


def _layout_option_conflict(layout: Degrees, cluster: ClusterSpec, options: SearchOptions):
    tp_reason = _tp_option_conflict(layout.tp, cluster, options)
    if tp_reason:
        return tp_reason[0], 1, tp_reason[1]
    if options.max_cp is not None and layout.cp > options.max_cp:
        return "cp_above_max_cp", 1, f"cp={layout.cp} > search.max_cp={options.max_cp}"
    return None


def _probe_plan(layout: Degrees) -> ParallelPlan:
    """The layout with the least demanding other fields: what fails here fails for every candidate."""
    return ParallelPlan(**layout._asdict())


# --------------------------------------------------------------------------------------- candidates


def search_space(
    model: ModelSpec, training: TrainingSpec, cluster: ClusterSpec, options: SearchOptions
) -> tuple[Candidates, Rejections]:
    check_options(model, training, cluster, options)
    rejected = Rejections()
    grids = [
        layout_grid(layout, model, training, cluster, options, rejected)
        for layout in layouts(model, training, cluster, options, rejected)
    ]
    return write_candidates(grids), rejected


# The columns' integer types: a search holds up to about a million rows, and on a cold start writing memory for
# the first time is much of what it costs. CandidateCosts widens the rows it costs to int64 (search/evaluate.py).
COLUMN_DTYPES = {
    "dp": np.int32, "tp": np.int32, "pp": np.int32, "cp": np.int32, "zero_stage": np.int8,
    "micro_batch_size": np.int32, "sequence_parallel": np.bool_, "recompute": np.int8, "schedule": np.int8,
    "virtual_stages": np.int32, "offload": np.int8,
}  # fmt: skip
# Choices that set two columns at once: (first column, second column).
PAIRED_CHOICES = {"zero_offload": ("zero_stage", "offload"), "schedule_v": ("schedule", "virtual_stages")}


@dataclass(frozen=True)
class LayoutGrid:
    """One layout's candidates before they are written out: the product of the per-field choices, in row-major
    order (the last choice varies fastest), and which rows of it the rules keep."""

    layout: Degrees
    choices: dict[str, np.ndarray]  # choice -> its values: (count,), or (count, 2) for PAIRED_CHOICES
    keep: np.ndarray | None  # bool over the product's shape; None: every row

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(len(values) for values in self.choices.values())

    @property
    def rows(self) -> int:
        return int(np.prod(self.shape)) if self.keep is None else int(self.keep.sum())

    def write(self, columns: dict[str, np.ndarray]) -> None:
        """Write this layout's rows into `columns` (every Candidates field, each sliced to this layout's rows)."""
        for axis in MESH_AXES:
            columns[axis][:] = getattr(self.layout, axis)
        for position, (choice, values) in enumerate(self.choices.items()):
            view = [1] * len(self.shape)
            view[position] = len(values)
            names = PAIRED_CHOICES.get(choice, (choice,))
            for i, name in enumerate(names):
                value = values[:, i] if len(names) > 1 else values
                grid = np.broadcast_to(value.reshape(view), self.shape)
                if self.keep is None:
                    columns[name].reshape(self.shape)[...] = grid
                else:
                    columns[name][:] = grid[self.keep]


def write_candidates(grids: list[LayoutGrid]) -> Candidates:
    """The layouts' candidates, in layout order, each column written once in place."""
    counts = [grid.rows for grid in grids]
    ends = np.cumsum(counts)
    columns = {f.name: np.empty(int(ends[-1]) if grids else 0, COLUMN_DTYPES.get(f.name, np.int64))
               for f in fields(Candidates)}  # fmt: skip
    for grid, end, count in zip(grids, ends, counts, strict=True):
        if count:
            grid.write({name: column[end - count : end] for name, column in columns.items()})
    return Candidates(**columns)


def layout_grid(
    layout: Degrees,
    model: ModelSpec,
    training: TrainingSpec,
    cluster: ClusterSpec,
    options: SearchOptions,
    rejected: Rejections,
) -> LayoutGrid:
    """One layout's product of the per-field choices, minus the combinations the rules forbid (counted)."""
    choices = {
        "zero_offload": _zero_offloads(layout, training, cluster, options, rejected),
        "micro_batch_size": _micro_batch_sizes(layout, training, options),
        "sequence_parallel": _sequence_parallel(layout, training, options, rejected),
        "recompute": [RECOMPUTE.index(r) for r in options.recompute if options.fixed.recompute in (None, r)],
        "schedule_v": _schedules(layout, model, options),
        "ep": _expert_degrees(layout, model, options),
    }
    if not all(choices.values()):
        return LayoutGrid(layout, {name: np.zeros(0, dtype=np.int64) for name in choices}, None)
    grid = LayoutGrid(layout, {name: np.asarray(values) for name, values in choices.items()}, None)
    partial_round = _partial_rounds(grid, training)
    if partial_round is not None:
        first_size = grid.choices["micro_batch_size"][partial_round.any(axis=1)][0]
        example = interleaved_round_violation(training.global_batch_size // (layout.dp * int(first_size)), layout.pp)
        grid = _without(grid, ("micro_batch_size", "schedule_v"), partial_round, example, rejected)
    unrun = _unrun_expert_sharding(grid, training)
    if unrun is not None:
        example = next(paraplan_expert_violations(ParallelPlan.model_construct(ep=2, zero_stage=1, tp=1), model))
        grid = _without(grid, ("zero_offload", "ep"), unrun, example, rejected)
    return grid


def _without(
    grid: LayoutGrid, pair: tuple[str, str], forbidden: np.ndarray, example: Violation, rejected: Rejections
) -> LayoutGrid:
    """`grid` less its rows whose values of the two choices in `pair` are `forbidden` (a bool table over those
    values, in the choices' order), counted under `example`'s code (rows another rule already dropped are not)."""
    position = [list(grid.choices).index(name) for name in pair]
    assert position[0] < position[1], "the pair in the choices' order"
    view = [1] * len(grid.shape)
    view[position[0]], view[position[1]] = forbidden.shape
    dropped = np.broadcast_to(forbidden.reshape(view), grid.shape)
    kept = np.ones(grid.shape, dtype=bool) if grid.keep is None else grid.keep
    rejected.add("candidate", example.code, int((dropped & kept).sum()), example.message)
    return replace(grid, keep=kept & ~dropped)


def _partial_rounds(grid: LayoutGrid, training: TrainingSpec) -> np.ndarray | None:
    """(micro-batch size, schedule) pairs whose interleaved schedule would run a partial round of micro-batches
    (planner/rules.py), as a bool table; None when there are none."""
    layout, sizes = grid.layout, grid.choices["micro_batch_size"]
    schedule = grid.choices["schedule_v"][:, 0]
    microbatches = training.global_batch_size // (layout.dp * sizes)
    interleaved = schedule == SCHEDULES.index("interleaved_1f1b")
    partial = interleaved[None, :] & partial_interleaved_round(microbatches, layout.pp)[:, None]
    return partial if partial.any() else None


def _unrun_expert_sharding(grid: LayoutGrid, training: TrainingSpec) -> np.ndarray | None:
    """(ZeRO stage and offload, ep) pairs the stack cannot run: paraplan's executor shards experts at ZeRO 0, 2
    and 3, not 1 (planner/rules.py `paraplan_expert_violations`), as a bool table; None when there are none."""
    if training.framework != "paraplan":
        return None
    zero1 = grid.choices["zero_offload"][:, 0] == 1
    refused = zero1[:, None] & (grid.choices["ep"] > 1)[None, :]
    return refused if refused.any() else None


def _zero_offloads(
    layout: Degrees, training: TrainingSpec, cluster: ClusterSpec, options: SearchOptions, rejected: Rejections
) -> list[tuple[int, int]]:
    """(ZeRO stage, offload index) pairs the training stack runs and the rules allow (an offload needs its least
    ZeRO stage, planner/rules.py). With one replica the stage shards nothing, so each offload keeps only the
    least stage it runs at."""
    stages = _zero_stages(layout, training, options, rejected)
    offloads = _offloads(training, cluster, options, rejected)
    # Not counted as rejections: like a schedule's virtual stages, the pairs define the space.
    pairs = [
        (zero_stage, OFFLOADS.index(offload))
        for zero_stage, offload in itertools.product(stages, offloads)
        if offload_zero_violation(offload, zero_stage) is None
    ]
    if layout.dp * layout.cp > 1 or len(stages) == 1:
        return pairs
    # ZeRO shards over dp x cp; with one replica every stage is ZeRO 0 plus FSDP's working copies.
    least = {offload: min(z for z, o in pairs if o == offload) for _, offload in pairs}
    kept = [(z, o) for z, o in pairs if z == least[o]]
    dropped = len(pairs) - len(kept)
    rejected.add("candidate", "zero_without_replicas", dropped, "ZeRO over dp x cp = 1 rank only adds FSDP buffers")
    return kept


def _zero_stages(layout: Degrees, training: TrainingSpec, options: SearchOptions, rejected: Rejections) -> list[int]:
    stages = [z for z in options.zero_stages if options.fixed.zero_stage in (None, z)]
    unsupported = [z for z in stages if not framework_runs_zero_stage(training.framework, z, layout.pp)]
    if unsupported:
        example = framework_zero_violation(training.framework, unsupported[0], layout.pp)
        rejected.add("candidate", example.code, len(unsupported), example.message)
        stages = [z for z in stages if z not in unsupported]
    return stages


def _offloads(training: TrainingSpec, cluster: ClusterSpec, options: SearchOptions, rejected: Rejections) -> list[str]:
    """The offloads to search: allowed, fixed, run by the training stack, and with the host side known. On a CPU
    device offload moves nothing (planner/cost/offload.py), so an offloading plan would only repeat its twin."""
    kept: list[str] = []
    wanted = [o for o in options.offloads if options.fixed.offload in (None, o)]
    if cluster.gpu.kind == "cpu" and options.fixed.offload is None:
        wanted = [o for o in wanted if o == "none"] or wanted[:1]
    for offload in wanted:
        found = framework_offload_violation(training.framework, offload)
        broken = ([] if found is None else [found]) + host_side_violations(offload, cluster)
        if broken:
            rejected.add("candidate", broken[0].code, 1, broken[0].message)
        else:
            kept.append(offload)
    return kept


def _micro_batch_sizes(layout: Degrees, training: TrainingSpec, options: SearchOptions) -> list[int]:
    sizes = divisors(training.global_batch_size // layout.dp)
    if options.micro_batch_sizes is not None:
        sizes = [b for b in sizes if b in options.micro_batch_sizes]
    return [b for b in sizes if options.fixed.micro_batch_size in (None, b)]


def _sequence_parallel(layout: Degrees, training: TrainingSpec, options: SearchOptions, rejected: Rejections):
    choices = [sp for sp in (False, True) if options.fixed.sequence_parallel in (None, sp)]
    if layout.tp == 1:
        return [False] if False in choices else []
    if True in choices and not sequence_parallel_splits(training.seq_len, layout.tp):
        broken = sequence_parallel_violation(training.seq_len, layout.tp)
        rejected.add("candidate", broken.code, 1, broken.message)
        choices.remove(True)
    return choices


def _expert_degrees(layout: Degrees, model: ModelSpec, options: SearchOptions) -> list[int]:
    """The expert-parallel degrees of a layout: the divisors of num_experts that divide its dp x cp group
    (planner/rules.py `_experts_split`), or the fixed one. A dense model has only ep = 1, so its space does not grow."""
    choices = [ep for ep in divisors(model.num_experts) if (layout.dp * layout.cp) % ep == 0]
    return [ep for ep in choices if options.fixed.ep in (None, ep)]


def _schedules(layout: Degrees, model: ModelSpec, options: SearchOptions) -> list[tuple[int, int]]:
    """(schedule index, virtual stages) pairs. Without a pipeline the schedule makes no difference, so one
    non-interleaved schedule stands for all."""
    fixed = options.fixed
    allowed = [s for s in options.schedules if fixed.schedule in (None, s)]
    if layout.pp == 1:
        flat = [s for s in allowed if s != "interleaved_1f1b"]
        return [(SCHEDULES.index(flat[-1]), 1)] if flat and fixed.virtual_stages in (None, 1) else []
    pairs = [(SCHEDULES.index(s), 1) for s in allowed if s != "interleaved_1f1b"]
    if "interleaved_1f1b" in allowed:
        most = model.num_layers // layout.pp
        if options.max_virtual_stages is not None:
            most = min(most, options.max_virtual_stages)
        pairs += [(SCHEDULES.index("interleaved_1f1b"), v) for v in range(2, most + 1)]
    return [(s, v) for s, v in pairs if fixed.virtual_stages in (None, v)]
