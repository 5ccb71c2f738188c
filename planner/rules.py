"""Structural rules a ParallelPlan must meet for a given model, training setup and cluster.

Each rule is a small function returning the violations it finds; `plan_violations` runs all of them so the
user sees every broken rule at once. These are "can't run at all" rules; running out of memory is not one of
them (an estimate still answers, with fits=false).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from planner.errors import InfeasiblePlanError, Violation

if TYPE_CHECKING:
    from planner.specs import ClusterSpec, ModelSpec, ParallelPlan, TrainingSpec


def _degrees_fill_cluster(plan: ParallelPlan, model: ModelSpec, training: TrainingSpec, cluster: ClusterSpec):
    if plan.num_gpus != cluster.num_gpus:
        yield Violation(
            "plan",
            "degrees_product",
            f"dp x tp x pp x cp = {plan.dp} x {plan.tp} x {plan.pp} x {plan.cp} = {plan.num_gpus}, "
            f"but the cluster has {cluster.num_nodes} x {cluster.gpus_per_node} = {cluster.num_gpus} GPUs",
        )


def tensor_parallel_widths(model: ModelSpec) -> dict[str, int]:
    """The widths tensor parallelism splits over tp ranks: whole heads (Megatron-LM's attention shards by head,
    Shoeybi et al. 2019 sec. 3) and the MLP's hidden size (column- and row-parallel halves must agree)."""
    return {
        "num_attention_heads": model.num_attention_heads,
        "num_kv_heads": model.kv_heads,
        "ffn_hidden_size": model.ffn_size,
    }


def _tp_divides_model(plan: ParallelPlan, model: ModelSpec, training: TrainingSpec, cluster: ClusterSpec):
    for name, width in tensor_parallel_widths(model).items():
        if width % plan.tp:
            yield Violation("plan.tp", f"tp_divides_{name}", f"tp={plan.tp} does not divide {name}={width}")


def _batch_divides(plan: ParallelPlan, model: ModelSpec, training: TrainingSpec, cluster: ClusterSpec):
    per_step = plan.dp * plan.micro_batch_size
    if training.global_batch_size % per_step:
        yield Violation(
            "training.global_batch_size",
            "batch_divisible",
            f"global_batch_size={training.global_batch_size} is not divisible by "
            f"dp x micro_batch_size = {plan.dp} x {plan.micro_batch_size} = {per_step}",
        )


def sequence_parallel_splits(seq_len, tp):
    """Sequence parallelism splits each sequence over the tp ranks (Korthikanti et al. 2022, sec. 4.2.2), so tp
    must divide seq_len. Numbers or numpy arrays: the search asks it of whole columns."""
    return seq_len % tp == 0


def context_parallel_splits(seq_len, cp):
    """Context parallelism splits each sequence into 2 x cp chunks for load balance, rank r holding chunks r and
    2cp-1-r (Megatron-LM's context parallelism docs; executor/parallel/context.py), so 2 x cp must divide seq_len.
    One rank splits nothing."""
    return (cp == 1) | (seq_len % (2 * cp) == 0)


def context_parallel_violation(seq_len: int, cp: int) -> Violation:
    return Violation("plan.cp", "cp_divides_seq", f"seq_len={seq_len} is not divisible by 2 x cp = {2 * cp}")


def sequence_parallel_violation(seq_len: int, tp: int) -> Violation:
    return Violation(
        "plan.sequence_parallel",
        "sp_divides_seq",
        f"sequence parallel splits the sequence over tp={tp}, which does not divide seq_len={seq_len}",
    )


def partial_interleaved_round(microbatches, pp):
    """Megatron-LM's and torch.distributed.pipelining's interleaved schedules run micro-batches in rounds of pp
    (Narayanan et al. 2021, sec. 2.2.2); a partial round would idle some devices in a way neither library
    schedules. Numbers or numpy arrays."""
    return microbatches % pp != 0


def interleaved_round_violation(microbatches: int, pp: int) -> Violation:
    return Violation(
        "plan.schedule",
        "interleaved_microbatches",
        f"interleaved_1f1b needs the number of micro-batches ({microbatches}) to be a multiple of pp={pp}",
    )


