"""The cost model over a whole candidate set: shared inputs computed once, rows costed in numpy batches.

Layer costs depend on a candidate only through (tp, cp, ep, sequence_parallel, micro_batch_size, recompute), and
group channels only through the layout, so both are computed once per distinct key and gathered per row.
A cheap lower bound on every row's step time lets the search cost rows best-first and stop early.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from functools import cached_property
from typing import Any

import numpy as np

from planner.cost.accumulation import accumulation_floor_s
from planner.cost.batch import KindColumns, PlanBatch, group_channels, kind_columns
from planner.cost.layers import LayerKinds, layer_kinds_by_recompute
from planner.cost.measured import ProfileCosts
from planner.cost.optimizer import cpu_optimizer_floor_s
from planner.cost.pipeline import blocks_per_device
from planner.cost.runtime import Runtime, runtime_for
from planner.cost.step import evaluate
from planner.search.space import OFFLOADS, RECOMPUTE, SCHEDULES, Candidates
from planner.specs import ClusterSpec, ModelSpec, TrainingSpec, even_layer_split

_SCHEDULE_NAMES = np.array(SCHEDULES)
_OFFLOAD_NAMES = np.array(OFFLOADS)
_RECOMPUTE_NAMES = np.array(RECOMPUTE)
# Candidates over by fractions equal to this many decimals are equally near to fitting (RowCosts.nearest_to_fitting).
OVER_FRACTION_DECIMALS = 3


def _col(values: np.ndarray) -> np.ndarray:
    """Rows as an (N, 1) column; integers widened to int64 (Candidates stores them narrower), so no cost formula
    computes in a narrow type."""
    if values.dtype.kind in "iu":
        values = values.astype(np.int64)
    return values.reshape(-1, 1)


@dataclass(frozen=True)
class RowCosts:
    """The exact cost of some rows: step time, peak bytes, the stage that holds the peak, and whether the host
    memory their CPU offload needs exceeds a node's RAM (planner/rules.py `host_memory_violation`)."""

    rows: np.ndarray
    step_time_s: np.ndarray
    peak_bytes: np.ndarray
    peak_stage: np.ndarray
    host_fraction: np.ndarray  # host bytes per node / a node's RAM (0 without offload or a known RAM)

    @classmethod
    def concat(cls, parts: list[RowCosts]) -> RowCosts:
        """Rows costed in several rounds as one, in the order they were costed (none: empty)."""
        if not parts:
            empty_int = np.zeros(0, dtype=np.int64)
            return cls(empty_int, np.zeros(0), np.zeros(0), empty_int, np.zeros(0))
        return cls(*(np.concatenate([getattr(p, f.name) for p in parts]) for f in fields(cls)))

    @property
    def host_over(self) -> np.ndarray:
        """Rows whose CPU offload needs more host memory than a node has."""
        return self.host_fraction > 1

    def fits(self, limit_bytes: float) -> np.ndarray:
        """Rows whose GPU peak stays under `limit_bytes` and whose offload fits in host memory."""
        return (self.peak_bytes <= limit_bytes) & ~self.host_over

    def nearest_to_fitting(self, limit_bytes: float) -> np.ndarray:
        """Indices of the rows in order of how far they are over, as a fraction of what they are held to: the GPU
        limit, or a node's RAM for what they offload, whichever is the further over; near ties (offloads of about
        one size over the same RAM: tp's replicated norms differ by a few bytes) by their GPU peak."""
        gpu_fraction = self.peak_bytes / limit_bytes
        over = np.round(np.maximum(gpu_fraction, self.host_fraction), OVER_FRACTION_DECIMALS)
        return np.lexsort((gpu_fraction, over))


