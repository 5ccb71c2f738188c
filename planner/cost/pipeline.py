"""Pipeline parallelism: which layers each device holds, the pipeline's busy time and bubble, and its
point-to-point traffic."""

from __future__ import annotations

from dataclasses import dataclass

from planner.graph import LayerCost
from planner.specs import ParallelPlan


@dataclass(frozen=True)
class DeviceLoad:
    """The layers one pipeline device (one GPU of each of its tp x cp x dp groups) runs, all chunks together."""

    device: int
    layers: tuple[LayerCost, ...]

    @property
    def num_blocks(self) -> int:
        return sum(layer.kind == "block" for layer in self.layers)

    @property
    def busy_s(self) -> float:
        """Forward + backward time of one micro-batch through all of this device's layers."""
        return sum(layer.busy_s for layer in self.layers)


def device_loads(plan: ParallelPlan, layers: list[LayerCost]) -> list[DeviceLoad]:
    """Split blocks into pp x virtual_stages contiguous chunks; chunk c runs on device c % pp (Narayanan et al.
    2021, sec. 2.2.2, interleaved assignment). The embedding joins the first chunk, the head the last."""
    blocks = [layer for layer in layers if layer.kind == "block"]
    embedding = [layer for layer in layers if layer.kind == "embedding"]
    head = [layer for layer in layers if layer.kind == "head"]
    per_device: list[list[LayerCost]] = [[] for _ in range(plan.pp)]
    start = 0
    counts = plan.stage_layer_counts(len(blocks))
    for chunk, count in enumerate(counts):
        chunk_layers = blocks[start : start + count]
        if chunk == 0:
            chunk_layers = embedding + chunk_layers
        if chunk == len(counts) - 1:
            chunk_layers = chunk_layers + head
        per_device[chunk % plan.pp].extend(chunk_layers)
        start += count
    return [DeviceLoad(device, tuple(layers)) for device, layers in enumerate(per_device)]


def pipeline_bubble_s(busy_per_device_s: list[float], virtual_stages: int) -> float:
    """A pipeline of p devices with per-micro-batch times t_i runs m * max(t) on the slowest device plus the
    fill/drain bubble (sum(t) - max(t)) / v, returned here. For equal stages this is Narayanan et al. 2021 eq. 1
    (bubble = (p - 1) t) and, interleaved, eq. 2 (bubble / v); GPipe's bubble equals 1F1B's (sec. 2.2.1)."""
    return (sum(busy_per_device_s) - max(busy_per_device_s)) / virtual_stages


def p2p_transfers_on_critical_path(plan: ParallelPlan, microbatches: int) -> int:
    """Each micro-batch crosses a device boundary forward and backward once per chunk (v of them when
    interleaved, Narayanan et al. 2021 sec. 2.2.2: "v times more communication"), and the first forward and
    last backward cross all pp - 1 boundaries while the pipeline fills and drains."""
    if plan.pp == 1:
        return 0
    return 2 * (plan.virtual_stages * microbatches + plan.pp - 1)
