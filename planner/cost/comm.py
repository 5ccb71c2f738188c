"""Collective and point-to-point times: the alpha-beta model with nccl-tests' bus-bandwidth factors.

nccl-tests (doc/PERFORMANCE.md) defines bus bandwidth so that it is comparable to the link's speed whatever
the group size n: busbw = algbw * 2(n-1)/n for all_reduce, algbw * (n-1)/n for all_gather, reduce_scatter and
alltoall, with algbw = bytes / time. Inverting gives the times below (Thakur et al. 2005 for the ring
algorithms behind them). Latency is a ring's: alpha, one collective's latency on two ranks, plus what each further
step of the ring adds (Thakur et al. 2005: a ring of p ranks pays (p - 1) alpha for all_gather and reduce_scatter,
2(p - 1) for all_reduce; NCCL's tuner charges intra-node steps at the intra-node hop's latency and the N - 1 steps
between a group's N nodes at the network hop's, src/graph/tuning.cc). On a thousand ranks that is milliseconds
per collective, whatever its size.

All functions take and return SI units and broadcast over numpy arrays, so the search can cost many
candidates at once. A group of one rank costs nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from planner.cost.measured import ProfileCosts
from planner.layout import GroupPlacement
from planner.specs import ClusterSpec


@dataclass(frozen=True)
class Channel:
    """The speed a group's collectives see: bus bandwidth (B/s), one collective's latency on two ranks (s) and the
    mean latency each further step of a ring over the group adds (s)."""

    # Scalars for one plan, (N, 1) columns for a search's batch (planner/cost/batch.py).
    bus_bandwidth_Bps: float | np.ndarray
    latency_s: float | np.ndarray
    ring_step_latency_s: float | np.ndarray = 0.0

    def take(self, rows) -> Channel:
        """The rows `rows` of a channel whose fields are columns (a search's batch)."""
        return Channel(self.bus_bandwidth_Bps[rows], self.latency_s[rows], self.ring_step_latency_s[rows])


def group_channel(cluster: ClusterSpec, group: GroupPlacement, measured: ProfileCosts | None = None) -> Channel:
    """Inside a node a group runs at the intra-node (NVLink) bus bandwidth. Across nodes, NCCL spreads its rings
    over the NICs of the group's members on each node, so the group gets members_per_node GPUs' network share
    (the DGX rail layout: one NIC per GPU), never more than the intra-node links carry. With a profile attached,
    each tier's speed is its measured all_reduce fit (the inter-node tier was measured with every GPU of a node
    sending at once, so per GPU, as the formula wants). A ring over the group takes n - 1 steps, N - 1 of them
    between its N nodes (NCCL src/graph/tuning.cc `nInterSteps`): its mean step latency weighs the two hops so."""
    intra = tier_channel(cluster, "intra_node", "all_reduce", group.size, measured)
    if group.intra_node:
        return intra
    inter = tier_channel(cluster, "inter_node", "all_reduce", group.size, measured)
    bandwidth = min(intra.bus_bandwidth_Bps, group.members_per_node * inter.bus_bandwidth_Bps)
    inter_steps, steps = group.nodes - 1, group.size - 1
    step_s = ((steps - inter_steps) * intra.ring_step_latency_s + inter_steps * inter.ring_step_latency_s) / steps
    return Channel(bandwidth, inter.latency_s, step_s)


def all_to_all_channel(cluster: ClusterSpec, group: GroupPlacement, measured: ProfileCosts | None = None) -> Channel:
    """The channel an all-to-all over the group sees. Inside a node, the intra-node tier. Across nodes, unlike a
    ring (`group_channel`), every rank sends its own (n - m)/n share to the other nodes' ranks through its own NIC
    (m: its node's members of the group), so the network link of one GPU carries it: the channel's bandwidth is
    that link's scaled by (n - 1)/(n - m), so that `all_to_all_s`'s (n-1)/n S / busbw is (n - m)/n S over the link
    (why Megatron-Core's MoE guide, megatron/core/transformer/moe/README.md, keeps the ep all-to-all inside the
    NVLink domain where it can)."""
    intra = tier_channel(cluster, "intra_node", "all_to_all", group.size, measured)
    if group.intra_node:
        return intra
    inter = tier_channel(cluster, "inter_node", "all_to_all", group.size, measured)
    n, local = group.size, group.members_per_node
    return Channel(inter.bus_bandwidth_Bps * (n - 1) / (n - local), inter.latency_s, inter.ring_step_latency_s)


def fsdp_channel(cluster: ClusterSpec, group: GroupPlacement, op: str, measured: ProfileCosts | None = None) -> Channel:
    """One FSDP2 unit's `op` ("fsdp_all_gather" or "fsdp_reduce_scatter") on the group as the profile measured
    it, the framework's work around the collective included (profiler/collectives.py), on the slowest tier the
    group spans; without such a fit, the group's bare channel (`group_channel`)."""
    tier = "intra_node" if group.intra_node else "inter_node"
    fit = measured.channel_fit(op, tier, group.size) if measured is not None else None
    if fit is None:
        return group_channel(cluster, group, measured)
    return Channel(fit.bandwidth_GBps * 1e9, fit.latency_s)


@dataclass(frozen=True)
class DpChannels:
    """The data-parallel group's channels: DDP's bucketed collectives (and ZeRO-1's) run bare, FSDP2's per unit."""

    bare: Channel
    fsdp_gather: Channel
    fsdp_scatter: Channel

    @classmethod
    def of(cls, cluster: ClusterSpec, group: GroupPlacement, measured: ProfileCosts | None = None) -> DpChannels:
        ops = ("fsdp_all_gather", "fsdp_reduce_scatter")
        gather, scatter = (fsdp_channel(cluster, group, op, measured) for op in ops)
        return cls(group_channel(cluster, group, measured), gather, scatter)

    def take(self, rows) -> DpChannels:
        return DpChannels(self.bare.take(rows), self.fsdp_gather.take(rows), self.fsdp_scatter.take(rows))


def p2p_channel(cluster: ClusterSpec, group: GroupPlacement, measured: ProfileCosts | None = None) -> Channel:
    """Pipeline neighbours: one GPU to one GPU, over the network when any pair of neighbours spans two nodes."""
    tier = "inter_node" if group.neighbours_cross_nodes else "intra_node"
    return tier_channel(cluster, tier, "send_recv", 2, measured)


def channel_source(measured: ProfileCosts | None, group: GroupPlacement, p2p: bool = False) -> str:
    """The source "profile" when the channel `group_channel` (or, for `p2p`, `p2p_channel`) gives this group comes from
    the profile's fits (`measured`) on every tier it uses, else "analytic" (no profile, no fit, or a lone rank)."""
    if measured is None or group.size < 2:
        return "analytic"
    if p2p:
        tiers = ["inter_node" if group.neighbours_cross_nodes else "intra_node"]
    else:
        tiers = ["intra_node"] if group.intra_node else ["intra_node", "inter_node"]
    op = "send_recv" if p2p else "all_reduce"
    fitted = all(measured.channel_fit(op, tier, group.size) is not None for tier in tiers)
    return "profile" if fitted else "analytic"


def tier_channel(
    cluster: ClusterSpec, tier: str, op: str, group_size: int, measured: ProfileCosts | None = None
) -> Channel:
    """One link tier's channel: the profile's fit of `op` there when it has one (`measured`, planner/cost/
    measured.py; its latency as measured, without further ring steps), else the GPU preset's link (or the user's
    override)."""
    fit = measured.channel_fit(op, tier, group_size) if measured is not None else None
    if fit is not None:
        return Channel(fit.bandwidth_GBps * 1e9, fit.latency_s)
    link = cluster.intra_link if tier == "intra_node" else cluster.inter_link
    return Channel(link.bus_bandwidth_Bps, link.latency_s, link.ring_step_latency_s)


def ring_latency_s(steps_per_rank: int, n, channel: Channel):
    """A ring collective's latency on `n` ranks, `steps_per_rank` ring steps per rank beyond the first (1 for
    all_gather and reduce_scatter, 2 for all_reduce): alpha on two ranks plus a step latency for each further step
    (module docstring). 0 for a lone rank."""
    n = np.asarray(n, dtype=float)
    further_steps = steps_per_rank * np.maximum(n - 2, 0)
    return (n > 1) * (channel.latency_s + further_steps * channel.ring_step_latency_s)


def all_reduce_s(size_bytes, n, channel: Channel):
    """Ring all-reduce of `size_bytes` per rank: 2(n-1)/n * S / busbw + its ring latency (nccl-tests)."""
    n = np.asarray(n, dtype=float)
    return ring_latency_s(2, n, channel) + 2 * (n - 1) / n * size_bytes / channel.bus_bandwidth_Bps


def all_gather_s(total_bytes, n, channel: Channel):
    """All-gather producing `total_bytes` on every rank: (n-1)/n * S / busbw + its ring latency (nccl-tests)."""
    n = np.asarray(n, dtype=float)
    return ring_latency_s(1, n, channel) + (n - 1) / n * total_bytes / channel.bus_bandwidth_Bps


def reduce_scatter_s(total_bytes, n, channel: Channel):
    """Reduce-scatter of a `total_bytes` input per rank: (n-1)/n * S / busbw + its ring latency (nccl-tests)."""
    return all_gather_s(total_bytes, n, channel)


def all_to_all_s(size_bytes, n, channel: Channel):
    """All-to-all of `size_bytes` per rank, a 1/n share of it to each peer: (n-1)/n * S / busbw (nccl-tests
    doc/PERFORMANCE.md, alltoall's bus-bandwidth factor) + one latency, since its n - 1 sends go out at once
    (nccl-tests src/alltoall.cu issues an ncclSend and an ncclRecv per peer inside one group). 0 for a lone rank."""
    n = np.asarray(n, dtype=float)
    return (n > 1) * (channel.latency_s + (n - 1) / n * size_bytes / channel.bus_bandwidth_Bps)


def p2p_s(size_bytes, channel: Channel):
    """One send/recv: alpha + S / bandwidth (nccl-tests sendrecv: busbw = algbw)."""
    return channel.latency_s + size_bytes / channel.bus_bandwidth_Bps
