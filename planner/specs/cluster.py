"""The cluster a plan runs on: GPUs and their links (the contract's `cluster`). A GPU is a full GpuSpec here;
preset names are resolved at the edge (planner/request.py `resolve_cluster`)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator

from planner.specs.base import MAX_GPUS, Degree, Frozen, Int, Precision, Real, Text


class LinkSpec(Frozen):
    """One link tier, per GPU and per direction. `efficiency` = achievable nccl-tests bus bandwidth / line rate;
    `latency_s` = one collective's latency on two ranks; `ring_step_latency_s` = what each further step of a ring
    collective adds over this link (planner/cost/comm.py)."""

    name: Text
    bandwidth_GBps: Annotated[Real, Field(gt=0)]
    efficiency: Annotated[Real, Field(gt=0, le=1)] = 1.0
    latency_s: Annotated[Real, Field(ge=0)] = 0.0
    source: Text = ""
    ring_step_latency_s: Annotated[Real, Field(ge=0)] = 0.0

    @property
    def bus_bandwidth_Bps(self) -> float:
        return self.bandwidth_GBps * 1e9 * self.efficiency


class GpuSpec(Frozen):
    """One accelerator as the cost model needs it. Peak numbers are dense (no sparsity), from the datasheet.

    `peak_tflops` must hold fp16 and fp32, and bf16 where the GPU has it. A GPU without bf16 tensor cores (V100)
    leaves bf16 out: a request for bf16 on it is refused, one naming no precision is costed in fp16."""

    name: Text
    kind: Literal["gpu", "cpu"] = "gpu"
    memory_bytes: Annotated[Int, Field(gt=0)]
    # The schema states the validator's rule too, so a client (or a schema fuzzer) reads it there.
    peak_tflops: Annotated[
        dict[Precision, Annotated[Real, Field(gt=0)]], Field(json_schema_extra={"required": ["fp16", "fp32"]})
    ]
    hbm_GBps: Annotated[Real, Field(gt=0)]
    intra_node: LinkSpec
    inter_node: LinkSpec
    # Achievable fraction of peak for the large GEMMs of a transformer; see planner/cost/compute.py.
    matmul_efficiency: Annotated[Real, Field(gt=0, le=1)]
    # Achievable fraction of peak for fused (flash) attention, forward and backward; None: as matmul_efficiency.
    attention_efficiency: Annotated[Real, Field(gt=0, le=1)] | None = None
    memory_efficiency: Annotated[Real, Field(gt=0, le=1)] = 0.8
    # Streaming multiprocessors (compute units on AMD), over which a GEMM's output tiles run in waves
    # (planner/cost/compute.py `wave_efficiency`); None: not known, GEMMs run at matmul_efficiency whatever their shape.
    sm_count: Annotated[Int, Field(gt=0)] | None = None
    source: Text = ""
    # The host side, for CPU offload (planner/cost/offload.py): the achievable host <-> device copy rate of one GPU's
    # PCIe link per direction, and the RAM of the node it comes in (the reference system's). None: not known for
    # this GPU; an offloading plan then needs the cluster's override.
    host_link_GBps: Annotated[Real, Field(gt=0)] | None = None
    host_memory_per_node_bytes: Annotated[Int, Field(gt=0)] | None = None
    host_source: Text = ""

    @field_validator("peak_tflops")
    @classmethod
    def _required_precisions(cls, value: dict[str, float]) -> dict[str, float]:
        missing = {"fp16", "fp32"} - set(value)  # every GPU has them; bf16 arrived with Ampere (A100)
        if missing:
            raise ValueError(f"peak_tflops lacks {sorted(missing)} (bf16 may be left out, fp16 and fp32 may not)")
        return value

    def supports(self, precision: str) -> bool:
        """Whether this GPU has a peak for `precision` (every GPU has fp16 and fp32; not every one has bf16)."""
        return precision in self.peak_tflops


class ClusterSpec(Frozen):
    """Identical nodes of `gpus_per_node` GPUs. `*_GBps` override the GPU preset's link line rates."""

    gpu: GpuSpec
    num_nodes: Degree = 1
    gpus_per_node: Annotated[Int, Field(ge=1, le=1024)] = 8
    intra_node_GBps: Annotated[Real, Field(gt=0)] | None = None
    inter_node_GBps: Annotated[Real, Field(gt=0)] | None = None
    # Override the GPU preset's host side (GpuSpec.host_link_GBps, host_memory_per_node_bytes): CPU offload's PCIe
    # rate per GPU and direction, and the RAM of one node that the offloaded states must fit in.
    host_link_GBps: Annotated[Real, Field(gt=0)] | None = None
    host_memory_per_node_bytes: Annotated[Int, Field(gt=0)] | None = None
    # A HardwareProfile file or stored id. The edge (planner/request.py) reads it; the cost model takes what it
    # measured as an explicit argument (planner.cost.measured.ProfileCosts), never through this spec.
    profile: Text | None = None

    @model_validator(mode="after")
    def _bounded_size(self) -> ClusterSpec:
        if self.num_gpus > MAX_GPUS:
            raise ValueError(
                f"cluster.num_nodes: {self.num_nodes} nodes x {self.gpus_per_node} GPUs = {self.num_gpus} GPUs, "
                f"over the {MAX_GPUS} this planner searches"
            )
        return self

    @property
    def num_gpus(self) -> int:
        return self.num_nodes * self.gpus_per_node

    @property
    def host_link_Bps(self) -> float | None:
        """Bytes per second one GPU copies to or from host memory (the override, else the GPU preset's)."""
        rate = self.host_link_GBps if self.host_link_GBps is not None else self.gpu.host_link_GBps
        return None if rate is None else rate * 1e9

    @property
    def host_memory_bytes(self) -> int | None:
        """RAM of one node (the override, else the GPU preset's reference node), or None: not known."""
        if self.host_memory_per_node_bytes is not None:
            return self.host_memory_per_node_bytes
        return self.gpu.host_memory_per_node_bytes

    @property
    def intra_link(self) -> LinkSpec:
        link = self.gpu.intra_node
        if self.intra_node_GBps is None:
            return link
        return link.model_copy(update={"bandwidth_GBps": self.intra_node_GBps, "source": "user override"})

    @property
    def inter_link(self) -> LinkSpec:
        link = self.gpu.inter_node
        if self.inter_node_GBps is None:
            return link
        return link.model_copy(update={"bandwidth_GBps": self.inter_node_GBps, "source": "user override"})
