"""The rank layout of DESIGN.md over many cluster shapes."""

from __future__ import annotations

import itertools
from dataclasses import replace

import numpy as np
import pytest

from planner.layout import axis_groups, coords_of, expert_group_ranks, group_ranks, placement, rank_of
from planner.specs import MESH_AXES, Degrees, ParallelPlan

SHAPES = [(pp, dp, cp, tp) for pp, dp, cp, tp in itertools.product([1, 2, 3, 4], [1, 2, 6], [1, 2], [1, 2, 4, 8])]


@pytest.mark.parametrize(("pp", "dp", "cp", "tp"), SHAPES)
def test_every_axis_partitions_the_ranks(pp, dp, cp, tp):
    world = pp * dp * cp * tp
    for axis in MESH_AXES:
        groups = group_ranks(axis, Degrees(pp=pp, dp=dp, cp=cp, tp=tp))
        assert sorted(groups.ravel().tolist()) == list(range(world))
        assert groups.shape[1] == {"pp": pp, "dp": dp, "cp": cp, "tp": tp}[axis]


@pytest.mark.parametrize(("pp", "dp", "cp", "tp"), SHAPES)
def test_rank_formula_and_its_inverse(pp, dp, cp, tp):
    degrees = Degrees(pp=pp, dp=dp, cp=cp, tp=tp)
    for rank in range(pp * dp * cp * tp):
        c = coords_of(rank, degrees)
        assert rank_of(c, degrees) == rank
        assert rank == ((c["pp"] * dp + c["dp"]) * cp + c["cp"]) * tp + c["tp"]  # DESIGN.md's formula
    groups = group_ranks("tp", degrees)
    assert (np.diff(groups, axis=1) == 1).all()  # TP innermost: consecutive ranks


@pytest.mark.parametrize("gpus_per_node", [4, 8])
def test_tp_within_node_and_dp_across(gpus_per_node):
    where = placement("tp", Degrees(pp=4, dp=4, cp=1, tp=gpus_per_node), gpus_per_node)
    assert where.intra_node and where.members_per_node == gpus_per_node
    dp = placement("dp", Degrees(pp=4, dp=4, cp=1, tp=gpus_per_node), gpus_per_node)
    assert not dp.intra_node and dp.members_per_node == 1
    pp = placement("pp", Degrees(pp=4, dp=4, cp=1, tp=gpus_per_node), gpus_per_node)
    assert pp.neighbours_cross_nodes


def test_tp_straddling_nodes_is_detected():
    # tp=8 on 6-GPU nodes cannot stay inside a node.
    assert not placement("tp", Degrees(pp=1, dp=3, cp=1, tp=8), 6).intra_node


def test_merged_dp_cp_group():
    where = placement("dp_cp", Degrees(pp=1, dp=4, cp=2, tp=1), 8)
    assert where.size == 8 and where.intra_node


@pytest.mark.parametrize(("pp", "dp", "cp", "tp"), [s for s in SHAPES if s[1] * s[2] % 2 == 0])
@pytest.mark.parametrize("ep", [1, 2])
def test_expert_groups_cut_each_data_group_into_consecutive_runs(pp, dp, cp, tp, ep):
    degrees = Degrees(pp=pp, dp=dp, cp=cp, tp=tp)
    ep_groups, edp_groups = expert_group_ranks(degrees, ep)
    assert ep_groups.shape[1] == ep and edp_groups.shape[1] == dp * cp // ep
    for groups in (ep_groups, edp_groups):
        assert sorted(groups.ravel().tolist()) == list(range(degrees.world))
    data = {frozenset(g) for g in axis_groups("dp_cp", degrees).tolist()}
    for group in ep_groups.tolist():
        # ep consecutive members of one dp x cp group: stride tp in global ranks
        assert any(set(group) <= d for d in data) and (np.diff(group) == tp).all()
    for expert_group, replicas in itertools.product(ep_groups.tolist(), edp_groups.tolist()):
        assert len(set(expert_group) & set(replicas)) <= 1  # one rank in common at most: ep x edp tiles a group


def test_expert_groups_stay_inside_a_node_where_they_fit():
    degrees = Degrees(pp=1, dp=16, cp=1, tp=1)
    assert placement("ep", degrees, 8, 8).intra_node
    assert not placement("edp", degrees, 8, 8).intra_node
    assert not placement("ep", Degrees(pp=1, dp=8, cp=1, tp=2), 8, 8).intra_node  # tp x ep = 16 > 8


def test_a_plans_degrees_are_its_axes_in_rank_order():
    plan = ParallelPlan(dp=3, tp=2, pp=4, cp=5)
    assert plan.degrees == Degrees(pp=4, dp=3, cp=5, tp=2) == (4, 3, 5, 2)
    assert plan.degrees._fields == MESH_AXES
    assert plan.num_gpus == plan.degrees.world == 120


@pytest.mark.parametrize("degrees", [Degrees(dp=8, tp=2, pp=4, cp=2), Degrees(dp=3, tp=8, pp=1, cp=1)])
def test_without_expert_parallelism_the_expert_groups_are_placed_without_walking_the_ranks(degrees):
    """ep = 1: each ep group is one rank and each edp group a whole dp x cp group, so their placements are those."""
    assert (axis_groups("edp", degrees, 1) == axis_groups("dp_cp", degrees)).all()
    assert axis_groups("ep", degrees, 1).shape == (degrees.world, 1)
    for gpus_per_node in (4, 8):
        edp = placement("edp", degrees, gpus_per_node, 1)
        assert edp == replace(placement("dp_cp", degrees, gpus_per_node), axis="edp")
        alone = placement("ep", degrees, gpus_per_node, 1)
        assert (alone.size, alone.intra_node, alone.members_per_node, alone.nodes) == (1, True, 1, 1)
        assert not alone.neighbours_cross_nodes