def _sequence_splits(plan: ParallelPlan, model: ModelSpec, training: TrainingSpec, cluster: ClusterSpec):
    if plan.sequence_parallel and not sequence_parallel_splits(training.seq_len, plan.tp):
        yield sequence_parallel_violation(training.seq_len, plan.tp)
    if not context_parallel_splits(training.seq_len, plan.cp):
        yield context_parallel_violation(training.seq_len, plan.cp)
    if plan.cp > 1 and training.attention_kernel != "flash":
        yield Violation("plan.cp", "cp_needs_flash", "context parallelism (ring attention) needs flash attention")
    if model.position_embedding == "learned" and training.seq_len > (model.max_position_embeddings or 0):
        yield Violation(
            "training.seq_len",
            "seq_exceeds_positions",
            f"seq_len={training.seq_len} exceeds the model's learned positions "
            f"(max_position_embeddings={model.max_position_embeddings})",
        )


def _experts_split(plan: ParallelPlan, model: ModelSpec, training: TrainingSpec, cluster: ClusterSpec):
    """Expert parallelism splits whole experts over ep ranks of the dp x cp group (DESIGN.md)."""
    if plan.ep == 1:
        return
    if model.num_experts == 1:
        yield Violation("plan.ep", "ep_needs_experts", f"ep={plan.ep} needs a mixture of experts; the model is dense")
    elif model.num_experts % plan.ep:
        yield Violation(
            "plan.ep", "ep_divides_experts", f"ep={plan.ep} does not divide num_experts={model.num_experts}"
        )
    if (plan.dp * plan.cp) % plan.ep:
        yield Violation(
            "plan.ep",
            "ep_divides_dp_cp",
            f"ep={plan.ep} does not divide the data-parallel group dp x cp = {plan.dp} x {plan.cp} = "
            f"{plan.dp * plan.cp}",
        )


def _pipeline_splits(plan: ParallelPlan, model: ModelSpec, training: TrainingSpec, cluster: ClusterSpec):
    chunks = plan.num_model_chunks
    if chunks > model.num_layers:
        yield Violation(
            "plan.pp",
            "too_many_stages",
            f"pp x virtual_stages = {chunks} model chunks, but the model has only {model.num_layers} layers",
        )
    if plan.layers_per_stage is not None and sum(plan.layers_per_stage) != model.num_layers:
        yield Violation(
            "plan.layers_per_stage",
            "layers_per_stage_sum",
            f"sums to {sum(plan.layers_per_stage)}; the model has {model.num_layers} layers",
        )
    microbatches = plan.num_microbatches(training)
    if plan.schedule == "interleaved_1f1b" and partial_interleaved_round(microbatches, plan.pp):
        yield interleaved_round_violation(microbatches, plan.pp)


# The ZeRO stages (or their equivalent) each training stack runs, and those it runs under pipeline parallelism.
# Megatron-LM: plain data parallelism or its distributed optimizer (ZeRO-1, with tp and pp alike;
# megatron/core/optimizer/distrib_optimizer.py). DeepSpeed: stages 0-3, but only 0 and 1 with its pipeline engine
# ("ZeRO-2 and ZeRO-3 are incompatible with pipeline parallelism", deepspeed/runtime/pipe/engine.py).
# PyTorch FSDP2: DDP / `replicate` (0), `reshard_after_forward=False` (2, SHARD_GRAD_OP) and full sharding (3),
# with pipeline parallelism (torchtitan); it has no optimizer-only sharding (1). paraplan's executor: all four
# (executor/parallel/data.py: ZeRO-1 on torch's ZeroRedundancyOptimizer).
FRAMEWORK_ZERO_STAGES: dict[str, tuple[int, ...]] = {
    "megatron": (0, 1),
    "deepspeed": (0, 1, 2, 3),
    "fsdp": (0, 2, 3),
    "paraplan": (0, 1, 2, 3),
}
FRAMEWORK_PIPELINE_ZERO_STAGES: dict[str, tuple[int, ...]] = {"deepspeed": (0, 1)}
# The code of the rule above: the one rule about the stack rather than the plan (planner/export tells them apart).
FRAMEWORK_ZERO_RULE = "framework_zero_stage"


