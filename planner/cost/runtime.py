"""Training-stack regimes: what the software that runs a plan does, as data the cost terms read.

The cost terms (data.py, tensor.py, pipeline.py, optimizer.py, memory.py) are physics: bytes over links, FLOPs
over peaks. Which bytes a stack keeps and moves, which wrapper its data parallelism uses, which collectives hold
the rank and how many extra reductions it runs each step are properties of the stack, not of the physics; they
live here, one frozen `Runtime` record per stack, chosen once per request (`runtime_for`) and passed to the cost
model explicitly (PlanBatch.runtime).

The request names its stack (`training.framework`): `MEGATRON` (Megatron-LM), `DEEPSPEED`, `FSDP` (PyTorch
FSDP2: torchtitan, llm-foundry, Accelerate) or paraplan's own executor, which is `PARAPLAN_CUDA` (memory as a CUDA
profile measured it), `PARAPLAN_CPU` (gloo on CPUs) or `ANALYTIC` (no profile measured memory: ZeRO's
mixed-precision accounting of model states, the executor's wrappers for communication). Which plans each stack
can run at all is a rule (planner/rules.py `FRAMEWORK_ZERO_STAGES`), not a cost.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, NamedTuple

import numpy as np

from planner.cost.ops import (
    COMPLEX_FP32,
    FUSED_ROTARY,
    ROTATE_HALF,
    ROTATE_HALF_FP32,
    TORCH_CROSS_ENTROPY,
    VOCAB_PARALLEL_CROSS_ENTROPY,
    VOCAB_PARALLEL_CROSS_ENTROPY_COPY,
    CrossEntropy,
    Rotary,
)
from planner.units import MiB

if TYPE_CHECKING:
    from planner.cost.measured import ProfileCosts
    from planner.cost.ops import SelectivePolicy
    from planner.specs import ClusterSpec

FP32_BYTES = 4
# Every ZeRO stage's gradient reduction runs during backward where the plan overlaps it (Runtime.
# overlapped_reduction_stages): DDP's and Megatron-LM's bucket hooks, FSDP2's per-unit reduce-scatters.
EVERY_STAGE_OVERLAPS = {precision: (0, 1, 2, 3) for precision in ("fp32", "fp16", "bf16")}
# Host time per kernel launch of an eager PyTorch stack on a GPU, seconds (planner/cost/compute.py `pass_s`), in
# forward (and recompute), where the model's Python issues every op, and in backward, where autograd's C++ engine
# does: the least-squares fit of both on the fitting half of the dev vTrain runs (Megatron-LM, A100;
# `python -m planner.calibration host-floor`; tests/validation/test_devset.py fails if they drift). Per kernel as
# planner/cost/ops.py counts them, so they hold the Python, dispatcher and autograd time of the ops around each one
# too. The executor's blocks on an H200 show the same split: backward's launches took at most 22 us a kernel,
# forward's 35-53 us (benchmarks/h200_blocks.py, micro-batch 1). The other stacks are eager PyTorch modules as
# well and are assumed to pay the same until a profile of them measures it; paraplan on CPUs runs its kernels on
# the host itself, so no launch is waited for there.
EAGER_HOST_S_PER_KERNEL = 85.7e-6
EAGER_HOST_S_PER_BACKWARD_KERNEL = 38.6e-6
# Host time of FSDP2's hooks per unit (`fully_shard`) and micro-batch, seconds, forward and backward, beyond the
# bare collective: the all-gather's copy-in and copy-out and the unsharded parameters' setup before forward, the
# reshard after it; the unshard before backward and the reduce-scatter's preparation and the sharded gradients'
# setup after it (torch/distributed/fsdp/_fully_shard/_fsdp_param_group.py `pre_forward`, `post_backward`).
# Measured on this project's 2-core CPU VM by `python benchmarks/fsdp_unit_host.py` (torch 2.13, one gloo rank,
# Llama blocks of 9 parameters; benchmarks/results/2026-12-08-fsdp-unit-host.md): the hooks are Python and
# dispatcher work, so a GPU host's CPU pays about as much (an assumption: no GPU host has been measured here;
# pytorch/pytorch#173680 reports FSDP2's pre_forward at about 1 ms a call on a Xeon GPU host, for larger units).
# The host does it between the passes' kernel launches, so it costs time only where it outlasts the device's
# slack (planner/cost/data.py `fsdp_hooks_s`).
FSDP2_UNIT_HOST_S = (250e-6, 340e-6)
# The share of a GPU collective's time that hides behind the compute it overlaps: NCCL's kernels take SMs and
# memory bandwidth from the compute beside them, which slows on average by 18.9% of the collective's time (Lee et
# al. 2025, "Characterizing Compute-Communication Overlap in GPU-Accelerated Distributed Deep Learning:
# Performance and Power Implications", arXiv:2507.03114: GPT and Llama training on A100, H100, MI250 and MI210,
# at most 40%). A profile's own measurement of the same share (profiler/collectives.py `measure_overlap`) or a
# calibration's fit replaces it (planner/cost/measured.py `hidden_share`).
OVERLAPPED_COLLECTIVE_HIDDEN_SHARE = 1 - 0.189


class StateBytes(NamedTuple):
    """Bytes per parameter element: the weight and gradient as held, what the optimizer keeps beyond its states
    (an fp32 master weight), what the data-parallel gradient reductions move per element, the unsharded weight and
    gradient a fully sharded unit computes with (memory.py `zero_working_copies`), which is also what its
    all-gathers move (FSDP2's `param_dtype`; planner/cost/data.py), and what exists only during the optimizer
    step, sharded as the optimizer's states are (fp32 copies of 16-bit gradients)."""

    weight: int
    gradient: int
    master: int
    reduce: int
    unsharded: int
    step_only: int = 0
    # 16-bit gradients kept beside the optimizer's own gradient buffer, whole, where ZeRO (0-1) does not partition
    # gradients: DeepSpeed's BF16_Optimizer adds autograd's bf16 gradients into its fp32 buffer and zeroes them
    # instead of freeing them (`update_hp_grads(clear_lp_grads=False)`, `clear_lp_grads`).
    retained_16bit_gradient: int = 0


@dataclass(frozen=True)
class Runtime:
    """What one training stack does that the cost model charges for. Bytes are per parameter element."""

    name: str
    framework: str  # the contract's `training.framework` this regime answers for
    source: str  # where the stack's behaviour is documented (its code, its docs, a measurement)

    # Bytes per parameter element the stack keeps and moves, per training precision (`StateBytes`).
    states: Mapping[str, StateBytes]
    # The optimizer step peaks on its own (memory.device_memory): torch.optim's foreach AdamW temporaries, and the
    # gradients set to None before each step (`zero_grad(set_to_none=True)`), so forward may peak without them.
    optimizer_step_peak: bool
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
    # How the stack issues ZeRO-3's collectives (planner/cost/data.py). `zero3_prefetch_overlap`: each unit's
    # all-gather is prefetched one unit ahead on its own stream and overlaps the previous unit's compute, the
    # reduce-scatters the next unit's backward (FSDP2: Zhao et al. 2023 sec. 3.3-4; DeepSpeed >= 0.6); False where
    # the stack synchronizes the device around every gather, so none of it hides. `zero3_collective_per_tensor`:
    # one all-gather and one reduce-scatter per parameter tensor (params.py `block_tensors`), not one per unit.
    # `zero3_bandwidth_efficiency`: the share of the data-parallel group's bus bandwidth its ZeRO-3 collectives
    # reach (1: the group's channel; a fitted value names its fit in planner/calibration.py).
    zero3_prefetch_overlap: bool
    zero3_collective_per_tensor: bool
    zero3_bandwidth_efficiency: float

    # Where the stack can run the data-parallel gradient reduction during backward, as the plan asks
    # (`overlap_grad_reduce`; DeepSpeed's `overlap_comm`): the ZeRO stages per training precision whose reduction
    # is issued while backward runs (the others reduce after it), and whether a pipeline defers it past its flush.
    overlapped_reduction_stages: Mapping[str, tuple[int, ...]] = field(default_factory=lambda: EVERY_STAGE_OVERLAPS)
    pipeline_reduces_after_flush: bool = False
    # The stack runs a pipeline's FSDP2 units (`fully_shard`, `replicate`) inside torch.distributed.pipelining, which
    # runs every micro-batch's backward without gradient sync or resharding (`set_requires_gradient_sync(False)`,
    # `set_reshard_after_backward(False)`) and reduces each unit once, after the stage's last backward
    # (torch/distributed/pipelining/stage.py `backward_maybe_with_nosync`, `perform_reduce_grad`): the executor's
    # pipelines (executor/apply.py wraps each chunk, then its PipelineStage) and torchtitan's.
    fsdp2_in_torch_pipelining: bool = True
    # ZeRO-2 on FSDP2 is `fully_shard(reshard_after_forward=False)`: the parameters stay sharded, and the gathered
    # copy (at `StateBytes.unsharded`) is kept from the first forward to the last backward instead of being freed.
    # False where ZeRO-2 keeps whole 16-bit weights (DeepSpeed's stage 2; Megatron-LM has no ZeRO-2).
    zero2_shards_weights: bool = True
    # Gradient accumulation's HBM traffic (planner/cost/accumulation.py), bytes per gradient element a device holds,
    # per training precision: for every micro-batch after the first (autograd's in-place `grad += new`), and for
    # every micro-batch where the optimizer copies whole 16-bit gradients into its own buffer (ZeRO 0-1).
    # The executor's gradients are fp32 in every precision (fp32 parameters under torch.autocast): read 4 + 4,
    # write 4.
    accumulation_bytes: Mapping[str, int] = field(default_factory=lambda: {p: 12 for p in ("fp32", "fp16", "bf16")})
    microbatch_gradient_bytes: Mapping[str, int] = field(default_factory=dict)

    # Host time per kernel launch (planner/cost/compute.py `pass_s`): what the stack's Python, the dispatcher and
    # autograd spend on the CPU per kernel, below which a kernel cannot run, in forward and in backward. 0: never
    # host-bound.
    host_s_per_kernel: float = 0.0
    host_s_per_backward_kernel: float = 0.0
    # What "selective" recompute keeps and repeats in this stack (planner/cost/ops.py `SelectivePolicy`).
    selective_recompute: SelectivePolicy = "attention_core"
    # Host time per FSDP2 unit and micro-batch of its hooks, (forward, backward) seconds (`FSDP2_UNIT_HOST_S`), in the
    # stacks whose ZeRO runs on FSDP2; 0 where the stack's hooks are other code (DeepSpeed's) or a profile's FSDP2
    # collectives, timed as training issues them, hold them (paraplan on CPUs: planner/cost/comm.py `fsdp_channel`).
    fsdp_unit_host_s: tuple[float, float] = (0.0, 0.0)
    # The share of an overlappable collective's time that hides behind compute where the stack overlaps it, without
    # a profile that measured it (`OVERLAPPED_COLLECTIVE_HIDDEN_SHARE` on GPUs).
    overlap_hidden_share: float = OVERLAPPED_COLLECTIVE_HIDDEN_SHARE
    # How the stack's model code applies RoPE (planner/cost/ops.py `Rotary`): the executor's rotate-half in fp32.
    rotary: Rotary = ROTATE_HALF_FP32
    # Parameters kept in fp32 under torch.autocast, which casts every weight to 16 bits each forward and its
    # gradient back each backward (ops.py `_weight_casts`): the executor's, in 16-bit training.
    autocast_weights: bool = True
    # RMSNorm runs in one fused kernel (ops.py `_norm`): Megatron-LM's and DeepSpeed's (apex / TransformerEngine),
    # the executor's (torch's fused CUDA kernel since 2.8); not an eager HF or torchtitan model on an earlier torch.
    fused_rms_norm: bool = True
    # How the stack's loss computes cross entropy (planner/cost/ops.py `CrossEntropy`): the executor's
    # F.cross_entropy over fp32 logits.
    cross_entropy: CrossEntropy = TORCH_CROSS_ENTROPY

    def weight_cast_bytes(self, precision: str) -> int:
        """Bytes per weight autocast moves per pass, one way (read fp32 4, write 2; or read 2, write 4)."""
        return 4 + 2 if self.autocast_weights and precision in ("bf16", "fp16") else 0

    def weight_bytes(self, precision: str) -> int:
        """Bytes of one weight as the stack holds it in memory."""
        return self.states[precision].weight

    def gradient_bytes(self, precision: str) -> int:
        """Bytes of one gradient as the stack holds it in memory."""
        return self.states[precision].gradient

    def master_weight_bytes(self, precision: str) -> int:
        """Bytes the optimizer keeps per weight beyond its own states (an fp32 master copy)."""
        return self.states[precision].master

    def retained_16bit_gradient_bytes(self, precision: str) -> int:
        """Bytes per parameter of 16-bit gradients kept whole beside the optimizer's gradients (ZeRO 0-1)."""
        return self.states[precision].retained_16bit_gradient

    def step_only_bytes(self, precision: str) -> int:
        """Bytes per parameter that exist only while the optimizer steps (`StateBytes.step_only`)."""
        return self.states[precision].step_only

    def unsharded_bytes(self, precision: str) -> int:
        """Bytes of the unsharded weight or gradient a fully sharded unit computes with."""
        return self.states[precision].unsharded

    def data_parallel_bytes(self, precision: str) -> int:
        """Bytes per element of the data-parallel collectives (`StateBytes.reduce`)."""
        return self.states[precision].reduce

    def reduction_overlaps(self, zero_stage: np.ndarray, pp: int, precision: str) -> np.ndarray:
        """Rows whose gradient reduction the stack issues during backward, so that it can hide there when the plan
        overlaps it (`overlapped_reduction_stages`, `pipeline_reduces_after_flush`)."""
        if self.pipeline_reduces_after_flush and pp > 1:
            return np.zeros(np.shape(zero_stage), dtype=bool)
        return np.isin(zero_stage, self.overlapped_reduction_stages[precision])

    def on_fsdp2(self, zero_stage: np.ndarray, tp: np.ndarray, pp: int, shard_degree: np.ndarray) -> np.ndarray:
        """Rows whose data parallelism runs on FSDP2 (`fully_shard` or `replicate`); the rest run DDP, or nothing
        with a single data-parallel rank."""
        pure_dp = (tp == 1) & (pp == 1)
        fully_shard = np.isin(zero_stage, self.fully_shard_zero_stages)
        replicate = (zero_stage == 0) & ~pure_dp & self.replicate_under_model_parallel
        return (fully_shard | replicate) & (shard_degree > 1)


# fp32 training keeps 4-byte weights and gradients, no master copy, and reduces in fp32, in every stack.
FP32_STATES = StateBytes(weight=FP32_BYTES, gradient=FP32_BYTES, master=0, reduce=FP32_BYTES, unsharded=FP32_BYTES)
# ZeRO's accounting of mixed-precision Adam (Rajbhandari et al. 2020, sec. 3.1): 16-bit weights and gradients, an
# fp32 master copy, 16-bit gradient reduction. DeepSpeed's fp16 / bf16 optimizers hold exactly these.
ZERO_MIXED = StateBytes(weight=2, gradient=2, master=FP32_BYTES, reduce=2, unsharded=2)


def _states(mixed: StateBytes, bf16: StateBytes | None = None) -> dict[str, StateBytes]:
    return {"fp32": FP32_STATES, "fp16": mixed, "bf16": bf16 or mixed}


# Model states as the executor holds them (memory.py's docstring): fp32 parameters under torch.autocast, torch.optim's
# step peaking on its own. Measured on an H200 (benchmarks/results/2026-12-04-h200-llama3.2-1b.md). Its DDP and FSDP2
# wrappers are given no reduce dtype (executor/parallel/data.py: no comm hook, no MixedPrecisionPolicy), so they
# reduce the fp32 gradients as they are, 4 bytes, as FSDP2 gathers the fp32 parameters.
EXECUTOR_STATES = _states(
    StateBytes(weight=FP32_BYTES, gradient=FP32_BYTES, master=0, reduce=FP32_BYTES, unsharded=FP32_BYTES)
)

PARAPLAN_CUDA = Runtime(
    name="paraplan-cuda",
    framework="paraplan",
    source="executor/ (torch.autocast over fp32 parameters, FSDP2 / DDP / ZeroRedundancyOptimizer, DTensor tp); "
    "memory measured on an H200 (benchmarks/results/2026-12-04-h200-llama3.2-1b.md)",
    states=EXECUTOR_STATES,
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
    host_s_per_kernel=EAGER_HOST_S_PER_KERNEL,
    host_s_per_backward_kernel=EAGER_HOST_S_PER_BACKWARD_KERNEL,
    fsdp_unit_host_s=FSDP2_UNIT_HOST_S,
    zero3_prefetch_overlap=True,
    zero3_collective_per_tensor=False,
    zero3_bandwidth_efficiency=1.0,
)

# paraplan's executor on GPUs where no profile measured its memory (GPU presets): model states as ZeRO counts them
# (Rajbhandari et al. 2020 sec. 3.1), communication as the executor's wrappers issue it.
ANALYTIC = replace(
    PARAPLAN_CUDA,
    name="analytic",
    source="ZeRO sec. 3.1 model states (Rajbhandari et al. 2020); the executor's data-parallel wrappers",
    states=_states(ZERO_MIXED),
    optimizer_step_peak=False,
)

# paraplan's executor on CPUs (gloo). It trains fp32 there (planner/request.py `default_precision`), where ZeRO's
# accounting is its own 4 + 4 + 8 bytes; no CPU profile measures the allocator, so memory is counted analytically.
PARAPLAN_CPU = replace(
    ANALYTIC,
    name="paraplan-cpu",
    source="executor/ on gloo; ../shared/notes/torch-distributed-on-cpu.md",
    blocking_fsdp_collectives=True,
    host_s_per_kernel=0.0,
    host_s_per_backward_kernel=0.0,
    fsdp_unit_host_s=(0.0, 0.0),
    # gloo's copies compete with the compute for the cores, by as much as the profile's `measure_overlap` finds;
    # without a profile no share is assumed lost, as before NCCL's figure above existed.
    overlap_hidden_share=1.0,
)

# Megatron-LM (megatron/core): 16-bit weights; bf16 accumulates and all-reduces its main gradients in fp32
# (megatron/training/arguments.py: `if args.bf16: args.accumulate_allreduce_grads_in_fp32 = True`), fp16 keeps
# 16-bit gradients and copies them to fp32 main gradients at the optimizer step (Float16OptimizerWithFloat16Params
# `_copy_model_grads_to_main_grads`), beside the fp32 master weights. Bytes per parameter at the step
# (docs/source/api-guide/dist_optimizer.md): fp16 20 (4 + 16/d distributed), bf16 18 (6 + 12/d). Its
# DistributedDataParallel reduces one contiguous gradient buffer in buckets (no FSDP), parameters are plain
# tensors (tp shards are local slices), and the gradient norm is one all-reduce over the model-parallel group.
MEGATRON = replace(
    ANALYTIC,
    name="megatron",
    framework="megatron",
    source="Megatron-LM megatron/core (distributed optimizer docs, DistributedDataParallel)",
    states=_states(
        StateBytes(weight=2, gradient=2, master=FP32_BYTES, reduce=2, unsharded=2, step_only=FP32_BYTES),
        bf16=StateBytes(weight=2, gradient=FP32_BYTES, master=FP32_BYTES, reduce=FP32_BYTES, unsharded=2),
    ),
    fully_shard_zero_stages=(),
    replicate_under_model_parallel=False,
    # bucket_size = max(40M, 1M x dp) parameters (megatron/core/distributed/distributed_data_parallel.py).
    ddp_first_bucket_bytes=40_000_000 * FP32_BYTES,
    ddp_bucket_bytes=40_000_000 * FP32_BYTES,
    dtensor_parameters=False,
    tp_norm_layouts=1,
    fsdp2_in_torch_pipelining=False,
    zero2_shards_weights=False,
    fsdp_unit_host_s=(0.0, 0.0),
    # `--gradient-accumulation-fusion` (on by default): the weight-gradient GEMM accumulates into the fp32
    # main_grad itself (megatron/core/tensor_parallel/layers.py `LinearWithGradAccumulationAndAsyncCommunication`,
    # wgrad_gemm_accum_fp32): no pass of its own.
    accumulation_bytes={},
    rotary=FUSED_ROTARY,
    autocast_weights=False,
    cross_entropy=VOCAB_PARALLEL_CROSS_ENTROPY,
)

# The share of the data-parallel bus bandwidth that DeepSpeed 0.3-0.5's ZeRO-3 collectives reach: fitted on the
# ZeRO-3 runs of Narayanan et al. 2021, table 2 (planner/calibration.py `calibrate_deepspeed_zero3_bandwidth`;
# tests/validation/test_devset.py recomputes it and fails if this drifts). Each of those collectives goes through
# torch's list-of-tensors all_gather / reduce_scatter into buffers allocated and zeroed per call
# (partition_parameters.py `_allgather_param`, `_reduce_scatter_gradient`), a likely part of why they fall short of
# the ring; no measurement separates the causes, so this one number holds them all.
DEEPSPEED_ZERO3_BANDWIDTH_EFFICIENCY = 0.216

# DeepSpeed (deepspeed/runtime/zero, fp16 / bf16 optimizers): ZeRO's own accounting (sec. 3.1). Stages 2 and 3
# partition gradients (and parameters) per module as FSDP does; stage 1 all-reduces and then gathers the updated
# partitions. ZeRO-3 as the published runs ran it (DeepSpeed 0.3-0.5, 2021): one all-gather per parameter tensor
# (partition_parameters.py `_allgather_param`, preceded by torch.cuda.synchronize()) and one reduce-scatter per
# gradient tensor (`_reduce_scatter_gradient`); every sub-module's fetch waits for its gathers and synchronizes
# the device (stage3.py `fetch_sub_module`, `_synchronize_communication`), so no gather overlaps compute. DeepSpeed
# 0.6 (2022) coalesces a module's gathers into one (`all_gather_coalesced`) and waits on events instead; that
# DeepSpeed is not measured here.
DEEPSPEED = replace(
    ANALYTIC,
    name="deepspeed",
    framework="deepspeed",
    # bf16 accumulates gradients in one full-size fp32 buffer and reduces from it (deepspeed/runtime/
    # bf16_optimizer.py `fp32_groups_gradients_flat`, `get_grads_for_reduction`), and keeps autograd's bf16
    # gradients allocated beside it (`update_hp_grads(clear_lp_grads=False)`; the PipelineEngine zeroes them before
    # each backward, `clear_lp_grads`): 2 + 2 + 4 + 12 bytes a parameter under ZeRO 0-1 (Megatron-DeepSpeed's BLOOM
    # runs); fp16 keeps ZeRO's 16-bit gradients.
    states=_states(
        ZERO_MIXED,
        bf16=StateBytes(
            weight=2, gradient=FP32_BYTES, master=FP32_BYTES, reduce=FP32_BYTES, unsharded=2, retained_16bit_gradient=2
        ),
    ),
    source="DeepSpeed ZeRO (Rajbhandari et al. 2020; deepspeed/runtime/zero), ds_config zero_optimization; "
    "ZeRO-3 as DeepSpeed 0.3-0.5 issues it",
    dtensor_parameters=False,
    tp_norm_layouts=1,
    # Gradient reduction (deepspeed/runtime/engine.py `_backward_epilogue`, pipe/engine.py): without ZeRO the engine
    # all-reduces the gradients after backward (`allreduce_gradients`); bf16 with ZeRO-1 runs BF16_Optimizer
    # (`_do_optimizer_sanity_check`), which reduces its fp32 gradient buffer after backward too; ZeRO 1-2's optimizer
    # reduces in backward hooks on a stream of its own only with `overlap_comm` (zero/stage_1_and_2.py), which the
    # plan's overlap_grad_reduce sets (planner/export/deepspeed.py). The PipelineEngine turns the backward hooks off
    # (`enable_backward_allreduce = False`) and reduces after the last micro-batch (TrainSchedule's `ReduceGrads`).
    overlapped_reduction_stages={"fp32": (1, 2, 3), "fp16": (1, 2, 3), "bf16": (2, 3)},
    pipeline_reduces_after_flush=True,
    fsdp2_in_torch_pipelining=False,
    zero2_shards_weights=False,
    fsdp_unit_host_s=(0.0, 0.0),
    # fp16: autograd adds 16-bit gradients (read 2 + 2, write 2); fp32: 12. bf16's BF16_Optimizer, every micro-batch:
    # zeroes the bf16 gradients (`clear_lp_grads`, write 2), autograd adds into them (6), and `update_hp_grads` adds
    # them into its fp32 buffer (read 2 + 4, write 4).
    accumulation_bytes={"fp32": 12, "fp16": 6},
    microbatch_gradient_bytes={"bf16": 2 + 6 + 10},
    zero3_prefetch_overlap=False,
    zero3_collective_per_tensor=True,
    zero3_bandwidth_efficiency=DEEPSPEED_ZERO3_BANDWIDTH_EFFICIENCY,
    # Megatron-DeepSpeed's model code (megatron/model/rotary_pos_embedding.py) rotates half eagerly, counted in the
    # activation dtype as HF transformers' models, which DeepSpeed also trains, run it; its fp16/bf16 modules hold
    # 16-bit weights.
    rotary=ROTATE_HALF,
    autocast_weights=False,
    # Megatron-DeepSpeed's loss is its copy of Megatron's vocab-parallel cross entropy (megatron/core/tensor_parallel).
    cross_entropy=VOCAB_PARALLEL_CROSS_ENTROPY_COPY,
)

# PyTorch FSDP2 as torchtitan runs it (torchtitan/distributed: MixedPrecisionPolicy(param_dtype=bf16,
# reduce_dtype=fp32)): fp32 sharded parameters, gradients and Adam states; 16-bit unsharded copies per unit while
# it computes (memory.py's FSDP buffers); gradients reduce-scattered in fp32; DTensor parameters.
FSDP = replace(
    PARAPLAN_CUDA,
    name="fsdp",
    framework="fsdp",
    source="PyTorch FSDP2 fully_shard (Zhao et al. 2023); torchtitan's mixed-precision policy",
    states=_states(StateBytes(weight=FP32_BYTES, gradient=FP32_BYTES, master=0, reduce=FP32_BYTES, unsharded=2)),
    # torchtitan's AdamW runs `implementation="fused"`: no foreach temporaries at the step.
    optimizer_step_peak=False,
    # A bf16 gradient added into the fp32 one FSDP2 accumulates (`accumulate_unsharded_grad_if_needed`: read 4 + 2,
    # write 4): whole inside a pipeline, the reduce-scattered shard elsewhere.
    accumulation_bytes={"fp32": 12, "fp16": 10, "bf16": 10},
    selective_recompute="op_level",
    # torchtitan's complex product (HF transformers' rotate-half in bf16, under Accelerate, moves the same 20 bytes
    # an element); FSDP2 gathers 16-bit weights (`param_dtype`), so nothing casts them at each forward.
    rotary=COMPLEX_FP32,
    autocast_weights=False,
    # HF transformers' LlamaRMSNorm is the decomposition; torchtitan's nn.RMSNorm is ATen's composite before
    # torch 2.8 without torch.compile: the published FSDP runs' stacks (an assumption for a newer one).
    fused_rms_norm=False,
)

STACKS: dict[str, Runtime] = {"megatron": MEGATRON, "deepspeed": DEEPSPEED, "fsdp": FSDP}


def runtime_for(cluster: ClusterSpec, measured: ProfileCosts | None, framework: str = "paraplan") -> Runtime:
    """The regime of a request, chosen once. Megatron-LM, DeepSpeed and FSDP are their own; paraplan's executor
    runs on a CPU cluster as PARAPLAN_CPU; on GPUs it is PARAPLAN_CUDA where a profile measured its memory (a
    CUDA profile with the allocator's peaks), else ANALYTIC. A profile that measured memory on a CPU (none does
    today: profiler/compute.py measures the CUDA allocator only) keeps the CPU's blocking collectives with the
    executor's measured memory."""
    if framework in STACKS:
        return STACKS[framework]
    measured_memory = measured is not None and measured.measures_memory
    if cluster.gpu.kind == "cpu":
        if measured_memory:
            return replace(PARAPLAN_CPU, name="paraplan-cpu-measured", states=EXECUTOR_STATES, optimizer_step_peak=True)
        return PARAPLAN_CPU
    return PARAPLAN_CUDA if measured_memory else ANALYTIC
