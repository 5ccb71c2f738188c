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


def _framework_runs_plan(plan: ParallelPlan, model: ModelSpec, training: TrainingSpec, cluster: ClusterSpec):
    if not framework_runs_zero_stage(training.framework, plan.zero_stage, plan.pp):
        yield framework_zero_violation(training.framework, plan.zero_stage, plan.pp)


_RULES: tuple[Callable[..., Iterator[Violation]], ...] = (
    _degrees_fill_cluster,
    _tp_divides_model,
    _batch_divides,
    _sequence_splits,
    _pipeline_splits,
    _framework_runs_plan,
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
