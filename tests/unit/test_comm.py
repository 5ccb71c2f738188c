"""Alpha-beta collective times with nccl-tests bus-bandwidth factors, and link tiers from the layout."""

from __future__ import annotations

import numpy as np
import pytest

from planner.cost import comm
from planner.layout import placement
from planner.presets import gpu_preset
from planner.specs import ClusterSpec, Degrees

CH = comm.Channel(bus_bandwidth_Bps=100e9, latency_s=1e-5)


def test_nccl_tests_factors():
    size = 1e9
    assert comm.all_reduce_s(size, 8, CH) == pytest.approx(1e-5 + 2 * 7 / 8 * size / 100e9)
    assert comm.all_gather_s(size, 8, CH) == pytest.approx(1e-5 + 7 / 8 * size / 100e9)
    assert comm.reduce_scatter_s(size, 4, CH) == pytest.approx(1e-5 + 3 / 4 * size / 100e9)
    assert comm.p2p_s(size, CH) == pytest.approx(1e-5 + size / 100e9)


def test_group_of_one_costs_nothing():
    assert comm.all_reduce_s(1e9, 1, CH) == 0.0


def test_vectorised_over_candidates():
    times = comm.all_reduce_s(np.array([1e6, 1e9]), np.array([1, 16]), CH)
    assert times[0] == 0.0 and times[1] == pytest.approx(1e-5 + 2 * 15 / 16 * 1e9 / 100e9)


def test_tiers_follow_the_layout():
    cluster = ClusterSpec(gpu=gpu_preset("a100-80gb"), num_nodes=16, gpus_per_node=8)
    tp_group = placement("tp", Degrees(pp=2, dp=8, cp=1, tp=8), 8)
    dp_group = placement("dp", Degrees(pp=2, dp=8, cp=1, tp=8), 8)
    assert tp_group.intra_node and not dp_group.intra_node
    nvlink = comm.group_channel(cluster, tp_group)
    assert nvlink.bus_bandwidth_Bps == pytest.approx(300e9 * 0.77)
    # Each dp group has one member per node: one GPU's network share.
    network = comm.group_channel(cluster, dp_group)
    assert network.bus_bandwidth_Bps == pytest.approx(25e9 * 0.86)
    # A dp group with all 8 GPUs of each node spreads over all 8 NICs.
    wide = comm.group_channel(cluster, placement("dp", Degrees(pp=1, dp=128, cp=1, tp=1), 8))
    assert wide.bus_bandwidth_Bps == pytest.approx(8 * 25e9 * 0.86)


def test_override_replaces_line_rate():
    cluster = ClusterSpec(gpu=gpu_preset("h100-sxm"), num_nodes=2, inter_node_GBps=100)
    assert cluster.inter_link.bandwidth_GBps == 100 and cluster.inter_link.source == "user override"
