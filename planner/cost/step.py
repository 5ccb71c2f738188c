"""One training step: layer costs -> devices -> pipeline time, exposed communication, optimizer, memory.

The step time is the sum of the breakdown's terms (critical path of the slowest pipeline device):
  compute + tp_comm + cp_comm    m x the slowest device's per-micro-batch work
  bubble                         pipeline fill and drain (Narayanan et al. 2021, eq. 1-2)
  pp_comm                        point-to-point activations and gradients, plus tied-embedding sync
  dp_comm                        gradient reduction / ZeRO gathers not hidden behind backward
  optimizer                      the optimizer step (memory-bound)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from planner.cost import comm, flops, memory
from planner.cost.ops import ACTIVATION_BYTES
from planner.cost.pipeline import (
    DeviceLoad,
    device_loads,
    p2p_transfers_on_critical_path,
    pipeline_bubble_s,
)
from planner.graph import LayerCost, layer_graph, layers_in_order
from planner.layout import placement
from planner.request import EstimateRequest, parse_estimate_request
from planner.rules import require_valid
from planner.specs import (
    ClusterSpec,
    MemoryEstimate,
    ModelSpec,
    ParallelPlan,
    StageMemory,
    StepEstimate,
    TimeBreakdown,
    TrainingSpec,
)

GiB = 1024**3


@dataclass(frozen=True)
class StepInputs:
    """Everything the step-level formulas read, resolved once."""

    model: ModelSpec
    training: TrainingSpec
    cluster: ClusterSpec
    plan: ParallelPlan
    loads: list[DeviceLoad]
    microbatches: int

    @property
    def degrees(self) -> tuple[int, int, int, int, int]:
        plan = self.plan
        return (plan.pp, plan.dp, plan.cp, plan.tp, self.cluster.gpus_per_node)

    @property
    def weight_bytes(self) -> int:
        return memory.weight_bytes_per_param(self.training.precision)

    @property
    def shard_degree(self) -> int:
        """ZeRO partitions over the gradient-reduction group: dp x cp (Megatron-LM, FSDP over dp_cp)."""
        return self.plan.dp * self.plan.cp

    @property
    def tied_copy(self) -> bool:
        """With tied embeddings and pp > 1 the last device keeps its own copy of the word embedding, kept in
        sync by an all-reduce of its gradient with the first device (Megatron-LM, Shoeybi et al. 2019)."""
        return self.model.tie_embeddings and self.plan.pp > 1

    def device_params(self, load: DeviceLoad) -> float:
        tp = self.plan.tp
        count = sum(layer.params.per_gpu(tp) for layer in load.layers)
        if self.tied_copy and load.device == self.plan.pp - 1:
            count += self.model.vocab_size * self.model.hidden_size / tp
        return count


def estimate_request(request: dict[str, Any] | EstimateRequest) -> StepEstimate:
    req = parse_estimate_request(request)
    require_valid(req.plan, req.model, req.training, req.cluster)
    return estimate_step(req.model, req.training, req.cluster, req.plan)


def estimate_step(model: ModelSpec, training: TrainingSpec, cluster: ClusterSpec, plan: ParallelPlan) -> StepEstimate:
    """Predict one step of a structurally valid plan (see planner.rules)."""
    layers = layers_in_order(layer_graph(model, training, cluster, plan))
    inputs = StepInputs(model, training, cluster, plan, device_loads(plan, layers), plan.num_microbatches(training))
    breakdown = step_breakdown(inputs)
    mem = memory_estimate(inputs)
    return _summarise(inputs, breakdown, mem)


# --------------------------------------------------------------------------------------------- time


def step_breakdown(inputs: StepInputs) -> TimeBreakdown:
    busy = [load.busy_s for load in inputs.loads]
    slowest = inputs.loads[busy.index(max(busy))]
    m = inputs.microbatches
    return TimeBreakdown(
        compute_s=m * sum(layer.forward_s + layer.backward_s + layer.recompute_s for layer in slowest.layers),
        tp_comm_s=m * sum(layer.tp_comm_s for layer in slowest.layers),
        cp_comm_s=m * sum(layer.cp_comm_s for layer in slowest.layers),
        pp_comm_s=pp_comm_s(inputs),
        dp_comm_s=max(dp_comm_exposed_s(inputs, load) for load in inputs.loads),
        bubble_s=pipeline_bubble_s(busy, inputs.plan.virtual_stages),
        optimizer_s=max(optimizer_step_s(inputs, load) for load in inputs.loads),
    )


def pp_comm_s(inputs: StepInputs) -> float:
    """Activations (forward) and their gradients (backward) between pipeline neighbours. Each TP rank sends
    only its 1/tp share: the sequence-parallel shard, or Megatron's scatter/gather optimisation (Narayanan et
    al. 2021, sec. 4.1). Plus the tied word-embedding gradient all-reduce between first and last device."""
    plan, model = inputs.plan, inputs.model
    if plan.pp == 1:
        return 0.0
    channel = comm.p2p_channel(inputs.cluster, placement("pp", *inputs.degrees))
    tokens = inputs.training.seq_len / plan.cp * plan.micro_batch_size
    activation = ACTIVATION_BYTES[inputs.training.precision] * tokens * model.hidden_size / plan.tp
    transfers = p2p_transfers_on_critical_path(plan, inputs.microbatches)
    total = transfers * float(comm.p2p_s(activation, channel))
    if inputs.tied_copy:
        grad = inputs.weight_bytes * model.vocab_size * model.hidden_size / plan.tp
        total += float(comm.all_reduce_s(grad, 2, channel))
    return total


def dp_comm_s(inputs: StepInputs, load: DeviceLoad) -> float:
    """Data-parallel traffic of one device per step (ZeRO sec. 7: all-reduce = reduce-scatter + all-gather).

    ZeRO 0: all-reduce of the gradients; 1: reduce-scatter of gradients + all-gather of updated weights;
    2 (FSDP, no resharding after forward): a reduce-scatter per micro-batch + one all-gather;
    3 (FSDP, resharding): per micro-batch, all-gathers in forward and backward and a reduce-scatter."""
    n, zero, m = inputs.shard_degree, inputs.plan.zero_stage, inputs.microbatches
    channel = comm.group_channel(inputs.cluster, placement("dp_cp", *inputs.degrees))
    # Weights and gradients have the same size in bytes (both 16-bit in mixed precision, ZeRO sec. 3.1).
    state_bytes = inputs.device_params(load) * inputs.weight_bytes
    gather = float(comm.all_gather_s(state_bytes, n, channel))
    scatter = float(comm.reduce_scatter_s(state_bytes, n, channel))
    if zero == 0:
        return float(comm.all_reduce_s(state_bytes, n, channel))
    if zero == 1:
        return scatter + gather
    if zero == 2:
        return m * scatter + gather
    return m * (2 * gather + scatter)


def dp_comm_exposed_s(inputs: StepInputs, load: DeviceLoad) -> float:
    """Gradient reduction runs in buckets while backward goes on (PyTorch DDP, Li et al. 2020, sec. 3.2.3;
    FSDP prefetching, Zhao et al. 2023). ZeRO 0/1 reduce during the last micro-batch's backward; ZeRO 2/3
    communicate every micro-batch and overlap with all of the step's compute. The last bucket (one layer's
    share) can never overlap. Without overlap (Megatron-LM before 2023) all of it is exposed."""
    total = dp_comm_s(inputs, load)
    if not inputs.plan.overlap_grad_reduce or total == 0.0:
        return total
    if inputs.plan.zero_stage <= 1:
        window = sum(layer.backward_s + layer.recompute_s for layer in load.layers)
    else:
        window = inputs.microbatches * sum(layer.forward_s + layer.backward_s for layer in load.layers)
    return max(total - window, total / len(load.layers))


def optimizer_traffic_bytes_per_param(precision: str, optimizer: str) -> int:
    """HBM bytes one optimizer step moves per parameter, pass by pass, for mixed-precision training with fp32
    master weights and (fp16 only) loss scaling (Micikevicius et al. 2018), as Megatron-LM's optimizer runs it:
    copy 16-bit grads into fp32 (read 2, write 4); fp16: unscale and check for inf (read 4, write 4); gradient
    norm for clipping (read 4); the update (read grad 4; read + write weight 8 and each optimizer state 8);
    copy fp32 weights back to 16-bit (read 4, write 2); zero the 16-bit grads (write 2). In fp32 training
    there are no copies: norm, update and zeroing only."""
    states = 2 if optimizer == "adamw" else 0  # AdamW: momentum and variance; SGD (no momentum): none
    update = 4 + 8 + 8 * states
    if precision == "fp32":
        return 4 + update + 4
    unscale = 8 if precision == "fp16" else 0
    return 6 + unscale + 4 + update + 6 + 2


def optimizer_step_s(inputs: StepInputs, load: DeviceLoad) -> float:
    """The optimizer is memory-bound (roofline, Williams et al. 2009): bytes touched / achievable HBM
    bandwidth, on this rank's shard only under ZeRO >= 1 (Rajbhandari et al. 2020, sec. 5.1)."""
    training, gpu = inputs.training, inputs.cluster.gpu
    params = inputs.device_params(load) / (inputs.shard_degree if inputs.plan.zero_stage >= 1 else 1)
    traffic = optimizer_traffic_bytes_per_param(training.precision, training.optimizer)
    return params * traffic / (gpu.hbm_GBps * 1e9 * gpu.memory_efficiency)