class CandidateCosts:
    """Costs a candidate set; built once per search."""

    def __init__(
        self,
        model: ModelSpec,
        training: TrainingSpec,
        cluster: ClusterSpec,
        candidates: Candidates,
        measured: ProfileCosts | None = None,
        runtime: Runtime | None = None,
    ):
        self.model, self.training, self.cluster, self.candidates = model, training, cluster, candidates
        self.measured = measured  # the request's profile (planner/request.py), or None
        # The training stack (planner/cost/runtime.py).
        self.runtime = runtime or runtime_for(cluster, measured, training.framework)
        c = candidates
        self.layout_id, self.layout_rows = _group_ids(c.dp, c.tp, c.pp, c.cp, c.ep)
        self.layer_key, self.kinds = self._layer_kinds()
        self.layouts = [candidates.degrees(int(row)) for row in self.layout_rows]
        self.layout_eps = [int(c.ep[row]) for row in self.layout_rows]  # a layout here is its degrees and its ep
        # The channels each layout's groups see, placed on the nodes (planner/layout.py) only for the layouts of
        # rows the search costs: most layouts have every row pruned by the bound, and placing a layout's groups
        # walks all of its ranks. `_channel_row[layout]`: its row in `_channels`, -1 until placed.
        self._channels: dict[str, Any] | None = None
        self._channel_row = np.full(len(self.layouts), -1, dtype=np.int64)
        self._even_block_tables: dict[int, np.ndarray] = {}

    def _layer_kinds(self) -> tuple[np.ndarray, dict[str, KindColumns]]:
        """Layer costs for every (tp, cp, ep, sequence_parallel, recompute) group, each costed at all micro-batch
        sizes at once; row r's costs sit at index group * len(sizes) + the index of its size. Each group is
        costed with one of its rows' plans: `sizes` replaces its micro-batch size, and no other field it does not
        share with the group (schedule, ZeRO stage, dp, pp) changes a layer's cost."""
        c = self.candidates
        group, group_rows = self._layer_groups()
        (size_index, _), sizes = _dense_rank(c.micro_batch_size), _distinct(c.micro_batch_size)
        # The groups that differ only in recompute share most of their costs (layers.layer_kinds_by_recompute).
        shape, shape_rows = _group_ids(
            c.tp[group_rows], c.cp[group_rows], c.ep[group_rows], c.sequence_parallel[group_rows]
        )
        kinds = self._kinds_of_groups(group_rows, shape, shape_rows, sizes)
        key = group * len(sizes) + size_index
        return key, kind_columns(kinds, c.tp[group_rows])

    def _layer_groups(self) -> tuple[np.ndarray, np.ndarray]:
        """Each row's (tp, cp, ep, sequence_parallel, recompute) group and a row of each (its last). tp, cp and ep
        are the layout's, so the rows' codes are built from the layouts' ids: one pass of small integers over the
        rows. ep matters to a MoE layer only (the experts whose weights a rank casts: planner/cost/ops.py)."""
        c = self.candidates
        layouts = self.layout_rows
        shape_of_layout, _ = _combination_ids([c.tp[layouts], c.cp[layouts], c.ep[layouts]])
        code = shape_of_layout[self.layout_id] * 2 + c.sequence_parallel
        code = code * len(RECOMPUTE) + c.recompute
        group, groups = _dense_rank(code)
        representative = np.empty(groups, dtype=np.int64)
        representative[group] = np.arange(len(group))  # later rows overwrite: each group's last row
        return group, representative

    def _kinds_of_groups(
        self, group_rows: np.ndarray, shape: np.ndarray, shape_rows: np.ndarray, sizes: np.ndarray
    ) -> list[LayerKinds]:
        """Each group's LayerKinds (`group_rows`: a row of each group; `shape`: each group's (tp, cp, ep,
        sequence_parallel) id, `shape_rows` a group of each), costed once per shape for all its recompute modes."""
        c = self.candidates
        modes = [RECOMPUTE[int(c.recompute[row])] for row in group_rows]
        by_shape = {}
        for s, group in enumerate(shape_rows):
            wanted = sorted({modes[g] for g in np.flatnonzero(shape == s)}, key=RECOMPUTE.index)
            plan = c.plan(int(group_rows[group]))
            by_shape[s] = layer_kinds_by_recompute(
                self.model, self.training, self.cluster, plan, wanted, sizes, self.measured, self.runtime
            )
        return [by_shape[int(shape[g])][modes[g]] for g in range(len(group_rows))]

    @property
    def num_layouts(self) -> int:
        return int(self.layout_id.max(initial=-1)) + 1

    @cached_property
    def microbatches(self) -> np.ndarray:
        c = self.candidates
        return self.training.global_batch_size // (c.dp.astype(np.int64) * c.micro_batch_size)

    def batch(self, rows: np.ndarray, pp: int, overlap_grad_reduce: bool) -> PlanBatch:
        """The rows (all with pipeline depth pp) as a PlanBatch."""
        c, key, layout = self.candidates, self.layer_key[rows], self.layout_id[rows]
        return PlanBatch(
            model=self.model,
            training=self.training,
            cluster=self.cluster,
            measured=self.measured,
            runtime=self.runtime,
            pp=pp,
            dp=_col(c.dp[rows]),
            tp=_col(c.tp[rows]),
            cp=_col(c.cp[rows]),
            ep=_col(c.ep[rows]),
            zero_stage=_col(c.zero_stage[rows]),
            micro_batch_size=_col(c.micro_batch_size[rows]),
            schedule=_col(_SCHEDULE_NAMES[c.schedule[rows]]),
            recompute=_col(_RECOMPUTE_NAMES[c.recompute[rows]]),
            virtual_stages=_col(c.virtual_stages[rows]),
            overlap_grad_reduce=np.full((len(rows), 1), overlap_grad_reduce),
            offload=_col(_OFFLOAD_NAMES[c.offload[rows]]),
            microbatches=_col(self.microbatches[rows]),
            blocks=self._even_blocks(pp)[c.virtual_stages[rows]],
            embedding=self.kinds["embedding"].take(key),
            block=self.kinds["block"].take(key),
            head=self.kinds["head"].take(key),
            **{name: channel.take(self._channel_row[layout]) for name, channel in self._channels_of(layout).items()},
        )

    def _channels_of(self, layouts: np.ndarray) -> dict[str, Any]:
        """The channel columns, with every layout in `layouts` placed."""
        wanted = np.bincount(layouts, minlength=len(self.layouts)) > 0
        missing = np.flatnonzero(wanted & (self._channel_row < 0))
        if len(missing):
            placed = group_channels(
                self.cluster, [self.layouts[i] for i in missing], self.measured, [self.layout_eps[i] for i in missing]
            )
            start = 0 if self._channels is None else len(self._channels["tp_channel"].latency_s)
            self._channels = placed if self._channels is None else {
                name: _stacked(self._channels[name], channel) for name, channel in placed.items()
            }  # fmt: skip
            self._channel_row[missing] = np.arange(start, start + len(missing))
        assert self._channels is not None
        return self._channels

    def _even_blocks(self, pp: int) -> np.ndarray:
        """Blocks per device of the even split, indexed by virtual-stage count: (max v + 1, pp)."""
        if pp not in self._even_block_tables:
            self._even_block_tables[pp] = self._even_block_table(pp)
        return self._even_block_tables[pp]

    def _even_block_table(self, pp: int) -> np.ndarray:
        most = self.model.num_layers // pp
        table = np.zeros((most + 1, pp), dtype=np.int64)
        for v in range(1, most + 1):
            table[v] = blocks_per_device(even_layer_split(self.model.num_layers, pp * v), pp)
        return table

    def lower_bound_s(self) -> np.ndarray:
        """A lower bound on every row's step time, from its per-micro-batch busy times: the sum S over all
        layers, and an upper bound M on the slowest device (the most blocks any device holds, plus both the
        embedding and the head). The step has m x max >= m x S / pp of work, and a bubble
        (S - max) / v >= (S - M) / v; gradient accumulation is at least `accumulation_floor_s`; every other term is
        non-negative. Each layer's busy time is the lesser of its loaded and its alone time (KindColumns), since a
        step charges some micro-batches at either."""
        c, kinds = self.candidates, self.kinds

        def least_busy_s(kind: str) -> np.ndarray:
            return np.minimum(kinds[kind].busy_s, kinds[kind].alone_busy_s)[:, 0]

        block, edges = least_busy_s("block"), least_busy_s("embedding") + least_busy_s("head")
        # Per layer group first, then gathered per row, each row's terms computed in place, in the same order.
        total = (self.model.num_layers * block + edges)[self.layer_key]
        slack = self._most_blocks_on_a_device() * block[self.layer_key]
        slack += edges[self.layer_key]  # the slowest device's time at most
        np.subtract(total, slack, out=slack)
        np.maximum(slack, 0.0, out=slack)
        slack /= c.virtual_stages  # the bubble, at least
        bound = self.microbatches * total
        bound /= c.pp
        bound += slack
        bound += accumulation_floor_s(
            self.model, self.training.precision, self.cluster.gpu, self.runtime, c, self.microbatches
        )
        offloading = self._offloading()
        if offloading.any():
            bound[offloading] += cpu_optimizer_floor_s(self.model, self.training.optimizer, self.cluster)
        return bound

    def _offloading(self) -> np.ndarray:
        """Rows that offload the optimizer step it on the host, on the critical path (planner/cost/offload.py): at
        least `cpu_optimizer_floor_s`. Without that floor in its bound an offloading row, never faster than its twin
        that does not offload, would be costed wherever its twin is."""
        return (self.candidates.offload != OFFLOADS.index("none")) & (self.cluster.gpu.kind != "cpu")

    def _most_blocks_on_a_device(self) -> np.ndarray:
        """The most blocks any device holds under the even split, per row: a table over (pp, virtual stages),
        read per row through its layout's pp."""
        c = self.candidates
        layout_pp = c.pp[self.layout_rows]
        depths = np.unique(layout_pp)
        table = np.zeros((len(depths), self.model.num_layers // int(depths[0]) + 1), dtype=np.int64)
        for i, pp in enumerate(depths):
            most = self._even_blocks(int(pp)).max(axis=1)
            table[i, : len(most)] = most
        return table[np.searchsorted(depths, layout_pp)[self.layout_id], c.virtual_stages]

    def cost(self, rows: np.ndarray, overlap_grad_reduce: bool) -> RowCosts:
        """Exact step time and peak memory of `rows`, one PlanBatch per pipeline depth."""
        step = np.empty(len(rows))
        peak = np.empty(len(rows))
        stage = np.empty(len(rows), dtype=np.int64)
        host = np.zeros(len(rows))
        pps = self.candidates.pp[rows]
        for pp in np.unique(pps):
            where = np.flatnonzero(pps == pp)
            batch = self.batch(rows[where], int(pp), overlap_grad_reduce)
            result = evaluate(batch)
            step[where], peak[where], stage[where] = result.step_time_s, result.peak_bytes, result.peak_stage
            host[where] = result.host_bytes_per_node(batch)
        capacity = self.cluster.host_memory_bytes
        return RowCosts(rows, step, peak, stage, host / capacity if capacity is not None else np.zeros(len(rows)))


def _stacked(first: Any, second: Any) -> Any:
    """Two channel records (Channel, DpChannels) of column fields, rows of `second` after those of `first`."""
    if isinstance(first, np.ndarray):
        return np.concatenate([first, second])
    return type(first)(*(_stacked(getattr(first, f.name), getattr(second, f.name)) for f in fields(first)))


def _group_ids(*columns: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """An id per row for each distinct combination of the (small, non-negative integer) columns, and one
    representative row per id (its last). The search space writes each layout's rows together, so equal
    combinations come in runs: the runs are found first and only their first rows ranked."""
    count = len(columns[0])
    if count == 0:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    starts_run = np.zeros(count, dtype=bool)
    starts_run[0] = True
    for column in columns:
        starts_run[1:] |= column[1:] != column[:-1]
    starts = np.flatnonzero(starts_run)
    run_ids, groups = _combination_ids([column[starts] for column in columns])
    representative = np.empty(groups, dtype=np.int64)
    representative[run_ids] = np.append(starts[1:], count) - 1  # later runs overwrite: each group's last row
    return np.repeat(run_ids, np.diff(starts, append=count)), representative


def _combination_ids(columns: list[np.ndarray]) -> tuple[np.ndarray, int]:
    """Each row's rank among the distinct combinations of the columns (in their lexicographic order), and how many
    there are. Presence tables instead of sorting: the columns have few distinct values."""
    code = np.zeros(len(columns[0]), dtype=np.int64)
    for column in columns:
        rank, distinct = _dense_rank(column)
        code = code * distinct + rank
    return _dense_rank(code)


def _distinct(values: np.ndarray) -> np.ndarray:
    """The distinct (small, non-negative integer) values, ascending: the order `_dense_rank` ranks them in."""
    present = np.zeros(int(values.max(initial=0)) + 1, dtype=bool)
    present[values] = True
    return np.flatnonzero(present)


def _dense_rank(values: np.ndarray) -> tuple[np.ndarray, int]:
    """Each value's rank among the distinct values, and how many distinct values there are."""
    values = values.astype(np.int64, copy=False)
    present = np.zeros(int(values.max(initial=0)) + 1, dtype=bool)
    present[values] = True
    rank = np.cumsum(present) - 1
    return rank[values], int(present.sum())
