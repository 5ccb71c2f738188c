"""The executor's DeviceMesh groups the same ranks as the planner's rank layout, on real gloo processes."""

from __future__ import annotations

import os
import socket

import pytest

torch = pytest.importorskip("torch")
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

from executor.mesh import build_mesh  # noqa: E402
from planner.layout import group_ranks  # noqa: E402
from planner.specs import MESH_AXES, ParallelPlan  # noqa: E402

PLAN = ParallelPlan(dp=2, tp=2, pp=2)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _check_groups(rank: int, world: int, port: int, failures) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        mesh = build_mesh(PLAN, "cpu")
        for axis in MESH_AXES:
            mine = sorted(dist.get_process_group_ranks(mesh[axis].get_group()))
            expected = next(sorted(g) for g in group_ranks(axis, PLAN.degrees).tolist()
                            if rank in g)  # fmt: skip
            if mine != expected:
                failures.append((rank, axis, mine, expected))
    finally:
        dist.destroy_process_group()


def test_mesh_groups_match_the_planner_rank_layout():
    manager = mp.Manager()
    failures = manager.list()
    mp.spawn(_check_groups, args=(PLAN.num_gpus, _free_port(), failures), nprocs=PLAN.num_gpus, join=True)
    assert list(failures) == []


def test_a_world_of_the_wrong_size_is_refused():
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        with pytest.raises(ValueError, match="needs dp x tp x pp x cp = 8 processes, but 1 are running"):
            build_mesh(PLAN, "cpu")
    finally:
        dist.destroy_process_group()