# ------------------------------------------------------------------------------------------- memory


def memory_estimate(inputs: StepInputs) -> MemoryEstimate:
    stages = [stage_memory(inputs, load) for load in inputs.loads]
    peak = max(stages, key=lambda s: s.total_bytes)
    return MemoryEstimate(
        peak_bytes=peak.total_bytes,
        peak_stage=peak.stage,
        capacity_bytes=float(inputs.cluster.gpu.memory_bytes),
        by_stage=stages,
    )


def stage_memory(inputs: StepInputs, load: DeviceLoad) -> StageMemory:
    plan, training = inputs.plan, inputs.training
    states = memory.model_state_bytes(
        inputs.device_params(load),
        training.precision,
        training.optimizer,
        plan.zero_stage,
        inputs.shard_degree,
    )
    weights, grads = (
        states.weights + _zero_buffers(inputs, load, "weights"),
        states.grads + _zero_buffers(inputs, load, "grads"),
    )
    activations = activation_bytes(inputs, load)
    allocated = weights + grads + states.optimizer + activations
    other = memory.overhead_bytes(allocated, _communicators(plan, inputs.tied_copy), inputs.cluster.gpu.kind)
    total = allocated + other
    capacity = float(inputs.cluster.gpu.memory_bytes)
    return StageMemory(
        stage=load.device,
        layers=load.num_blocks,
        params_bytes=weights,
        grads_bytes=grads,
        optimizer_bytes=states.optimizer,
        activations_bytes=activations,
        other_bytes=other,
        total_bytes=total,
        capacity_bytes=capacity,
        over_bytes=max(0.0, total - capacity),
    )