def framework_runs_zero_stage(framework: str, zero_stage: int, pp: int) -> bool:
    allowed = FRAMEWORK_PIPELINE_ZERO_STAGES.get(framework) if pp > 1 else None
    return zero_stage in (allowed or FRAMEWORK_ZERO_STAGES[framework])


def framework_zero_violation(framework: str, zero_stage: int, pp: int) -> Violation:
    stages = FRAMEWORK_PIPELINE_ZERO_STAGES.get(framework) if pp > 1 else None
    under = f" with pipeline parallelism (pp={pp})" if stages else ""
    stages = stages or FRAMEWORK_ZERO_STAGES[framework]
    return Violation(
        "plan.zero_stage",
        FRAMEWORK_ZERO_RULE,
        f"training.framework={framework} runs ZeRO stages {list(stages)}{under}, not {zero_stage}",
    )


def paraplan_expert_violations(plan: ParallelPlan, model: ModelSpec) -> Iterator[Violation]:
    """What paraplan's own executor runs of a mixture of experts (executor/parallel/expert.py): the planner's
    `paraplan` regime offers only those plans, and the executor refuses the rest (executor/support.py)."""
    if model.num_experts > 1 and plan.tp > 1:
        # A choice, not a torch limit: running the MoE layer replicated on every tp rank would repeat the experts'
        # work tp times, and splitting each expert (Megatron's expert tensor parallelism) is not implemented.
        yield Violation(
            "plan.tp",
            "executor_tp_moe",
            "the executor's tensor-parallel plan covers attention and dense MLPs only: it neither splits the experts "
            "of a mixture of experts over tp ranks nor repeats them on each; use tp=1 and split the experts with ep",
        )
    if plan.ep > 1 and plan.zero_stage == 1 and model.num_experts > 1:  # (a dense model's ep is refused as such)
        # Measured (2 gloo ranks, dp=2 ep=2): losses drift from the second step, the ZeroRedundancyOptimizer's
        # broadcasts overwrite one rank's experts with the other's.
        yield Violation(
            "plan.zero_stage",
            "executor_ep_zero1",
            "ZeRO-1 runs on ZeroRedundancyOptimizer, which gives each parameter one owner in the dp x cp group and "
            "broadcasts its update to the whole group; with ep > 1 the ranks of that group hold different experts, "
            "which the broadcasts would overwrite; use zero_stage 0, 2 or 3",
        )


def _framework_runs_plan(plan: ParallelPlan, model: ModelSpec, training: TrainingSpec, cluster: ClusterSpec):
    if not framework_runs_zero_stage(training.framework, plan.zero_stage, plan.pp):
        yield framework_zero_violation(training.framework, plan.zero_stage, plan.pp)
    if training.framework == "paraplan":
        yield from paraplan_expert_violations(plan, model)


# The CPU offloads each training stack runs. DeepSpeed: `offload_optimizer` (ZeRO-Offload, Ren et al. 2021) and
# `offload_param` (ZeRO-Infinity, Rajbhandari et al. 2021), device cpu (DeepSpeed config docs, "ZeRO
# optimizations"). Megatron-Core: `--optimizer-cpu-offload` with its distributed optimizer
# (megatron/core/optimizer/cpu_offloading/hybrid_optimizer.py); it offloads no weights. PyTorch FSDP2:
# `fully_shard(offload_policy=CPUOffloadPolicy())` keeps the sharded weights, their gradients and the optimizer
# step on the CPU together; it has no optimizer-only offload. paraplan's executor runs FSDP2's (executor/apply.py).
FRAMEWORK_OFFLOADS: dict[str, tuple[str, ...]] = {
    "megatron": ("none", "optimizer"),
    "deepspeed": ("none", "optimizer", "optimizer_and_params"),
    "fsdp": ("none", "optimizer_and_params"),
    "paraplan": ("none", "optimizer_and_params"),
}
# The least ZeRO stage each offload needs (DeepSpeed: offload_optimizer with stages 1-3, offload_param with stage 3
# only: "only valid with stage 3", DeepSpeed config docs); without ZeRO-3 no stack shards the weights it offloads.
OFFLOAD_MIN_ZERO_STAGE: dict[str, int] = {"none": 0, "optimizer": 1, "optimizer_and_params": 3}


