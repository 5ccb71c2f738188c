"""The executor names every plan it cannot run, with the field to change, before anything starts."""

from __future__ import annotations

import subprocess
import sys

import pytest

from executor.support import executor_violations, require_executable
from planner.errors import InfeasiblePlanError
from planner.specs import ModelSpec, ParallelPlan, TrainingSpec
from tests.train_requests import TINY_REQUEST

LLAMA = ModelSpec.model_validate(TINY_REQUEST["model"])  # the executor tests' tiny Llama
TRAINING = TrainingSpec(seq_len=32, global_batch_size=8, precision="fp32", optimizer="sgd")


def codes(plan: ParallelPlan, model: ModelSpec = LLAMA, training: TrainingSpec | None = TRAINING) -> list[str]:
    return [v.code for v in executor_violations(plan, model, training)]


@pytest.mark.parametrize(
    "plan",
    [
        ParallelPlan(),
        ParallelPlan(dp=2, zero_stage=0),
        ParallelPlan(dp=2, zero_stage=1),
        ParallelPlan(dp=2, tp=2, zero_stage=0),  # FSDP2's replicate holds DTensor parameters
        ParallelPlan(dp=2, tp=2, zero_stage=3, sequence_parallel=True),
        ParallelPlan(pp=2, dp=2, zero_stage=1, schedule="1f1b"),
        ParallelPlan(pp=2, dp=2, zero_stage=0, schedule="gpipe"),
        ParallelPlan(pp=2, dp=2, zero_stage=2, schedule="interleaved_1f1b", virtual_stages=2),
        ParallelPlan(tp=2, zero_stage=1),  # one dp rank: nothing to shard, ZeRO is moot
        ParallelPlan(pp=2, zero_stage=1, schedule="gpipe"),
        ParallelPlan(pp=2, dp=2, tp=2, zero_stage=3, recompute="selective"),
    ],
)
def test_plans_the_executor_runs_pass(plan: ParallelPlan) -> None:
    assert codes(plan) == []


def test_context_parallelism_runs_where_2cp_divides_the_sequence() -> None:
    assert codes(ParallelPlan(cp=2)) == []
    assert codes(ParallelPlan(cp=2, dp=2, tp=2, sequence_parallel=True, zero_stage=3)) == []
    (violation,) = executor_violations(ParallelPlan(cp=3), LLAMA, TRAINING)  # 32 tokens
    assert (violation.field, violation.code) == ("plan.cp", "cp_divides_seq")
    assert "2 x cp = 6" in violation.message


def test_zero1_counts_cp_ranks_as_replicas() -> None:
    # cp ranks average their gradients with the dp ranks, so ZeRO-1 has classic DDP to run even at dp=1.
    assert codes(ParallelPlan(cp=2, tp=2, zero_stage=1)) == ["executor_zero1_with_tp"]
    assert codes(ParallelPlan(cp=2, zero_stage=1)) == []


def test_sequence_parallelism_under_context_parallelism_splits_each_ranks_share() -> None:
    # tp=4 divides the 24 tokens of a sequence, but not the 6 that each of cp=4's ranks holds.
    training = TRAINING.model_copy(update={"seq_len": 24})
    model = LLAMA.model_copy(update={"num_attention_heads": 8, "num_kv_heads": 4, "vocab_size": 512})
    assert codes(ParallelPlan(tp=4, sequence_parallel=True), model, training) == []
    (violation,) = executor_violations(ParallelPlan(tp=4, cp=4, sequence_parallel=True), model, training)
    assert violation.code == "executor_sp_divides_seq"
    assert "6 tokens (seq_len / cp = 24 / 4 per cp rank)" in violation.message


def test_zero1_with_tensor_parallelism_is_refused_with_ddps_error() -> None:
    (violation,) = executor_violations(ParallelPlan(dp=2, tp=2, zero_stage=1), LLAMA, TRAINING)
    assert (violation.field, violation.code) == ("plan.zero_stage", "executor_zero1_with_tp")
    assert "c10d.broadcast_.default does not have a sharding strategy" in violation.message


@pytest.mark.parametrize("schedule, virtual", [("gpipe", 1), ("interleaved_1f1b", 2)])
def test_zero1_per_pipeline_stage_needs_1f1b(schedule: str, virtual: int) -> None:
    plan = ParallelPlan(pp=2, dp=2, zero_stage=1, schedule=schedule, virtual_stages=virtual)
    (violation,) = executor_violations(plan, LLAMA, TRAINING)
    assert (violation.field, violation.code) == ("plan.schedule", "executor_zero1_schedule")
    assert schedule in violation.message and "rebuilt parameter indices" in violation.message


