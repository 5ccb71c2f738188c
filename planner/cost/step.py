"""One training step, for one plan or for many candidate plans at once.

The step time is the sum of the breakdown's terms (critical path of the slowest pipeline device):
  compute + tp_comm + cp_comm    m x the slowest device's per-micro-batch work (+ a calibrated profile's
  + ep_comm                      framework overheads per micro-batch and per step); ep_comm: a mixture of
                                 experts' dispatch and combine all-to-alls (planner/cost/expert.py)
  bubble                         pipeline fill and drain (Narayanan et al. 2021, eq. 1-2)
  pp_comm                        point-to-point activations and gradients, plus tied-embedding sync
  dp_comm                        gradient reduction / ZeRO gathers not hidden behind backward
                                 (both comm terms also hold a measured profile's wait at each meeting of the ranks)
  accumulation                   adding each micro-batch's gradients into those held (memory-bound; accumulation.py)
  optimizer                      the optimizer step (memory-bound), on the host CPU where it is offloaded
  offload                        CPU offload's PCIe copies not hidden behind backward or compute (offload.py)

This module composes the terms; it has none of its own. Each lives in the module of its concern, a small
function over a `PlanBatch` (planner/cost/batch.py: candidate plans that share a pipeline depth, as numpy
columns): data.py (dp), tensor.py (tp), pipeline.py (pp), context.py (cp: each block's ring, through layers.py),
accumulation.py, optimizer.py, memory.py, measured.py (what a profile answers); what the training stack itself does
comes from its regime (runtime.py), chosen once per request.
`estimate_step` is a batch of one; the search evaluates hundreds of thousands of rows per call.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from planner.cost import comm, flops
from planner.cost.accumulation import accumulation_s
from planner.cost.batch import PlanBatch
from planner.cost.data import dp_comm_exposed_s, dp_meetings, fsdp_hooks_s
from planner.cost.expert import ep_device_comm_s
from planner.cost.layers import LayerKinds, layer_kinds
from planner.cost.measured import ProfileCosts, hidden_share, meeting_wait_s, microbatch_overhead_s, step_overhead_s
from planner.cost.memory import device_memory, host_memory
from planner.cost.offload import (
    gradient_offload_bytes,
    host_bytes_per_node,
    offload_exposed_s,
    pcie_s,
    weight_upload_bytes,
)
from planner.cost.optimizer import cpu_optimizer_step_s, measured_optimizer_s_per_param, optimizer_step_s
from planner.cost.pipeline import microbatches_alone, pipeline_bubble_s, pp_comm_s, pp_meetings
from planner.cost.runtime import Runtime
from planner.cost.tensor import tp_step_comm_s
from planner.layout import GroupAxis, GroupPlacement, placement
from planner.specs import (
    ClusterSpec,
    MemoryEstimate,
    ModelSpec,
    OffloadTraffic,
    ParallelPlan,
    StageMemory,
    StepEstimate,
    TimeBreakdown,
    TrainingSpec,
)
from planner.uncertainty import estimate_uncertainty
from planner.units import GiB

TIME_TERMS: tuple[str, ...] = tuple(TimeBreakdown.model_fields)
MEMORY_TERMS = ("params_bytes", "grads_bytes", "optimizer_bytes", "activations_bytes", "other_bytes")


@dataclass(frozen=True)
class BatchEstimate:
    """The cost model's answer for every row of a PlanBatch: time terms (N,), memory per device (N, pp)."""

    time_s: dict[str, np.ndarray]  # TIME_TERMS -> (N,)
    memory_bytes: dict[str, np.ndarray]  # MEMORY_TERMS -> (N, pp)
    host_bytes: np.ndarray  # (N, pp): host memory one GPU's offload keeps (memory.host_memory), not GPU memory

    @property
    def step_time_s(self) -> np.ndarray:
        return sum(self.time_s[term] for term in TIME_TERMS)  # type: ignore[return-value]

    @property
    def device_total_bytes(self) -> np.ndarray:
        return sum(self.memory_bytes[term] for term in MEMORY_TERMS)  # type: ignore[return-value]

    @property
    def peak_bytes(self) -> np.ndarray:
        return self.device_total_bytes.max(axis=1)

    @property
    def peak_stage(self) -> np.ndarray:
        return self.device_total_bytes.argmax(axis=1)

    def host_bytes_per_node(self, batch: PlanBatch) -> np.ndarray:
        """(N,): host bytes one node's GPUs keep offloaded (offload.host_bytes_per_node)."""
        return host_bytes_per_node(self.host_bytes, batch)


