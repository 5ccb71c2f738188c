"""The one place a DeviceMesh is built: from a ParallelPlan, in the rank order of planner/layout.py.

DESIGN.md fixes rank = ((pp_i * dp + dp_i) * cp + cp_i) * tp + tp_i; `planner.specs.MESH_AXES` lists the axes
outermost first and `plan.degrees` their sizes in that order, so a row-major mesh of that shape puts every rank
where the planner's bandwidth tiers assumed it. Every axis is kept, size 1 included, so `mesh["tp"]` exists
whatever the plan and code that applies a technique never branches on which axes happen to be present.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from planner.specs import MESH_AXES

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh

    from planner.specs import ParallelPlan


def build_mesh(plan: ParallelPlan, device_type: str) -> DeviceMesh:
    """The (pp, dp, cp, tp) mesh of the running process group (which must have plan.num_gpus ranks)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    world = dist.get_world_size()
    if world != plan.num_gpus:
        raise ValueError(f"the plan needs dp x tp x pp x cp = {plan.num_gpus} processes, but {world} are running")
    return init_device_mesh(device_type, tuple(plan.degrees), mesh_dim_names=MESH_AXES)


EXPERT_MESH_AXES = ("pp", "edp", "ep", "tp")


def build_expert_mesh(plan: ParallelPlan, device_type: str) -> DeviceMesh:
    """The (pp, edp, ep, tp) mesh of expert parallelism: each dp x cp group of the plan's mesh (dp_cp index
    dp_i * cp + cp_i, the order of planner/layout.py) cut into edp runs of ep consecutive members. Its "ep" groups
    are planner.layout.expert_group_ranks' ep groups, its "edp" groups their edp groups (checked here)."""
    import torch
    from torch.distributed.device_mesh import DeviceMesh

    from planner.layout import expert_group_ranks

    edp = plan.dp * plan.cp // plan.ep
    grid = torch.arange(plan.num_gpus).reshape(plan.pp, edp, plan.ep, plan.tp)
    ep_groups, edp_groups = expert_group_ranks(plan.degrees, plan.ep)
    assert _same_groups(grid.movedim(2, -1).reshape(-1, plan.ep).numpy(), ep_groups), "ep groups follow the layout"
    assert _same_groups(grid.movedim(1, -1).reshape(-1, edp).numpy(), edp_groups), "edp groups follow the layout"
    return DeviceMesh(device_type, grid, mesh_dim_names=EXPERT_MESH_AXES)


def _same_groups(ours: Any, layout: Any) -> bool:
    """Whether two [groups, size] arrays of ranks list the same groups, in any order."""
    return sorted(map(tuple, ours.tolist())) == sorted(map(tuple, layout.tolist()))
