"""The cost model's answer for one (model, training, cluster, plan): time, memory, breakdown."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from planner.specs.base import Frozen


class StageMemory(Frozen):
    """Peak bytes on one GPU of one pipeline stage (device), split by what holds them."""

    stage: int
    layers: int
    params_bytes: float
    grads_bytes: float
    optimizer_bytes: float
    activations_bytes: float
    other_bytes: float
    total_bytes: float
    capacity_bytes: float
    over_bytes: float  # > 0: does not fit, by this many bytes
    # Host (CPU) memory one GPU of this stage keeps offloaded (plan.offload); not part of total_bytes.
    host_bytes: float = 0.0


class MemoryEstimate(Frozen):
    peak_bytes: float
    peak_stage: int
    capacity_bytes: float
    by_stage: list[StageMemory]
    # CPU offload (plan.offload): host bytes one node's GPUs keep offloaded, and the node's RAM
    # (cluster.host_memory_per_node_bytes; null: not known). Host memory, never counted in the GPU's peak.
    host_bytes_per_node: float = 0.0
    host_capacity_bytes: float | None = None

    @property
    def allocated_peak_bytes(self) -> float:
        """The peak of the stage that peaks, without the bytes the CUDA caching allocator does not count as
        allocated (the `other` term: context, NCCL buffers, fragmentation): what torch.cuda.max_memory_allocated,
        the executor's measured peak on a GPU, compares with."""
        return max(stage.total_bytes - stage.other_bytes for stage in self.by_stage)


class TimeBreakdown(Frozen):
    """Seconds of one step on the critical path; the terms add up to `step_time_s`.

    The one list of the breakdown's terms, in the order they happen, each described as a reader sees it (the CLI's
    table and the OpenAPI schema read the descriptions). planner/cost/step.py `step_times` answers every field."""

    compute_s: float = Field(description="compute")
    tp_comm_s: float = Field(description="tensor-parallel comm")
    cp_comm_s: float = Field(description="context-parallel comm")
    # A mixture of experts' dispatch and combine all-to-alls over the ep group (planner/cost/expert.py).
    ep_comm_s: float = Field(0.0, description="expert-parallel all-to-all")
    pp_comm_s: float = Field(description="pipeline p2p comm")
    # Exposed part only: the rest overlaps with backward.
    dp_comm_s: float = Field(description="data-parallel comm (exposed)")
    bubble_s: float = Field(description="pipeline bubble")
    # Adding each micro-batch's gradients into those held, where the stack does not fuse it (planner/cost/
    # accumulation.py).
    accumulation_s: float = Field(0.0, description="gradient accumulation")
    optimizer_s: float = Field(description="optimizer step")
    # Exposed part only: CPU offload's PCIe copies that neither backward nor compute hides (planner/cost/offload.py).
    offload_s: float = Field(0.0, description="CPU offload PCIe (exposed)")

    @property
    def total_s(self) -> float:
        return sum(self.model_dump().values())


Scale = Literal["one node", "several nodes"]


class EstimateUncertainty(Frozen):
    """How far runs like this one measured from their estimates: the 5th and 95th percentiles of measured /
    predicted over the validated runs of the same regime and scale, so that `coverage` (90%) of them lie inside
    the band. Fitted by `python -m planner.calibration bands` into planner/data/uncertainty.json. Bounds are null
    where no comparable run was measured (`step_time_basis`, `peak_memory_basis` say why); never guessed."""

    regime: str = Field(description="the training stack's regime (planner/cost/runtime.py), e.g. megatron")
    scale: Scale
    coverage: float = Field(description="share of the comparable runs inside each band")
    step_time_runs: int = Field(description="comparable runs with a measured step time (0: no band)")
    step_time_low_s: float | None
    step_time_high_s: float | None
    step_time_low_ratio: float | None = Field(description="measured / predicted step time, 5th percentile")
    step_time_high_ratio: float | None = Field(description="measured / predicted step time, 95th percentile")
    step_time_basis: str = Field(description="the runs behind the band, or why there is none")
    peak_memory_runs: int = Field(description="comparable runs with a measured peak memory (0: no band)")
    peak_bytes_low: float | None
    peak_bytes_high: float | None
    peak_bytes_low_ratio: float | None = Field(description="measured / predicted peak memory, 5th percentile")
    peak_bytes_high_ratio: float | None = Field(description="measured / predicted peak memory, 95th percentile")
    peak_memory_basis: str = Field(description="the runs behind the band, or why there is none")
    fitted: str | None = Field(description="when the bands were fitted (null: no bands stored)")


class OffloadTraffic(Frozen):
    """What CPU offload (plan.offload) moves over one GPU's PCIe link each step, on the GPU whose stage moves the
    most, and how long it takes (planner/cost/offload.py)."""

    offload: str = Field(description="plan.offload: optimizer or optimizer_and_params")
    device_to_host_bytes: float = Field(description="gradients to the host, per GPU and step")
    host_to_device_bytes: float = Field(description="weights to the GPU (updated, or fetched per pass), per GPU")
    host_link_GBps: float = Field(description="the PCIe rate per GPU and direction it moves at")
    device_to_host_s: float
    host_to_device_s: float
    exposed_s: float = Field(description="the part on the critical path (the breakdown's offload_s)")
    cpu_optimizer_s: float = Field(description="the CPU optimizer step (the breakdown's optimizer_s)")


class StepEstimate(Frozen):
    """The cost model's answer for one (model, training, cluster, plan)."""

    step_time_s: float
    tokens_per_s: float
    tokens_per_s_per_gpu: float
    model_tflops_per_gpu: float
    hardware_tflops_per_gpu: float
    mfu: float
    hfu: float
    fits: bool
    num_microbatches: int
    memory: MemoryEstimate
    breakdown: TimeBreakdown
    # Which model each term came from ("analytic" now; "profile" once a HardwareProfile supplies it).
    sources: dict[str, str]
    # The spread of comparable validated runs around their estimates (DESIGN.md "The contract").
    uncertainty: EstimateUncertainty
    why_not_fits: list[str] = []
    assumptions: list[str] = []
    # CPU offload's PCIe traffic and CPU step; null without offload.
    offload: OffloadTraffic | None = None


class ScheduledTask(Frozen):
    """One task of a pipeline's step as a timeline draws it: a bar on `device` from `start_s` to `end_s`."""

    device: int
    chunk: int  # the model chunk, in pipeline order (chunk c runs on device c % pp)
    microbatch: int
    kind: Literal["forward", "recompute", "backward"]
    start_s: float
    end_s: float


class PipelineTimeline(Frozen):
    """A plan's pipeline schedule (planner/cost/schedule.py): every forward, recompute and backward task of one
    step with its start and end, each as early as what it waits for allows. `pipeline_time_s`, the longest path,
    equals the estimate's compute + bubble for even stages without a calibrated profile's overheads."""

    pipeline_time_s: float
    num_microbatches: int
    tasks: list[ScheduledTask]
