"""Rank layout: which ranks form each tp / cp / dp / pp group, and which link tier each group crosses.

DESIGN.md fixes the order: rank = ((pp_i * dp + dp_i) * cp + cp_i) * tp + tp_i, TP innermost so TP groups stay
inside a node. The planner's bandwidth tiers and the executor's DeviceMesh both come from here.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING, Literal

import numpy as np

if TYPE_CHECKING:
    from planner.specs import ParallelPlan

Axis = Literal["pp", "dp", "cp", "tp"]
# Gradients are reduced over dp and cp together (Megatron-LM's data-parallel group with context parallelism);
# cp sits next to dp in the rank order, so the merged group is the dp axis of a (pp, dp*cp, 1, tp) mesh.
GroupAxis = Literal["pp", "dp", "cp", "tp", "dp_cp"]
AXES: tuple[Axis, ...] = ("pp", "dp", "cp", "tp")  # outermost first; the DeviceMesh dims in this order


def mesh_shape(pp: int, dp: int, cp: int, tp: int) -> tuple[int, int, int, int]:
    return (pp, dp, cp, tp)


def rank_of(pp_i: int, dp_i: int, cp_i: int, tp_i: int, *, dp: int, cp: int, tp: int) -> int:
    return ((pp_i * dp + dp_i) * cp + cp_i) * tp + tp_i


def coords_of(rank: int, *, dp: int, cp: int, tp: int) -> dict[Axis, int]:
    rest, tp_i = divmod(rank, tp)
    rest, cp_i = divmod(rest, cp)
    pp_i, dp_i = divmod(rest, dp)
    return {"pp": pp_i, "dp": dp_i, "cp": cp_i, "tp": tp_i}


def group_ranks(axis: Axis, pp: int, dp: int, cp: int, tp: int) -> np.ndarray:
    """All groups along `axis`: an array [num_groups, group_size] of global ranks."""
    grid = np.arange(pp * dp * cp * tp).reshape(mesh_shape(pp, dp, cp, tp))
    along_last = np.moveaxis(grid, AXES.index(axis), -1)
    return along_last.reshape(-1, along_last.shape[-1])


@dataclass(frozen=True)
class GroupPlacement:
    """How the groups of one axis sit on the nodes (the worst group, since a collective waits for it)."""

    axis: GroupAxis
    size: int
    intra_node: bool  # every group lies inside one node
    members_per_node: int  # fewest members any group has on one of its nodes
    neighbours_cross_nodes: bool  # some pair of consecutive members (pipeline p2p) sits on two nodes


@lru_cache(maxsize=4096)
def placement(axis: GroupAxis, pp: int, dp: int, cp: int, tp: int, gpus_per_node: int) -> GroupPlacement:
    groups = group_ranks("dp", pp, dp * cp, 1, tp) if axis == "dp_cp" else group_ranks(axis, pp, dp, cp, tp)
    nodes = groups // gpus_per_node
    size = groups.shape[1]
    intra = bool((nodes == nodes[:, :1]).all())
    return GroupPlacement(
        axis=axis,
        size=size,
        intra_node=intra,
        members_per_node=size if intra else _fewest_members_per_node(nodes),
        neighbours_cross_nodes=bool((nodes[:, 1:] != nodes[:, :-1]).any()),
    )


def plan_placement(axis: GroupAxis, plan: ParallelPlan, gpus_per_node: int) -> GroupPlacement:
    """`placement` of a plan's groups along `axis`: the degrees named, not passed as a positional tuple."""
    return placement(axis, plan.pp, plan.dp, plan.cp, plan.tp, gpus_per_node)


def _fewest_members_per_node(nodes: np.ndarray) -> int:
    """The smallest count of one group's members on one node, over all groups and their nodes.

    A group's ranks increase along its row, so its nodes do too and each node's members form one run: the
    answer is the shortest run. Runs start where the node changes (and at every row start); a run's length
    is the distance to the next start, the next row's first element closing the last run of a row."""
    assert (np.diff(nodes, axis=1) >= 0).all(), "group ranks are sorted"
    starts = np.ones(nodes.shape, dtype=bool)
    starts[:, 1:] = nodes[:, 1:] != nodes[:, :-1]
    positions = np.flatnonzero(starts)
    return int(np.diff(positions, append=nodes.size).min())