def evaluate(batch: PlanBatch) -> BatchEstimate:
    """Every term of the step time and of each device's memory, for every row."""
    time_s = {term: np.broadcast_to(value, (len(batch.dp), 1))[:, 0] for term, value in step_times(batch).items()}
    return BatchEstimate(time_s=time_s, memory_bytes=device_memory(batch), host_bytes=host_memory(batch))


def estimate_step(
    model: ModelSpec,
    training: TrainingSpec,
    cluster: ClusterSpec,
    plan: ParallelPlan,
    measured: ProfileCosts | None = None,
    runtime: Runtime | None = None,
) -> StepEstimate:
    """Predict one step of a structurally valid plan (see planner.rules). `measured`: what a profile of the
    cluster measured (planner/request.py `profile_costs`), or None for the analytic model only; `runtime`: the
    training stack's regime (planner/cost/runtime.py), by default `runtime_for(cluster, measured)`."""
    kinds = layer_kinds(model, training, cluster, plan, measured=measured, runtime=runtime)
    batch = PlanBatch.of_plan(model, training, cluster, plan, kinds, measured, runtime)
    estimate = summarise(batch, evaluate(batch), row=0, plan=plan)
    if measured is None:
        return estimate
    sources, notes = profile_sources(kinds, batch, plan)
    return estimate.model_copy(update={"sources": sources, "assumptions": notes + estimate.assumptions})


# --------------------------------------------------------------------------------------------- time


def step_times(batch: PlanBatch) -> dict[str, np.ndarray]:
    """The breakdown's terms (TIME_TERMS), each (N, 1) or broadcastable to it (module docstring)."""
    overhead = batch.runtime.microbatch_host_overhead_s + microbatch_overhead_s(batch.measured)
    all_to_all = ep_device_comm_s(batch)
    hooks = fsdp_hooks_s(batch)
    busy = batch.per_device("busy_s") + all_to_all + overhead + hooks
    slowest = busy.argmax(axis=1)[:, None]
    m = batch.microbatches
    alone = microbatches_alone(batch.pp, batch.virtual_stages, m)
    wait_s = meeting_wait_s(batch.measured, batch.micro_batch_size)
    step_overhead = batch.runtime.step_host_overhead_s + step_overhead_s(batch.measured)

    def on_slowest(quantity: str, count: np.ndarray = m) -> np.ndarray:
        return count * np.take_along_axis(batch.per_device(quantity), slowest, axis=1)

    return {
        "compute_s": on_slowest("work_s", m - alone)
        + on_slowest("alone_work_s", alone)
        + m * overhead
        + step_overhead
        + m * np.take_along_axis(np.broadcast_to(hooks, busy.shape), slowest, axis=1),
        "tp_comm_s": on_slowest("tp_comm_s") + tp_step_comm_s(batch),
        "cp_comm_s": on_slowest("cp_comm_s"),
        "ep_comm_s": m * np.take_along_axis(all_to_all, slowest, axis=1),
        "pp_comm_s": pp_comm_s(batch) + pp_meetings(batch) * wait_s,
        "dp_comm_s": (dp_comm_exposed_s(batch) + dp_meetings(batch) * wait_s).max(axis=1, keepdims=True),
        "bubble_s": pipeline_bubble_s(
            batch.per_device("alone_busy_s") + all_to_all + overhead + hooks, batch.virtual_stages
        ),
        "accumulation_s": accumulation_s(batch).max(axis=1, keepdims=True),
        "optimizer_s": optimizer_step_s(batch).max(axis=1, keepdims=True),
        "offload_s": offload_exposed_s(batch).max(axis=1, keepdims=True),
    }


def profile_sources(kinds: LayerKinds, batch: PlanBatch, plan: ParallelPlan) -> tuple[dict[str, str], list[str]]:
    """Which model each time term came from with a profile attached ("profile", "analytic", or "profile+analytic"
    when its layers mixed both), and a note for every layer the profile could not answer."""
    layers = (kinds.embedding, kinds.block, kinds.head)
    layer_sources = {cost.time_source for cost in layers}
    compute = layer_sources.pop() if len(layer_sources) == 1 else "profile+analytic"
    cluster, measured = batch.cluster, batch.measured

    def group(axis: GroupAxis) -> GroupPlacement:
        return placement(axis, plan.degrees, cluster.gpus_per_node)

    optimizer = measured_optimizer_s_per_param(cluster, measured, batch.training.optimizer) is not None
    # The cp ring's hops as the profile's send/recv fit times them; the kernels they hide behind and the merges of
    # the partial results come from the roofline (planner/cost/context.py).
    ring = comm.channel_source(measured, group("cp"), p2p=True)
    sources = {
        "compute_s": compute,
        "bubble_s": compute,
        "tp_comm_s": comm.channel_source(measured, group("tp")),
        "dp_comm_s": comm.channel_source(measured, group("dp_cp")),
        "cp_comm_s": "profile+analytic" if ring == "profile" else "analytic",
        "ep_comm_s": "analytic",
        "pp_comm_s": comm.channel_source(measured, group("pp"), p2p=True),
        "accumulation_s": "analytic",
        "optimizer_s": "profile" if optimizer else "analytic",
        "memory": "profile" if measured is not None and measured.measures_memory else "analytic",
    }
    notes = [cost.time_note for cost in layers if cost.time_note]
    if plan.tp > 1 and not np.any(kinds.block.tp_comm_s):
        sources["tp_comm_s"] = "profile"
        notes.append("tensor-parallel collectives were timed inside the layers, on tp ranks: compute_s holds them")
    return sources, notes