def _zero_buffers(inputs: StepInputs, load: DeviceLoad, kind: str) -> float:
    """FSDP's unsharded working copies: ZeRO-3 gathers the block in use and prefetches the next (2 blocks of
    16-bit weights); ZeRO-2/3 hold one block's full gradient until its reduce-scatter (Zhao et al. 2023)."""
    blocks = [layer for layer in load.layers if layer.kind == "block"]
    if not blocks:
        return 0.0
    block_params = blocks[0].params.per_gpu(inputs.plan.tp)
    if kind == "weights" and inputs.plan.zero_stage == 3:
        return 2 * block_params * inputs.weight_bytes
    if kind == "grads" and inputs.plan.zero_stage >= 2:
        return block_params * inputs.weight_bytes
    return 0.0


def activation_bytes(inputs: StepInputs, load: DeviceLoad) -> float:
    """Saved activations of every micro-batch in flight, plus one layer's rematerialised working set."""
    plan = inputs.plan
    held = sum(
        layer.saved_bytes
        * memory.layer_inflight(
            layer.kind, plan.schedule, load.device, plan.pp, plan.virtual_stages, inputs.microbatches
        )
        for layer in load.layers
    )
    return held + max((layer.working_bytes for layer in load.layers), default=0.0)


def _communicators(plan: ParallelPlan, tied_copy: bool) -> int:
    """NCCL communicators a rank joins: one per group of size > 1, two for its pipeline neighbours."""
    groups = [plan.tp, plan.cp, plan.dp * plan.cp]
    return sum(size > 1 for size in groups) + (2 if plan.pp > 1 else 0) + int(tied_copy)


