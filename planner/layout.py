"""Rank layout: which ranks form each tp / cp / dp / pp group, and which link tier each group crosses.

DESIGN.md fixes the order of the axes (planner.specs.MESH_AXES, outermost first):
rank = ((pp_i * dp + dp_i) * cp + cp_i) * tp + tp_i, TP innermost so TP groups stay inside a node. The planner's
bandwidth tiers and the executor's DeviceMesh both come from here.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import lru_cache
from typing import Literal

import numpy as np

from planner.specs import MESH_AXES, Degrees, MeshAxis

# Gradients are reduced over dp and cp together (Megatron-LM's data-parallel group with context parallelism);
# cp sits next to dp in the rank order, so the merged group is the dp axis of a mesh with dp x cp data ranks.
# Expert parallelism splits that merged group: "ep" is ep consecutive ranks of it (one copy of every expert, the
# dispatch all-to-all's group), "edp" the ranks that hold the same experts (their gradients' reduction).
GroupAxis = MeshAxis | Literal["dp_cp", "ep", "edp"]


def rank_of(coords: dict[MeshAxis, int], degrees: Degrees) -> int:
    """The global rank at `coords` (an index along every axis): row-major over MESH_AXES."""
    rank = 0
    for axis in MESH_AXES:
        rank = rank * getattr(degrees, axis) + coords[axis]
    return rank


def coords_of(rank: int, degrees: Degrees) -> dict[MeshAxis, int]:
    """`rank`'s index along every axis (the inverse of `rank_of`)."""
    indices = np.unravel_index(rank, degrees)
    return {axis: int(index) for axis, index in zip(MESH_AXES, indices, strict=True)}


def group_ranks(axis: MeshAxis, degrees: Degrees) -> np.ndarray:
    """All groups along `axis`: an array [num_groups, group_size] of global ranks."""
    grid = np.arange(degrees.world).reshape(degrees)
    along_last = np.moveaxis(grid, MESH_AXES.index(axis), -1)
    return along_last.reshape(-1, along_last.shape[-1])


@dataclass(frozen=True)
class GroupPlacement:
    """How the groups of one axis sit on the nodes (the worst group, since a collective waits for it)."""

    axis: GroupAxis
    size: int
    intra_node: bool  # every group lies inside one node
    members_per_node: int  # fewest members any group has on one of its nodes
    neighbours_cross_nodes: bool  # some pair of consecutive members (pipeline p2p) sits on two nodes
    nodes: int = 1  # most nodes any one group spans


def expert_group_ranks(degrees: Degrees, ep: int) -> tuple[np.ndarray, np.ndarray]:
    """The expert-parallel groups and the expert-data-parallel groups, each [num_groups, group_size] of ranks.

    Each dp x cp group is cut into runs of ep consecutive members (the ep groups, DESIGN.md); the members at the
    same position of every run hold the same experts (the edp groups). ep must divide dp x cp."""
    data = axis_groups("dp_cp", degrees)  # [groups, dp * cp]
    assert data.shape[1] % ep == 0, "ep divides dp x cp"
    runs = data.reshape(data.shape[0], data.shape[1] // ep, ep)  # [groups, edp, ep]
    return runs.reshape(-1, ep), np.swapaxes(runs, 1, 2).reshape(-1, data.shape[1] // ep)


def axis_groups(axis: GroupAxis, degrees: Degrees, ep: int = 1) -> np.ndarray:
    """All groups along `axis` (a mesh axis, the merged dp x cp group, or an expert grouping of it)."""
    if axis == "dp_cp":
        return group_ranks("dp", degrees._replace(dp=degrees.dp * degrees.cp, cp=1))
    if axis in ("ep", "edp"):
        ep_groups, edp_groups = expert_group_ranks(degrees, ep)
        return ep_groups if axis == "ep" else edp_groups
    return group_ranks(axis, degrees)


@lru_cache(maxsize=4096)
def placement(axis: GroupAxis, degrees: Degrees, gpus_per_node: int, ep: int = 1) -> GroupPlacement:
    """Where the groups along `axis` of a mesh of `degrees` sit on nodes of `gpus_per_node` ranks (`ep` only
    matters to the expert groupings)."""
    if ep == 1 and axis in ("ep", "edp"):  # without expert parallelism: no need to walk the ranks again
        return _without_expert_parallelism(axis, degrees, gpus_per_node)
    groups = axis_groups(axis, degrees, ep)
    nodes = groups // gpus_per_node
    size = groups.shape[1]
    intra = bool((nodes == nodes[:, :1]).all())
    return GroupPlacement(
        axis=axis,
        size=size,
        intra_node=intra,
        members_per_node=size if intra else _fewest_members_per_node(nodes),
        neighbours_cross_nodes=bool((nodes[:, 1:] != nodes[:, :-1]).any()),
        nodes=int(1 + (nodes[:, 1:] != nodes[:, :-1]).sum(axis=1).max()) if size > 1 else 1,
    )


def _without_expert_parallelism(axis: GroupAxis, degrees: Degrees, gpus_per_node: int) -> GroupPlacement:
    """With ep = 1 every ep group is one rank, and every edp group a whole dp x cp group (`expert_group_ranks`)."""
    if axis == "ep":
        return GroupPlacement(axis, size=1, intra_node=True, members_per_node=1, neighbours_cross_nodes=False)
    return replace(placement("dp_cp", degrees, gpus_per_node), axis=axis)


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