# ------------------------------------------------------------------------------------------ summary


def summarise(batch: PlanBatch, result: BatchEstimate, row: int, plan: ParallelPlan) -> StepEstimate:
    """Row `row` of a batch result as the contract's StepEstimate (`plan` is that row's plan)."""
    model, training, cluster = batch.model, batch.training, batch.cluster
    breakdown = TimeBreakdown(**{term: float(result.time_s[term][row]) for term in TIME_TERMS})
    mem = memory_of_row(batch, result, row)
    step_s = breakdown.total_s
    gpus = cluster.num_gpus
    peak = cluster.gpu.peak_tflops[training.precision] * 1e12
    model_flops = flops.model_flops_per_step(model, training)
    hardware_flops = flops.hardware_flops_per_step(model, training, plan.recompute, batch.runtime.selective_recompute)
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
        num_microbatches=int(batch.microbatches[row, 0]),
        memory=mem,
        breakdown=breakdown,
        sources={term: "analytic" for term in TimeBreakdown.model_fields} | {"memory": "analytic"},
        uncertainty=estimate_uncertainty(batch.runtime.name, cluster.num_nodes, step_s, mem.peak_bytes),
        why_not_fits=[_over_message(stage) for stage in over],
        assumptions=_assumptions(cluster, batch.measured, training, plan, batch.runtime),
        offload=offload_traffic(batch, breakdown, row, plan),
    )


def offload_traffic(batch: PlanBatch, breakdown: TimeBreakdown, row: int, plan: ParallelPlan) -> OffloadTraffic | None:
    """Row `row`'s PCIe traffic and CPU step (planner/cost/offload.py), on the device that moves the most; None
    without offload, or on a CPU device, where it moves nothing."""
    rate = batch.cluster.host_link_Bps
    if plan.offload == "none" or batch.cluster.gpu.kind == "cpu" or rate is None:
        return None
    down, up = gradient_offload_bytes(batch)[row], weight_upload_bytes(batch)[row]
    device = int(np.argmax(down + up))
    return OffloadTraffic(
        offload=plan.offload,
        device_to_host_bytes=float(down[device]),
        host_to_device_bytes=float(up[device]),
        host_link_GBps=rate / 1e9,
        device_to_host_s=float(pcie_s(down, batch)[device]),
        host_to_device_s=float(pcie_s(up, batch)[device]),
        exposed_s=breakdown.offload_s,
        cpu_optimizer_s=float(cpu_optimizer_step_s(batch)[row].max()),
    )


def memory_of_row(batch: PlanBatch, result: BatchEstimate, row: int) -> MemoryEstimate:
    capacity = float(batch.cluster.gpu.memory_bytes)
    stages = []
    for device in range(batch.pp):
        terms = {term: float(result.memory_bytes[term][row, device]) for term in MEMORY_TERMS}
        total = sum(terms.values())
        stages.append(
            StageMemory(
                stage=device,
                layers=int(batch.blocks[row, device]),
                **terms,
                total_bytes=total,
                capacity_bytes=capacity,
                over_bytes=max(0.0, total - capacity),
                host_bytes=float(result.host_bytes[row, device]),
            )
        )
    peak = max(stages, key=lambda s: s.total_bytes)
    host_capacity = batch.cluster.host_memory_bytes
    return MemoryEstimate(
        peak_bytes=peak.total_bytes,
        peak_stage=peak.stage,
        capacity_bytes=capacity,
        by_stage=stages,
        host_bytes_per_node=float(result.host_bytes_per_node(batch)[row]),
        host_capacity_bytes=None if host_capacity is None else float(host_capacity),
    )


def _over_message(stage: StageMemory) -> str:
    return (
        f"stage {stage.stage} needs {stage.total_bytes / GiB:.2f} GiB but the GPU has "
        f"{stage.capacity_bytes / GiB:.2f} GiB: over by {stage.over_bytes:,.0f} bytes "
        f"({stage.over_bytes / GiB:.2f} GiB)"
    )