def offload_zero_violation(offload: str, zero_stage: int) -> Violation | None:
    """The violation of offloading `offload` at `zero_stage`, or None where the stage allows it."""
    least = OFFLOAD_MIN_ZERO_STAGE[offload]
    if zero_stage >= least:
        return None
    needs = "zero_stage 3" if least == 3 else f"zero_stage >= {least}"
    return Violation("plan.offload", "offload_zero_stage", f"offload={offload} needs {needs}, got {zero_stage}")


def framework_offload_violation(framework: str, offload: str) -> Violation | None:
    """The violation of asking `framework` for `offload`, or None where it runs it."""
    if offload in FRAMEWORK_OFFLOADS[framework]:
        return None
    return Violation(
        "plan.offload",
        "framework_offload",
        f"training.framework={framework} offloads {list(FRAMEWORK_OFFLOADS[framework])}, not {offload}",
    )


def _offload_runs(plan: ParallelPlan, model: ModelSpec, training: TrainingSpec, cluster: ClusterSpec):
    for found in (offload_zero_violation(plan.offload, plan.zero_stage),
                  framework_offload_violation(training.framework, plan.offload)):  # fmt: skip
        if found is not None:
            yield found


def host_side_violations(offload: str, cluster: ClusterSpec) -> list[Violation]:
    """What an offloading plan needs to know of the host that the GPU preset may not say: the node's RAM and the
    PCIe rate (planner/presets.py `_HOST_SIDES`; a CPU device offloads to itself and needs neither)."""
    if offload == "none" or cluster.gpu.kind == "cpu":
        return []
    found = []
    if cluster.host_memory_bytes is None:
        found.append(Violation(
            "cluster.host_memory_per_node_bytes", "host_memory_unknown",
            f"offload={offload} needs the RAM of a node, which the {cluster.gpu.name} preset does not know: set it",
        ))  # fmt: skip
    if cluster.host_link_Bps is None:
        found.append(Violation(
            "cluster.host_link_GBps", "host_link_unknown",
            f"offload={offload} needs the GPU's PCIe rate to the host, which {cluster.gpu.name} does not give: set it",
        ))  # fmt: skip
    return found


def _host_side_known(plan: ParallelPlan, model: ModelSpec, training: TrainingSpec, cluster: ClusterSpec):
    yield from host_side_violations(plan.offload, cluster)


def host_memory_violation(needed_bytes: float, cluster: ClusterSpec) -> Violation | None:
    """The violation of offloading `needed_bytes` per node (planner/cost/offload.py `host_bytes_per_node`) to a
    node with less RAM, or None where it fits (or nothing is offloaded)."""
    capacity = cluster.host_memory_bytes
    if needed_bytes <= 0 or capacity is None or needed_bytes <= capacity:
        return None
    over = needed_bytes - capacity
    return Violation(
        "cluster.host_memory_per_node_bytes",
        "host_memory_exceeded",
        f"the offloaded states need {needed_bytes:,.0f} bytes of host memory per node ({needed_bytes / 1e12:.2f} TB) "
        f"but a node has {capacity:,.0f}: over by {over:,.0f} bytes ({over / 1e12:.2f} TB)",
    )


_RULES: tuple[Callable[..., Iterator[Violation]], ...] = (
    _degrees_fill_cluster,
    _tp_divides_model,
    _batch_divides,
    _sequence_splits,
    _experts_split,
    _pipeline_splits,
    _framework_runs_plan,
    _offload_runs,
    _host_side_known,
)


def plan_violations(
    plan: ParallelPlan, model: ModelSpec, training: TrainingSpec, cluster: ClusterSpec
) -> list[Violation]:
    return [v for rule in _RULES for v in rule(plan, model, training, cluster)]


def require_valid(plan: ParallelPlan, model: ModelSpec, training: TrainingSpec, cluster: ClusterSpec) -> None:
    """Raise InfeasiblePlanError naming every broken rule, or return."""
    found = plan_violations(plan, model, training, cluster)
    if found:
        raise InfeasiblePlanError("invalid_plan", found)
