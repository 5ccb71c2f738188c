"""Training-stack regimes: what the software that runs a plan does, as data the cost terms read.

The cost terms (data.py, tensor.py, pipeline.py, optimizer.py, memory.py) are physics: bytes over links, FLOPs
over peaks. Which bytes a stack keeps and moves, which wrapper its data parallelism uses, which collectives hold
the rank and how many extra reductions it runs each step are properties of the stack, not of the physics; they
live here, one frozen `Runtime` record per stack, chosen once per request (`runtime_for`) and passed to the cost
model explicitly (PlanBatch.runtime).

Today's instances describe paraplan's own executor as the cost model has always charged it, so every estimate is
unchanged by this record: `PARAPLAN_CUDA` (memory as a CUDA profile measured the executor), `PARAPLAN_CPU`
(gloo on CPUs) and `ANALYTIC` (no profile measured memory: ZeRO's Megatron-like mixed-precision accounting of
model states, the executor's wrappers for communication). Issue 28 adds Megatron-LM, DeepSpeed and FSDP instances.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import numpy as np

from planner.cost.memory import weight_bytes_per_param

if TYPE_CHECKING:
    from planner.cost.measured import ProfileCosts
    from planner.specs import ClusterSpec

FP32_BYTES = 4
MiB = 1024**2


@dataclass(frozen=True)
class Runtime:
    """What one training stack does that the cost model charges for. Bytes are per parameter element."""

    name: str
    source: str  # where the stack's behaviour is documented (its code, its docs, a measurement)

    # Memory (planner/cost/memory.py). `fp32_weights`: parameters stay fp32 and torch.autocast casts them per use,
    # so weights and gradients take 4 bytes each and the optimizer keeps no separate master copy (memory.py's
    # docstring); False: ZeRO's accounting (16-bit weights and gradients, fp32 master weights in the optimizer).
    fp32_weights: bool
    # The optimizer step peaks on its own (memory.device_memory): torch.optim's foreach AdamW temporaries, and the
    # gradients set to None before each step (`zero_grad(set_to_none=True)`), so forward may peak without them.
    optimizer_step_peak: bool

    # Communication volume. Gradients reduced over dp, the tied embedding's sync and ZeRO-1's weight gather move
    # the training dtype's bytes (`data_parallel_bytes`). The executor's gradients are fp32 (fp32_weights), so
    # its DDP and FSDP2 reductions really move 4 bytes; the cost model has always charged 2 in mixed precision,
    # and the numbers are kept as they are until a measurement settles it (the restructuring keeps behaviour).
    # `partial_gradient_bytes`: what the once-a-step reduction of sequence-parallel partial gradients and DDP's
    # bucket count use: the executor's fp32 gradients, 4 bytes, in every regime today.
    partial_gradient_bytes: int

    # Data-parallel wrappers (executor/parallel/data.py). ZeRO stages run on FSDP2 `fully_shard`, one unit per
    # block and the root; ZeRO-0 under tensor or pipeline parallelism on FSDP2 `replicate` (same units); the rest
    # on DDP (ZeRO-1 with torch's ZeroRedundancyOptimizer broadcasting each owner's share after the step).
    fully_shard_zero_stages: tuple[int, ...]
    replicate_under_model_parallel: bool
    # DDP's gradient buckets (torch.nn.parallel.DistributedDataParallel): the first holds 1 MiB
    # (dist._DEFAULT_FIRST_BUCKET_BYTES), the others bucket_cap_mb = 25 MiB.
    ddp_first_bucket_bytes: int
    ddp_bucket_bytes: int
    # FSDP2 issues its collectives synchronously on their own CUDA streams (torch/distributed/fsdp/_fully_shard/
    # _fsdp_collectives.py `foreach_reduce`); where streams are no-ops (CPU, gloo) they hold the rank: none hides.
    blocking_fsdp_collectives: bool
    # Parameters sharded by tp or wrapped by FSDP2 are DTensors: the optimizer steps them through DTensor's
    # dispatch (a profile's `sharded` timing) and the gradient norm reduces them over dp (executor/apply.py).
    dtensor_parameters: bool

    # Reductions each step beyond the gradients' (executor/apply.py): the gradient norm reduces each DTensor layout
    # of the gradients once, and tp gives two split over its ranks (column- and row-parallel matrices); pipeline
    # stages sum the loss and the squared gradient norm; the loss is averaged over dp.
    tp_norm_layouts: int
    pipeline_step_reductions: int
    dp_step_reductions: int

    # Host time the layers do not account for, per micro-batch on every device and per step (a calibrated
    # profile's fitted overheads add to these; measured.py). 0: none known for this stack.
    microbatch_host_overhead_s: float
    step_host_overhead_s: float

    def weight_bytes(self, precision: str) -> int:
        """Bytes of one weight (and of its gradient) as the stack holds it in memory."""
        return weight_bytes_per_param(precision, self.fp32_weights)

    def data_parallel_bytes(self, precision: str) -> int:
        """Bytes per element of the data-parallel collectives: the training dtype's (16-bit in mixed precision, ZeRO
        sec. 3.1), whatever `fp32_weights` says (see `partial_gradient_bytes` on why)."""
        return weight_bytes_per_param(precision)

    def on_fsdp2(self, zero_stage: np.ndarray, tp: np.ndarray, pp: int, shard_degree: np.ndarray) -> np.ndarray:
        """Rows whose data parallelism runs on FSDP2 (`fully_shard` or `replicate`); the rest run DDP, or nothing
        with a single data-parallel rank."""
        pure_dp = (tp == 1) & (pp == 1)
        fully_shard = np.isin(zero_stage, self.fully_shard_zero_stages)
        replicate = (zero_stage == 0) & ~pure_dp & self.replicate_under_model_parallel
        return (fully_shard | replicate) & (shard_degree > 1)


PARAPLAN_CUDA = Runtime(
    name="paraplan-cuda",
    source="executor/ (torch.autocast over fp32 parameters, FSDP2 / DDP / ZeroRedundancyOptimizer, DTensor tp); "
    "memory measured on an H200 (README, 'On a GPU')",
    fp32_weights=True,
    optimizer_step_peak=True,
    partial_gradient_bytes=FP32_BYTES,
    fully_shard_zero_stages=(2, 3),
    replicate_under_model_parallel=True,
    ddp_first_bucket_bytes=1 * MiB,
    ddp_bucket_bytes=25 * MiB,
    blocking_fsdp_collectives=False,
    dtensor_parameters=True,
    tp_norm_layouts=2,
    pipeline_step_reductions=2,
    dp_step_reductions=1,
    microbatch_host_overhead_s=0.0,
    step_host_overhead_s=0.0,
)

# The analytic model's regime, used wherever no profile measured the executor's memory (published runs, GPU presets):
# model states as ZeRO counts them for Megatron-style mixed precision (16-bit weights and gradients, fp32 master
# weights and Adam states; Rajbhandari et al. 2020 sec. 3.1), communication as the executor's wrappers issue it.
ANALYTIC = replace(
    PARAPLAN_CUDA,
    name="analytic",
    source="ZeRO sec. 3.1 model states (Rajbhandari et al. 2020); the executor's data-parallel wrappers",
    fp32_weights=False,
    optimizer_step_peak=False,
)

# paraplan's executor on CPUs (gloo). It trains fp32 there (planner/request.py `default_cpu_precision`), where ZeRO's
# accounting is its own 4 + 4 + 8 bytes; no CPU profile measures the allocator, so memory is counted analytically.
PARAPLAN_CPU = replace(
    ANALYTIC,
    name="paraplan-cpu",
    source="executor/ on gloo; ../shared/notes/torch-distributed-on-cpu.md",
    blocking_fsdp_collectives=True,
)


def runtime_for(cluster: ClusterSpec, measured: ProfileCosts | None) -> Runtime:
    """The regime of a request, chosen once: paraplan's executor on a CPU cluster; on GPUs, the executor as a
    profile measured its memory (a CUDA profile with the allocator's peaks), else the analytic regime. A profile
    that measured memory on a CPU (none does today: profiler/compute.py measures the CUDA allocator only) keeps
    the CPU's blocking collectives with the executor's measured memory."""
    measured_memory = measured is not None and measured.measures_memory
    if cluster.gpu.kind == "cpu":
        if measured_memory:
            return replace(PARAPLAN_CPU, fp32_weights=True, optimizer_step_peak=True)
        return PARAPLAN_CPU
    return PARAPLAN_CUDA if measured_memory else ANALYTIC