def _stack_assumption(runtime: Runtime, training: TrainingSpec) -> str:
    chosen = "" if "framework" in training.model_fields_set else " (the default; set training.framework)"
    return f"training stack: {training.framework}{chosen}, regime {runtime.name}: {runtime.source}"


def _memory_assumption(measured: bool) -> str:
    if not measured:
        return "memory is analytic"
    return ("activation memory as measured, with the executor's fp32 weights (4 + 4 bytes a parameter for weights "
            "and gradients, the optimizer's own state, AdamW's step temporaries)")  # fmt: skip


def _assumptions(
    cluster: ClusterSpec, measured: ProfileCosts | None, training: TrainingSpec, plan: ParallelPlan, runtime: Runtime
) -> list[str]:
    gpu = cluster.gpu
    if measured is None:
        speeds = (
            f"matmuls at {gpu.matmul_efficiency:.0%} of {gpu.name} peak, element-wise ops at "
            f"{gpu.memory_efficiency:.0%} of its HBM bandwidth (GPU preset)"
        )
    else:
        profile = measured.profile
        speeds = (
            f"times measured on {profile.device_name} ({profile.created}, torch {profile.torch_version}); "
            "terms the profile cannot answer use the GPU preset's speeds; "
            + _memory_assumption(measured.measures_memory)
        )
        if profile.calibration is not None:
            fitted = profile.calibration
            speeds += (
                f"; calibrated on {fitted.num_runs} measured runs ({fitted.created}, step-time error "
                f"{fitted.fit_mape:.0%} on them)"
            )
    notes = [speeds, _stack_assumption(runtime, training), f"{training.attention_kernel} attention"]
    if not gpu.supports("bf16"):  # a V100: planner/request.py made fp16 its default and refuses bf16
        notes.append(f"{training.precision} training: {gpu.name} has no bf16 tensor cores (fp16 is its default)")
    if plan.tp > 1:
        notes.append("tensor-parallel collectives are not overlapped with compute (Megatron-LM default)")
    if plan.ep > 1:
        notes.append(
            "expert parallelism: balanced drop-less routing (capacity factor 1.0); the dispatch and combine "
            "all-to-alls are not overlapped with compute"
        )
    if plan.dp * plan.cp > 1:
        notes.append(_reduction_assumption(plan, runtime, training.precision, hidden_share(measured, runtime)))
    if plan.offload != "none":
        notes.append(_offload_assumption(cluster))
    return notes


def _reduction_assumption(plan: ParallelPlan, runtime: Runtime, precision: str, share: float) -> str:
    if not plan.overlap_grad_reduce:
        return "gradient reduction does not overlap with backward"
    if runtime.pipeline_reduces_after_flush and plan.pp > 1:
        return f"gradient reduction does not overlap with backward: {runtime.name}'s pipeline reduces after its flush"
    zero_stage = np.array(plan.zero_stage)
    fsdp2 = runtime.on_fsdp2(zero_stage, np.array(plan.tp), plan.pp, np.array(plan.dp * plan.cp))
    if runtime.fsdp2_in_torch_pipelining and plan.pp > 1 and fsdp2:
        return "gradient reduction does not overlap with backward: FSDP2 in a pipeline reduces after its last backward"
    if not runtime.reduction_overlaps(zero_stage, plan.pp, precision):
        return (f"gradient reduction does not overlap with backward: {runtime.name} reduces {precision} ZeRO-"
                f"{plan.zero_stage} gradients after backward")  # fmt: skip
    if share == 1:
        return "gradient reduction overlaps with backward"
    return (f"gradient reduction overlaps with backward; {share:.0%} of the overlapped time hides (the compute "
            "beside a collective loses the rest to it)")  # fmt: skip


def _offload_assumption(cluster: ClusterSpec) -> str:
    if cluster.gpu.kind == "cpu":
        return "CPU offload on a CPU device moves nothing: host and device memory are the same"
    fields = ("host_link_GBps", "host_memory_per_node_bytes")
    overridden = [name for name in fields if getattr(cluster, name) is not None]
    host_side = f"host side of the {cluster.gpu.name} preset: {cluster.gpu.host_source or 'none given'}"
    if overridden:
        host_side += f" (overridden: cluster.{', cluster.'.join(overridden)})"
    return (
        "CPU offload (ZeRO-Offload / ZeRO-Infinity): the optimizer steps on the host at DeepSpeed CPU-Adam's rate "
        "(Ren et al. 2021, Table 2), one node's CPUs for all its GPUs; gradients go to the host behind backward, "
        f"the updated weights come back on the critical path (no delayed parameter update); {host_side}"
    )
