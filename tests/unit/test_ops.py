"""Per-op activation accounting against Korthikanti et al. 2022 table 2, and FLOPs against Narayanan eq. 3."""

from __future__ import annotations

from pathlib import Path

import pytest

from planner.cost import ops
from planner.cost.flops import hardware_flops_per_step, model_flops_per_step, narayanan_eq3_flops
from planner.cost.runtime import DEEPSPEED, FSDP, MEGATRON, PARAPLAN_CPU, PARAPLAN_CUDA
from planner.presets import model_preset
from planner.profiles import load_profile_json
from planner.specs import ModelSpec, ParallelPlan, TrainingSpec
from tests.conftest import gpt_block_model

S, B, H, A = 2048, 2, 512, 8
H200 = Path(__file__).parents[1] / "data" / "h200-llama3.2-1b"
EAGER_FP16 = TrainingSpec(seq_len=S, global_batch_size=B * 8, precision="fp16", attention_kernel="eager")


def saved(model: ModelSpec, training: TrainingSpec, plan: ParallelPlan) -> float:
    shape = ops.Shape.of(model, training, plan)
    block = ops.block_ops(model, training, shape)
    if plan.recompute == "full":
        return ops.block_input_bytes(model, shape)
    return ops.saved_bytes(block, plan.recompute)


def sbh(x: float) -> float:
    return S * B * H * x


def as2b(x: float) -> float:
    return A * S * S * B * x


def norm_stats(per_token_bytes: int, split: int = 1) -> float:
    """Two norms' per-token statistics (fp32 mean and 1/std for LayerNorm, 1/rms for RMSNorm), which the
    paper's formula leaves out; `split`: tp under sequence parallelism."""
    return 2 * per_token_bytes * S * B / split


LN_STATS = ops.NORM_STATS_BYTES["layernorm"]


def test_gpt_block_is_34sbh_plus_5as2b():
    got = saved(gpt_block_model(H, A), EAGER_FP16, ParallelPlan(micro_batch_size=B))
    assert got == pytest.approx(sbh(34) + as2b(5) + norm_stats(LN_STATS), rel=1e-12)


@pytest.mark.parametrize("t", [2, 4, 8])
def test_tensor_parallel_rows_of_table_2(t):
    model = gpt_block_model(H, A)
    tp_only = saved(model, EAGER_FP16, ParallelPlan(tp=t, micro_batch_size=B))
    assert tp_only == pytest.approx(sbh(10 + 24 / t) + as2b(5) / t + norm_stats(LN_STATS))
    tp_sp = saved(model, EAGER_FP16, ParallelPlan(tp=t, micro_batch_size=B, sequence_parallel=True))
    assert tp_sp == pytest.approx((sbh(34) + as2b(5)) / t + norm_stats(LN_STATS, t))
    tp_selective = saved(model, EAGER_FP16, ParallelPlan(tp=t, micro_batch_size=B, recompute="selective"))
    assert tp_selective == pytest.approx(sbh(10 + 24 / t) + norm_stats(LN_STATS))
    sp_selective = saved(
        model,
        EAGER_FP16,
        ParallelPlan(tp=t, micro_batch_size=B, sequence_parallel=True, recompute="selective"),
    )
    assert sp_selective == pytest.approx(sbh(34) / t + norm_stats(LN_STATS, t))


def test_full_recompute_keeps_only_the_block_input():
    got = saved(gpt_block_model(H, A), EAGER_FP16, ParallelPlan(micro_batch_size=B, recompute="full"))
    assert got == pytest.approx(sbh(2))


def test_no_dropout_drops_masks_and_dropout_output():
    # Without dropout: 34 - 2 (hidden masks) = 32 sbh and 5 - 3 (mask + dropout output) = 2 as^2b.
    got = saved(gpt_block_model(H, A, dropout=0.0), EAGER_FP16, ParallelPlan(micro_batch_size=B))
    assert got == pytest.approx(sbh(32) + as2b(2) + norm_stats(LN_STATS))


def test_flash_attention_has_no_quadratic_term():
    model = gpt_block_model(H, A, dropout=0.0)
    flash = TrainingSpec(seq_len=S, global_batch_size=B, precision="bf16", attention_kernel="flash")
    got = saved(model, flash, ParallelPlan(micro_batch_size=B))
    logsumexp = 4 * S * B * A
    assert got == pytest.approx(sbh(32) + logsumexp + norm_stats(LN_STATS))


