"""What each stack's model code moves through HBM beyond the GEMMs: RoPE as its implementation runs it, and the
executor's autocast casts of fp32 weights (planner/cost/ops.py `Rotary`, `_weight_casts`), by hand."""

from __future__ import annotations

import pytest

from planner.cost import ops
from planner.cost.compute import Speeds, backward_s, forward_s
from planner.cost.runtime import ANALYTIC, DEEPSPEED, FSDP, MEGATRON, PARAPLAN_CPU
from planner.presets import gpu_preset, model_preset
from planner.specs import ParallelPlan, TrainingSpec

LLAMA_1B = model_preset("llama3.2-1b")  # q 2,048 and k 512 wide; 60.8M weights in a block's linear layers
TOKENS = 8 * 1024


@pytest.mark.parametrize(
    "rotary, elem, expected",
    [
        # executor/models/layers.py: x.float() (read 2, write 4), x*cos, -half, cat, *sin, + in fp32
        # (8 + 4 + 8 + 8 + 12 = 40), .type_as(x) (read 4, write 2).
        (ops.ROTATE_HALF_FP32, 2, 6 + 40 + 6),
        (ops.ROTATE_HALF_FP32, 4, 40),  # fp32 training: no casts
        (ops.COMPLEX_FP32, 2, 6 + 8 + 6),  # torchtitan: .float(), one complex product, .type_as
        (ops.ROTATE_HALF, 2, 20),  # HF / Megatron-DeepSpeed, in bf16: 10 passes of 2 bytes
        (ops.FUSED_ROTARY, 2, 4),  # TransformerEngine's fused kernel: read and write once
    ],
)
def test_rotary_bytes_per_element(rotary, elem, expected):
    assert rotary.bytes_per_element(elem) == expected


def block(runtime, precision="bf16", tp=1):
    training = TrainingSpec(seq_len=1024, global_batch_size=8, precision=precision)
    shape = ops.Shape.of(
        LLAMA_1B, training, ParallelPlan(tp=tp, micro_batch_size=8), rotary=runtime.rotary,
        weight_cast_bytes=runtime.weight_cast_bytes(precision), fused_rms_norm=runtime.fused_rms_norm,
    )  # fmt: skip
    return {op.name: op for op in ops.block_ops(LLAMA_1B, training, shape)}


def test_executor_rotary_moves_52_bytes_per_q_and_k_element_each_way():
    rotary = block(ANALYTIC)["rotary"]
    assert rotary.traffic_bytes == 52 * TOKENS * (2048 + 512)
    assert rotary.backward_traffic_bytes == rotary.traffic_bytes
    assert (rotary.kernels, rotary.backward_kernels) == (14, 16)
    speeds = Speeds.of(gpu_preset("h200"), "bf16")
    # 1.09 GB at 4.8 TB/s x 0.88: 0.26 ms forward, as much backward (not 1.5x: the gradient mirrors the products).
    assert forward_s(rotary, speeds) == pytest.approx(1.09e9 / (4800e9 * 0.88), rel=0.01)
    assert backward_s(rotary, speeds) == pytest.approx(forward_s(rotary, speeds))


def test_tp_splits_the_rotated_heads():
    assert block(FSDP, tp=2)["rotary"].traffic_bytes == 20 * TOKENS * (2048 + 512) / 2


@pytest.mark.parametrize("runtime, per_element", [(MEGATRON, 4), (DEEPSPEED, 20), (FSDP, 20), (ANALYTIC, 52)])
def test_each_stack_rotates_as_its_code_does(runtime, per_element):
    assert block(runtime)["rotary"].traffic_bytes == per_element * TOKENS * (2048 + 512)


def test_autocast_casts_every_linear_weight_each_way():
    weights = 2048 * (2048 + 2 * 512) + 2048 * 2048 + 3 * 2048 * 8192  # qkv, out, gate + up, down: 60.8M
    casts = block(ANALYTIC)["autocast_casts"]
    assert casts.traffic_bytes == casts.backward_traffic_bytes == (4 + 2) * weights
    assert (casts.kernels, casts.backward_kernels) == (4, 4)
    assert block(ANALYTIC, tp=2)["autocast_casts"].traffic_bytes == 6 * weights / 2


@pytest.mark.parametrize("runtime, precision", [(MEGATRON, "bf16"), (DEEPSPEED, "bf16"), (FSDP, "bf16"),
                                                (PARAPLAN_CPU, "fp32"), (ANALYTIC, "fp32")])  # fmt: skip
def test_no_casts_where_weights_are_16_bit_or_training_is_fp32(runtime, precision):
    assert "autocast_casts" not in block(runtime, precision)


@pytest.mark.parametrize("elem, forward, backward", [(2, 40, 88), (4, 28, 76)])
def test_eager_rms_norm_moves_its_decomposition(elem, forward, backward):
    """ATen's composite rms_norm in bf16: upcast (2 + 4), pow (8), mean (4), x * rsqrt (8), * weight (8), cast back
    (4 + 2) = 40; backward the cast (6), the weight's product and its reduced gradient (24), rsqrt's product and
    its reduced gradient (24), mean (4), pow (12), x's two paths added (12), the cast (6) = 88. fp32 has no casts."""
    assert ops._eager_rms_norm_traffic(elem) == (forward, backward)


def test_only_stacks_without_a_fused_rms_norm_decompose_it():
    elems = TOKENS * 2048
    eager, fused = block(FSDP)["attn_norm"], block(MEGATRON)["attn_norm"]
    assert (eager.traffic_bytes, eager.backward_traffic_bytes) == (40 * elems, 88 * elems)
    assert (eager.kernels, eager.backward_kernels) == (7, 12)
    assert eager.saved_bytes == 8 * elems + 4 * TOKENS  # fp32 x and fp32 normalised x, and 1/rms a token
    assert (fused.traffic_bytes, fused.backward_traffic_bytes) == (4 * elems, None)
    assert block(ANALYTIC)["attn_norm"].traffic_bytes == 4 * elems  # the executor: torch's fused CUDA kernel


def test_autocast_casts_only_the_experts_a_rank_holds():
    """Mixtral 8x7B at ep 4: attention and router whole, 2 of the 8 experts' three 4,096 x 14,336 matrices."""
    mixtral = model_preset("mixtral-8x7b")
    training = TrainingSpec(seq_len=1024, global_batch_size=8, precision="bf16")
    shape = ops.Shape.of(mixtral, training, ParallelPlan(ep=4, dp=4, micro_batch_size=1), weight_cast_bytes=6)
    casts = {op.name: op for op in ops.block_ops(mixtral, training, shape)}["autocast_casts"]
    attention = 4096 * (4096 + 2 * 1024) + 4096 * 4096
    router = 4096 * 8
    assert casts.traffic_bytes == 6 * (attention + router + 2 * 3 * 4096 * 14336)
