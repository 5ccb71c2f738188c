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


def test_a_ring_pays_a_step_latency_for_every_rank_beyond_two():
    # Thakur et al. 2005: a ring of p ranks takes p - 1 steps (all_gather, reduce_scatter), 2(p - 1) (all_reduce).
    ring = comm.Channel(bus_bandwidth_Bps=100e9, latency_s=10e-6, ring_step_latency_s=2e-6)
    size = 1e9
    assert comm.all_gather_s(size, 5, ring) == pytest.approx(10e-6 + 3 * 2e-6 + 4 / 5 * size / 100e9)
    assert comm.reduce_scatter_s(size, 5, ring) == pytest.approx(10e-6 + 3 * 2e-6 + 4 / 5 * size / 100e9)
    assert comm.all_reduce_s(size, 5, ring) == pytest.approx(10e-6 + 6 * 2e-6 + 2 * 4 / 5 * size / 100e9)
    # Two ranks pay the measured two-rank latency alone, one rank nothing.
    assert comm.all_reduce_s(size, 2, ring) == pytest.approx(10e-6 + size / 100e9)
    assert comm.all_gather_s(size, 1, ring) == 0.0


def test_a_group_across_nodes_weighs_its_ring_steps_by_the_hops_they_cross():
    # 32 ranks on 4 nodes: 31 ring steps, 3 of them between nodes (NCCL src/graph/tuning.cc `nInterSteps`).
    cluster = ClusterSpec(gpu=gpu_preset("a100-80gb"), num_nodes=4, gpus_per_node=8)
    group = placement("dp", Degrees(pp=1, dp=32, cp=1, tp=1), 8)
    assert group.nodes == 4 and group.members_per_node == 8
    channel = comm.group_channel(cluster, group)
    assert channel.ring_step_latency_s == pytest.approx((28 * 3.4e-6 + 3 * 14e-6) / 31)
    assert channel.latency_s == pytest.approx(20e-6)
    # A thousand ranks: milliseconds of latency per collective whatever its size.
    big = ClusterSpec(gpu=gpu_preset("a100-80gb"), num_nodes=192, gpus_per_node=8)
    wide = comm.group_channel(big, placement("dp", Degrees(pp=1, dp=1536, cp=1, tp=1), 8))
    assert comm.all_gather_s(0.0, 1536, wide) == pytest.approx(20e-6 + (1344 * 3.4e-6 + 191 * 14e-6) * 1534 / 1535)
    inside = comm.group_channel(cluster, placement("tp", Degrees(pp=1, dp=4, cp=1, tp=8), 8))
    assert inside.ring_step_latency_s == pytest.approx(3.4e-6)