def test_1f1b_needs_a_micro_batch_per_stage_gpipe_does_not() -> None:
    # global batch 8 at micro-batch 8: one micro-batch for two stages (torch's Schedule1F1B refuses it).
    (violation,) = executor_violations(ParallelPlan(pp=2, micro_batch_size=8, schedule="1f1b"), LLAMA, TRAINING)
    assert (violation.field, violation.code) == ("plan.micro_batch_size", "executor_1f1b_fill")
    assert "gives 1" in violation.message
    assert codes(ParallelPlan(pp=2, micro_batch_size=8, schedule="gpipe")) == []
    assert codes(ParallelPlan(pp=2, micro_batch_size=4, schedule="1f1b")) == []


def test_tied_embeddings_need_one_pipeline_stage() -> None:
    tied = LLAMA.model_copy(update={"tie_embeddings": True})
    assert codes(ParallelPlan(pp=2), tied) == ["executor_tied_embeddings_pp"]
    assert codes(ParallelPlan(tp=2, dp=2, zero_stage=3), tied) == []


def test_tensor_parallelism_must_divide_every_split_width() -> None:
    model = ModelSpec(
        num_layers=2, hidden_size=96, num_attention_heads=6, num_kv_heads=3, ffn_hidden_size=200, vocab_size=251
    )
    assert codes(ParallelPlan(tp=2), model) == ["executor_tp_divides_num_kv_heads"]
    assert codes(ParallelPlan(tp=3), model) == ["executor_tp_divides_ffn_hidden_size"]
    assert codes(ParallelPlan(tp=6), model) == [
        "executor_tp_divides_num_kv_heads",
        "executor_tp_divides_ffn_hidden_size",
    ]


def test_the_vocabulary_may_split_unevenly() -> None:
    assert codes(ParallelPlan(tp=2), LLAMA.model_copy(update={"vocab_size": 255})) == []


def test_mixture_of_experts_has_no_tensor_parallel_plan() -> None:
    moe = LLAMA.model_copy(update={"num_experts": 4, "experts_per_token": 2})
    assert codes(ParallelPlan(tp=2), moe) == ["executor_tp_moe"]
    assert codes(ParallelPlan(dp=2, zero_stage=3), moe) == []


def test_sequence_parallelism_must_divide_the_sequence() -> None:
    training = TRAINING.model_copy(update={"seq_len": 30})
    model = LLAMA.model_copy(update={"num_attention_heads": 8, "num_kv_heads": 4, "vocab_size": 512})
    assert codes(ParallelPlan(tp=4, sequence_parallel=True), model, training) == ["executor_sp_divides_seq"]
    assert codes(ParallelPlan(tp=4, sequence_parallel=False), model, training) == []


def test_micro_batches_must_exist_and_be_equal() -> None:
    assert codes(ParallelPlan(dp=2, micro_batch_size=8)) == ["executor_no_microbatch"]
    assert codes(ParallelPlan(dp=2, micro_batch_size=3)) == ["executor_batch_divides"]
    assert codes(ParallelPlan(dp=3)) == ["executor_batch_divides"]


def test_batch_and_sequence_rules_need_the_training_setup() -> None:
    assert codes(ParallelPlan(dp=3), training=None) == []


def test_every_pipeline_chunk_needs_a_layer() -> None:
    assert codes(ParallelPlan(pp=4, schedule="interleaved_1f1b", virtual_stages=2)) == ["executor_empty_chunk"]
    assert codes(ParallelPlan(pp=2, layers_per_stage=(1, 2))) == ["executor_layers_per_stage_sum"]


def test_require_executable_names_every_refusal() -> None:
    plan = ParallelPlan(cp=3, dp=2, tp=2, zero_stage=1)
    with pytest.raises(InfeasiblePlanError) as refused:
        require_executable(plan, LLAMA.model_copy(update={"tie_embeddings": True}), TRAINING)
    assert refused.value.reason == "not_executable"
    assert [v.code for v in refused.value.violations] == ["cp_divides_seq", "executor_zero1_with_tp"]
    assert refused.value.to_dict()["violations"][0]["field"] == "plan.cp"


def test_support_imports_no_torch() -> None:
    check = "import sys, executor.support; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", check], check=True)


def test_expert_parallelism_runs_except_at_zero1() -> None:
    moe = LLAMA.model_copy(update={"num_experts": 4, "experts_per_token": 2})
    for zero_stage in (0, 2, 3):
        assert codes(ParallelPlan(dp=2, ep=2, zero_stage=zero_stage), moe) == []
    assert codes(ParallelPlan(dp=2, ep=2, zero_stage=1), moe) == ["executor_ep_zero1"]
    assert codes(ParallelPlan(dp=2, ep=1, zero_stage=1), moe) == []  # every expert on every rank: plain ZeRO-1
    assert codes(ParallelPlan(dp=2, cp=2, ep=4, zero_stage=3, offload="optimizer_and_params"), moe) == []