def test_gqa_and_swiglu_per_op():
    # Llama-style: kv heads 2 of 8 (kv_size = h/4), SwiGLU f; saved: norms 2+2, qkv in 2, q 2, k+v 2*(2/4),
    # out_proj in 2, fc1 in 2, swiglu 3 tensors of f, fc2 in 1 tensor of f (2 bytes each); RoPE's fp32 cos and
    # sin tables of [S, head_dim].
    f = 1376
    model = ModelSpec(
        num_layers=1,
        hidden_size=H,
        num_attention_heads=A,
        num_kv_heads=2,
        ffn_hidden_size=f,
        vocab_size=1000,
        mlp="swiglu",
        norm="rmsnorm",
    )
    training = TrainingSpec(seq_len=S, global_batch_size=B, precision="bf16", attention_kernel="flash")
    got = saved(model, training, ParallelPlan(micro_batch_size=B))
    rope = 2 * 4 * S * (H // A)
    expected = sbh(2 + 2 + 2 + 2 + 2 * 2 / 4 + 2 + 2) + S * B * 2 * 4 * f + 4 * S * B * A + rope
    expected += norm_stats(ops.NORM_STATS_BYTES["rmsnorm"])
    assert got == pytest.approx(expected)


def test_block_forward_flops_are_24bsh2_plus_4bs2h():
    model = gpt_block_model(H, A)
    block = ops.block_ops(model, EAGER_FP16, ops.Shape.of(model, EAGER_FP16, ParallelPlan(micro_batch_size=B)))
    assert sum(op.matmul_flops for op in block) == pytest.approx(24 * B * S * H**2 + 4 * B * S**2 * H)


def test_hardware_flops_with_full_recompute_equal_narayanan_eq3(gpt175b):
    training = TrainingSpec(seq_len=2048, global_batch_size=1536)
    assert hardware_flops_per_step(gpt175b, training, "full") == pytest.approx(narayanan_eq3_flops(gpt175b, training))
    # Model FLOPs exclude the recomputed forward: 3/4 of the block part.
    assert model_flops_per_step(gpt175b, training) < narayanan_eq3_flops(gpt175b, training) * 0.76


def test_tp_splits_flops_evenly():
    model = gpt_block_model(H, A)
    one = ops.block_ops(model, EAGER_FP16, ops.Shape.of(model, EAGER_FP16, ParallelPlan(micro_batch_size=B)))
    four = ops.block_ops(model, EAGER_FP16, ops.Shape.of(model, EAGER_FP16, ParallelPlan(tp=4, micro_batch_size=B)))
    assert sum(op.matmul_flops for op in four) == pytest.approx(sum(op.matmul_flops for op in one) / 4)


# -------------------------------------------------------------------------------------- cross entropy per stack


def cross_entropy_op(precision: str, cross_entropy: ops.CrossEntropy, tp: int = 1) -> ops.OpCost:
    training = TrainingSpec(seq_len=S, global_batch_size=B * 8, precision=precision)
    plan = ParallelPlan(tp=tp, micro_batch_size=B)
    shape = ops.Shape.of(gpt_block_model(), training, plan, cross_entropy=cross_entropy)
    (op,) = [op for op in ops.head_ops(gpt_block_model(), shape) if op.name == "cross_entropy"]
    return op


@pytest.mark.parametrize("tp", [1, 4])
def test_megatron_cross_entropy_passes_over_fp32_logits_once_per_step(tp):
    """Megatron-LM's vocab-parallel cross entropy in bf16: logits.float() (read 2, write 4), max (4), subtract (8),
    exp (8), sum (4), divide (8) forward; scale in place (8) and the cast back (read 4, write 2) backward; each
    tensor-parallel rank holds vocab / tp of the logits."""
    logits = S * B * 51200 / tp
    op = cross_entropy_op("bf16", ops.VOCAB_PARALLEL_CROSS_ENTROPY, tp)
    assert op.traffic_bytes == pytest.approx((6 + 4 + 8 + 8 + 4 + 8) * logits)
    assert op.backward_traffic_bytes == pytest.approx((8 + 6) * logits)
    assert (op.kernels, op.backward_kernels) == (8, 4)


def test_torch_cross_entropy_reads_each_row_three_times_and_fills_a_zero_gradient():
    """F.cross_entropy(logits.float()): the cast (6), log_softmax's three reads and one write (16) forward; the cast
    back (6), nll_loss's zero-filled gradient (4) and log_softmax's backward (two reads of it, one of the output, a
    write: 16) backward."""
    logits = S * B * 51200
    op = cross_entropy_op("bf16", ops.TORCH_CROSS_ENTROPY)
    assert op.traffic_bytes == pytest.approx(22 * logits)
    assert op.backward_traffic_bytes == pytest.approx(26 * logits)
    assert (op.kernels, op.backward_kernels) == (3, 4)


def test_fp32_logits_are_not_cast():
    logits = S * B * 51200
    assert cross_entropy_op("fp32", ops.TORCH_CROSS_ENTROPY).traffic_bytes == pytest.approx(16 * logits)
    assert cross_entropy_op("fp32", ops.VOCAB_PARALLEL_CROSS_ENTROPY).backward_traffic_bytes == pytest.approx(
        8 * logits
    )


def test_each_stack_runs_its_own_cross_entropy():
    assert MEGATRON.cross_entropy is ops.VOCAB_PARALLEL_CROSS_ENTROPY
    assert DEEPSPEED.cross_entropy is ops.VOCAB_PARALLEL_CROSS_ENTROPY_COPY
    assert FSDP.cross_entropy is PARAPLAN_CUDA.cross_entropy is PARAPLAN_CPU.cross_entropy is ops.TORCH_CROSS_ENTROPY


@pytest.mark.parametrize(
    ("cross_entropy", "precision", "working"),
    [
        # log_softmax's backward: the kept log-probabilities, nll_loss's gradient and the logits' gradient (fp32).
        (ops.TORCH_CROSS_ENTROPY, "bf16", 3 * 4 - 4),
        (ops.TORCH_CROSS_ENTROPY, "fp32", 3 * 4 - 4),
        # Megatron-Core: the fp32 copy, worked on in place, beside the 16-bit logits.
        (ops.VOCAB_PARALLEL_CROSS_ENTROPY, "bf16", 4 + 2 - 4),
        (ops.VOCAB_PARALLEL_CROSS_ENTROPY, "fp32", 0),
        # Megatron-DeepSpeed: the max subtracted into a second fp32 tensor.
        (ops.VOCAB_PARALLEL_CROSS_ENTROPY_COPY, "bf16", 2 * 4 + 2 - 4),
    ],
)
def test_the_loss_keeps_fp32_logits_and_holds_its_stacks_peak_beyond_them(cross_entropy, precision, working):
    logits = S * B * 51200
    assert cross_entropy_op(precision, cross_entropy).saved_bytes == pytest.approx(4 * logits)
    training = TrainingSpec(seq_len=S, global_batch_size=B * 8, precision=precision)
    shape = ops.Shape.of(gpt_block_model(), training, ParallelPlan(micro_batch_size=B), cross_entropy=cross_entropy)
    assert ops.head_working_bytes(gpt_block_model(), shape) == pytest.approx(working * logits)


def test_the_executors_loss_memory_matches_its_h200_profile():
    """The profiler's head on an H200 (tests/data/h200-llama3.2-1b: Llama-3.2 1B, 1-8 sequences of 1,024 and 2,048
    tokens, the executor's F.cross_entropy over fp32 logits): what it keeps is the head's analytic saved bytes plus
    the LM head weight's 16-bit cast, which autocast caches for the step (2 x hidden x vocab); what its peak holds
    beyond that is `head_working_bytes`. Both within 1%."""
    measured = [layer for layer in load_profile_json(H200 / "seq1024" / "profile.json").layers if layer.layer == "head"]
    measured += [
        layer for layer in load_profile_json(H200 / "seq2048" / "profile.json").layers if layer.layer == "head"
    ]
    model = model_preset("llama3.2-1b")
    assert len(measured) == 6
    for layer in measured:
        training = TrainingSpec(seq_len=layer.seq_len, global_batch_size=64, precision="bf16")
        plan = ParallelPlan(micro_batch_size=layer.micro_batch_size)
        shape = ops.Shape.of(model, training, plan, cross_entropy=PARAPLAN_CUDA.cross_entropy)
        cast = 2 * model.hidden_size * model.vocab_size
        saved = ops.saved_bytes(ops.head_ops(model, shape), "none") + cast
        assert saved == pytest.approx(layer.saved_bytes, rel=0.01)
        working = layer.peak_allocated_bytes - layer.saved_bytes
        assert ops.head_working_bytes(model, shape) == pytest.approx(working, rel=0.01)
