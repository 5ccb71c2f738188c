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
from typing import TYPE_CHECKING, Any

import numpy as np

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

    # Memory per parameter in mixed precision (bf16 / fp16; planner/cost/memory.py). ZeRO's accounting (sec. 3.1):
    # 16-bit weights and gradients (2 + 2) and an fp32 master copy (4) beside the optimizer's states. The executor
    # keeps its parameters fp32 and lets torch.autocast cast them per use: weights and gradients take 4 bytes each
    # and the weights are the master copy (0 more). fp32 training holds 4 + 4 and no master copy in every stack.
    mixed_weight_bytes: int
    mixed_gradient_bytes: int
    mixed_master_weight_bytes: int
    # The optimizer step peaks on its own (memory.device_memory): torch.optim's foreach AdamW temporaries, and the
    # gradients set to None before each step (`zero_grad(set_to_none=True)`), so forward may peak without them.
    optimizer_step_peak: bool

    # Communication volume. Gradients reduced over dp, the tied embedding's sync and ZeRO-1's weight gather move
    # `mixed_reduce_bytes` per element in mixed precision (4 in fp32). The executor's gradients are fp32
    # (mixed_gradient_bytes), so its DDP and FSDP2 reductions really move 4 bytes; the cost model has always
    # charged 2, and the numbers are kept until a measurement settles it (the restructuring keeps behaviour).
    # `partial_gradient_bytes`: what the once-a-step reduction of sequence-parallel partial gradients and DDP's
    # bucket count use: the executor's fp32 gradients, 4 bytes, in every regime today.
    mixed_reduce_bytes: int
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
        """Bytes of one weight as the stack holds it in memory."""
        return FP32_BYTES if precision == "fp32" else self.mixed_weight_bytes

    def gradient_bytes(self, precision: str) -> int:
        """Bytes of one gradient as the stack holds it in memory."""
        return FP32_BYTES if precision == "fp32" else self.mixed_gradient_bytes

    def master_weight_bytes(self, precision: str) -> int:
        """Bytes of the optimizer's fp32 master copy of one weight, beyond the weight itself."""
        return 0 if precision == "fp32" else self.mixed_master_weight_bytes

    def data_parallel_bytes(self, precision: str) -> int:
        """Bytes per element of the data-parallel collectives (see `mixed_reduce_bytes` on why not 4)."""
        return FP32_BYTES if precision == "fp32" else self.mixed_reduce_bytes

    def on_fsdp2(self, zero_stage: np.ndarray, tp: np.ndarray, pp: int, shard_degree: np.ndarray) -> np.ndarray:
        """Rows whose data parallelism runs on FSDP2 (`fully_shard` or `replicate`); the rest run DDP, or nothing
        with a single data-parallel rank."""
        pure_dp = (tp == 1) & (pp == 1)
        fully_shard = np.isin(zero_stage, self.fully_shard_zero_stages)
        replicate = (zero_stage == 0) & ~pure_dp & self.replicate_under_model_parallel
        return (fully_shard | replicate) & (shard_degree > 1)


# Model states as the executor holds them (memory.py's docstring): fp32 parameters under torch.autocast, torch.optim's
# step peaking on its own. Measured on an H200 (benchmarks/results/2026-12-04-h200-llama3.2-1b.md).
EXECUTOR_MEMORY: dict[str, Any] = {
    "mixed_weight_bytes": FP32_BYTES,
    "mixed_gradient_bytes": FP32_BYTES,
    "mixed_master_weight_bytes": 0,
    "optimizer_step_peak": True,
}
# Model states as ZeRO counts them for mixed-precision Adam (Rajbhandari et al. 2020, sec. 3.1; Megatron-LM's fp16
# / bf16 training): 16-bit weights and gradients, an fp32 master copy, no step peak of its own.
ZERO_MEMORY: dict[str, Any] = {
    "mixed_weight_bytes": 2,
    "mixed_gradient_bytes": 2,
    "mixed_master_weight_bytes": FP32_BYTES,
    "optimizer_step_peak": False,
}

PARAPLAN_CUDA = Runtime(
    name="paraplan-cuda",
    source="executor/ (torch.autocast over fp32 parameters, FSDP2 / DDP / ZeroRedundancyOptimizer, DTensor tp); "
    "memory measured on an H200 (benchmarks/results/2026-12-04-h200-llama3.2-1b.md)",
    **EXECUTOR_MEMORY,
    mixed_reduce_bytes=2,
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
    **ZERO_MEMORY,
)

# paraplan's executor on CPUs (gloo). It trains fp32 there (planner/request.py `default_precision`), where ZeRO's
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
            return replace(PARAPLAN_CPU, name="paraplan-cpu-measured", **EXECUTOR_MEMORY)
        return PARAPLAN_CPU
    return PARAPLAN_CUDA if measured_memory else ANALYTIC