# ------------------------------------------------------------------------------------------ summary


def _summarise(inputs: StepInputs, breakdown: TimeBreakdown, mem: MemoryEstimate) -> StepEstimate:
    model, training, cluster, plan = inputs.model, inputs.training, inputs.cluster, inputs.plan
    step_s = breakdown.total_s
    gpus = cluster.num_gpus
    peak = cluster.gpu.peak_tflops[training.precision] * 1e12
    model_flops = flops.model_flops_per_step(model, training)
    hardware_flops = flops.hardware_flops_per_step(model, training, plan.recompute)
    over = [stage for stage in mem.by_stage if stage.over_bytes > 0]
    return StepEstimate(
        step_time_s=step_s,
        tokens_per_s=training.tokens_per_step / step_s,
        tokens_per_s_per_gpu=training.tokens_per_step / step_s / gpus,
        model_tflops_per_gpu=model_flops / step_s / gpus / 1e12,
        hardware_tflops_per_gpu=hardware_flops / step_s / gpus / 1e12,
        mfu=model_flops / step_s / gpus / peak,
        hfu=hardware_flops / step_s / gpus / peak,
        fits=not over,
        num_microbatches=inputs.microbatches,
        memory=mem,
        breakdown=breakdown,
        sources={term: "analytic" for term in TimeBreakdown.model_fields} | {"memory": "analytic"},
        why_not_fits=[_over_message(stage) for stage in over],
        assumptions=_assumptions(inputs),
    )


def _over_message(stage: StageMemory) -> str:
    return (
        f"stage {stage.stage} needs {stage.total_bytes / GiB:.2f} GiB but the GPU has "
        f"{stage.capacity_bytes / GiB:.2f} GiB: over by {stage.over_bytes:,.0f} bytes "
        f"({stage.over_bytes / GiB:.2f} GiB)"
    )


def _assumptions(inputs: StepInputs) -> list[str]:
    gpu, plan = inputs.cluster.gpu, inputs.plan
    notes = [
        f"matmuls at {gpu.matmul_efficiency:.0%} of {gpu.name} peak, element-wise ops at "
        f"{gpu.memory_efficiency:.0%} of its HBM bandwidth (GPU preset)",
        f"{inputs.training.attention_kernel} attention",
    ]
    if plan.tp > 1:
        notes.append("tensor-parallel collectives are not overlapped with compute (Megatron-LM default)")
    if plan.dp * plan.cp > 1:
        overlap = "overlaps" if plan.overlap_grad_reduce else "does not overlap"
        notes.append(f"gradient reduction {overlap} with backward")
    return notes


def layer_costs(request: dict[str, Any] | EstimateRequest) -> list[LayerCost]:
    """The per-layer records behind an estimate (for explanations and for comparing with a profile)."""
    req = parse_estimate_request(request)
    require_valid(req.plan, req.model, req.training, req.cluster)
    return layers_in_order(layer_graph(req.model, req.training, req.cluster, req.plan))
