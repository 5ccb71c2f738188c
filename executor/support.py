"""What the executor can run: every plan it refuses, named before any process starts.

Pure Python (no torch), so `paraplan` and the API can check a plan in microseconds. The planner's own rules
(planner/rules.py) say whether a plan makes sense at all; these say whether *this executor* can run it with the
torch.distributed features it uses. Each refusal traces to a measured failure or a missing feature, recorded in
shared/notes/torch-distributed-on-cpu.md:

- DP under TP or PP uses FSDP2 (`fully_shard`, or `replicate_with_fsdp.replicate` for ZeRO-0), which works with
  every schedule and with DTensor parameters. Only ZeRO-1 needs classic DDP + ZeroRedundancyOptimizer, and that
  pair fails on DTensor parameters (TP) and per stage under GPipe / interleaved 1F1B (DDP's reducer).
- With dp x cp == 1 there is nothing to synchronise, so the ZeRO stage is ignored and never refused (the cp ranks
  hold the same weights as the dp ranks do, and data parallelism runs over both).
- Expert parallelism (executor/parallel/expert.py) runs at ZeRO 0, 2 and 3 (with or without offload), with pp and
  cp; not at ZeRO-1, and a mixture of experts never with tp > 1 (`_experts`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from planner.errors import InfeasiblePlanError, Violation
from planner.rules import (
    context_parallel_splits,
    context_parallel_violation,
    paraplan_expert_violations,
    sequence_parallel_splits,
    tensor_parallel_widths,
)
from planner.specs import ModelSpec, ParallelPlan, TrainingSpec

Rule = Callable[[ParallelPlan, ModelSpec, TrainingSpec | None], Iterator[Violation]]


def _context_parallel(plan: ParallelPlan, model: ModelSpec, training: TrainingSpec | None) -> Iterator[Violation]:
    # Ring attention's zigzag split (executor/parallel/context.py) cuts each sequence into 2 x cp equal chunks.
    if training is not None and not context_parallel_splits(training.seq_len, plan.cp):
        yield context_parallel_violation(training.seq_len, plan.cp)


def _zero1_needs_ddp(plan: ParallelPlan, model: ModelSpec, training: TrainingSpec | None) -> Iterator[Violation]:
    if plan.zero_stage != 1 or plan.dp * plan.cp == 1:  # cp ranks are replicas too (executor/apply.py)
        return
    if plan.tp > 1:
        yield Violation(
            "plan.zero_stage",
            "executor_zero1_with_tp",
            "ZeRO-1 runs on classic DDP + ZeroRedundancyOptimizer, which cannot hold tensor-parallel (DTensor) "
            "parameters: DDP's start-up sync fails ('Operator c10d.broadcast_.default does not have a sharding "
            "strategy registered', or with plain norm weights beside them 'aten.cat.default got mixed "
            "torch.Tensor and DTensor'); use zero_stage 0, 2 or 3, which run on FSDP2",
        )
    if plan.pp > 1 and plan.schedule != "1f1b":
        yield Violation(
            "plan.schedule",
            "executor_zero1_schedule",
            f"ZeRO-1 puts classic DDP on each pipeline stage, and DDP fails under {plan.schedule} from the second "
            "step on ('rebuilt parameter indices size is not same as original model parameters size', "
            "c10d reducer); use schedule 1f1b, or zero_stage 0, 2 or 3, which run on FSDP2",
        )


def _tied_embeddings(plan: ParallelPlan, model: ModelSpec, training: TrainingSpec | None) -> Iterator[Violation]:
    if model.tie_embeddings and plan.pp > 1:
        yield Violation(
            "model.tie_embeddings",
            "executor_tied_embeddings_pp",
            "tied embeddings with pp > 1: the first and last pipeline stages each hold a copy of the shared "
            "matrix and the executor does not sum their gradients, so the copies would drift apart",
        )


def _tensor_parallel_widths(plan: ParallelPlan, model: ModelSpec, training: TrainingSpec | None) -> Iterator[Violation]:
    # Each rank's attention views its projections as whole heads, and the MLP's column- and row-parallel halves
    # must split f identically: an uneven f fails ("a and b must have same reduction dim"). The vocabulary may
    # split unevenly: DTensor shards the embedding and the head row-wise with uneven shards and gets the same
    # numbers (the GPT case of tests/distributed/test_parity.py has vocab 255 on tp=2).
    for name, width in tensor_parallel_widths(model).items():
        if width % plan.tp:
            yield Violation(
                "plan.tp",
                f"executor_tp_divides_{name}",
                f"tensor parallelism splits {name} over tp={plan.tp} ranks, but {width} is not divisible by it",
            )


def _experts(plan: ParallelPlan, model: ModelSpec, training: TrainingSpec | None) -> Iterator[Violation]:
    yield from paraplan_expert_violations(plan, model)


def _sequence_parallel(plan: ParallelPlan, model: ModelSpec, training: TrainingSpec | None) -> Iterator[Violation]:
    # Under context parallelism each rank's sequence is its s/cp tokens, which SP then splits over tp.
    if training is None or not plan.sequence_parallel:
        return
    local = training.seq_len // plan.cp
    if not sequence_parallel_splits(local, plan.tp):
        per_rank = "" if plan.cp == 1 else f" (seq_len / cp = {training.seq_len} / {plan.cp} per cp rank)"
        yield Violation(
            "plan.sequence_parallel",
            "executor_sp_divides_seq",
            f"sequence parallelism splits {local} tokens{per_rank} over tp={plan.tp} ranks, which does not divide it",
        )


def _microbatches(plan: ParallelPlan, model: ModelSpec, training: TrainingSpec | None) -> Iterator[Violation]:
    if training is None:
        return
    per_replica, micro = divmod(training.global_batch_size, plan.dp)
    if plan.num_microbatches(training) < 1:
        yield Violation(
            "plan.micro_batch_size",
            "executor_no_microbatch",
            f"global_batch_size={training.global_batch_size} gives fewer than one micro-batch of "
            f"{plan.micro_batch_size} per data-parallel rank (dp={plan.dp})",
        )
    elif micro or per_replica % plan.micro_batch_size:
        # Unequal micro-batches would weight sequences unequally in the mean loss (and torch's pipeline
        # splitter refuses them); parity with a single-device run needs them equal.
        yield Violation(
            "training.global_batch_size",
            "executor_batch_divides",
            f"global_batch_size={training.global_batch_size} must split into equal micro-batches: it is not "
            f"divisible by dp x micro_batch_size = {plan.dp} x {plan.micro_batch_size}",
        )


def _one_f_one_b_fill(plan: ParallelPlan, model: ModelSpec, training: TrainingSpec | None) -> Iterator[Violation]:
    # Found by `paraplan validate`: torch.distributed.pipelining's Schedule1F1B refuses to start with fewer
    # micro-batches than stages ("Number of microbatches (1) must be greater than or equal to the number of
    # stages (2)"). GPipe runs them; interleaved 1F1B already needs a multiple of pp (planner/rules.py).
    if training is None or plan.pp == 1 or plan.schedule != "1f1b":
        return
    microbatches = plan.num_microbatches(training)
    if 1 <= microbatches < plan.pp:
        yield Violation(
            "plan.micro_batch_size",
            "executor_1f1b_fill",
            f"1f1b needs at least pp={plan.pp} micro-batches per step, and micro_batch_size={plan.micro_batch_size} "
            f"gives {microbatches}; use a smaller micro-batch or the gpipe schedule",
        )


def _stage_layers(plan: ParallelPlan, model: ModelSpec, training: TrainingSpec | None) -> Iterator[Violation]:
    counts = plan.stage_layer_counts(model.num_layers)
    if min(counts) < 1:
        yield Violation(
            "plan.pp",
            "executor_empty_chunk",
            f"every pipeline chunk needs at least one layer, but {model.num_layers} layers over "
            f"pp x virtual_stages = {plan.num_model_chunks} chunks give {list(counts)}",
        )
    if sum(counts) != model.num_layers:
        yield Violation(
            "plan.layers_per_stage",
            "executor_layers_per_stage_sum",
            f"layers_per_stage sums to {sum(counts)}; the model has {model.num_layers} layers",
        )


def _offload(plan: ParallelPlan, model: ModelSpec, training: TrainingSpec | None) -> Iterator[Violation]:
    # torch has no optimizer-only CPU offload: FSDP2's CPUOffloadPolicy keeps the weight shards, their gradients and
    # the optimizer step on the host together, and DDP / ZeroRedundancyOptimizer keep every state on the device.
    if plan.offload == "optimizer":
        yield Violation(
            "plan.offload",
            "executor_optimizer_offload",
            "the executor offloads through FSDP2's CPUOffloadPolicy, which moves the weights with the optimizer; "
            "torch has no optimizer-only CPU offload (DeepSpeed's offload_optimizer): use optimizer_and_params "
            "with zero_stage 3",
        )
    elif plan.offload == "optimizer_and_params" and plan.zero_stage != 3:
        yield Violation(
            "plan.offload",
            "executor_offload_zero3",
            "optimizer_and_params runs on FSDP2 fully_shard with CPUOffloadPolicy: zero_stage 3, "
            f"not {plan.zero_stage}",
        )


_RULES: tuple[Rule, ...] = (
    _context_parallel,
    _zero1_needs_ddp,
    _tied_embeddings,
    _tensor_parallel_widths,
    _experts,
    _sequence_parallel,
    _microbatches,
    _one_f_one_b_fill,
    _stage_layers,
    _offload,
)


def executor_violations(plan: ParallelPlan, model: ModelSpec, training: TrainingSpec | None = None) -> list[Violation]:
    """Every reason the executor refuses `plan` for `model`; the batch and sequence rules need `training`."""
    return [found for rule in _RULES for found in rule(plan, model, training)]


def require_executable(plan: ParallelPlan, model: ModelSpec, training: TrainingSpec) -> None:
    """Raise InfeasiblePlanError("not_executable", ...) naming every refusal, or return."""
    found = executor_violations(plan, model, training)
    if found:
        raise InfeasiblePlanError("not_executable", found)
