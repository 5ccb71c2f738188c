"""GEMM wave quantization, eager attention's memory-bound products and fused attention's occupancy
(planner/cost/compute.py, ops.py), against hand-computed values. Tiles are 256 x 128 output elements, one per SM
(NVIDIA's Matrix Multiplication Background User's Guide, "Wave Quantization"); fused attention's blocks 128 query
(or key) rows of one sequence and head (FlashAttention-2)."""

from __future__ import annotations

import pytest

from planner.cost.compute import Speeds, backward_s, flash_occupancy, forward_s, matmul_work_s, wave_efficiency
from planner.cost.ops import Gemm, OpCost, Shape, _eager_core, _linear, block_ops, mlp_ops, recomputed_ops
from planner.presets import MODEL_PRESETS, gpu_preset
from planner.specs import ModelSpec, TrainingSpec

A100_SMS = 108
# 100 TFLOP/s of matmuls, 1 TB/s of HBM, no host floor, an A100's SMs.
SPEEDS = Speeds(matmul_flops_per_s=100e12, memory_bytes_per_s=1e12, sm_count=A100_SMS)


def test_a_full_last_wave_loses_nothing():
    """27648 x 128: 108 tiles of 256 x 128, one wave of all 108 SMs; twice that, two full waves."""
    assert wave_efficiency(27648, 128, 1, A100_SMS) == pytest.approx(1.0)
    assert wave_efficiency(27648, 256, 1, A100_SMS) == pytest.approx(1.0)


def test_a_partial_last_wave_idles_its_sms():
    """2048 x 2304: 8 x 18 = 144 tiles, two waves of 108 slots, 144 / 216 busy; one tile: 1 of 108 SMs."""
    assert wave_efficiency(2048, 2304, 1, A100_SMS) == pytest.approx(144 / 216)
    assert wave_efficiency(256, 128, 1, A100_SMS) == pytest.approx(1 / 108)
    # A ragged edge still takes a whole tile: 2049 rows are 9 row tiles (9 x 18 = 162 of 216).
    assert wave_efficiency(2049, 2304, 1, A100_SMS) == pytest.approx(162 / 216)


def test_batched_products_count_every_products_tiles():
    """64 products of 2048 x 2048: 64 x 8 x 16 = 8192 tiles, 76 waves (8208 slots)."""
    assert wave_efficiency(2048, 2048, 64, A100_SMS) == pytest.approx(8192 / (76 * 108))


def gemm_op(rows: int, cols: int, inner: int) -> OpCost:
    return OpCost("gemm", 2.0 * rows * cols * inner, 0.0, 0.0, gemm=Gemm(rows=rows, cols=cols, inner=inner))


def test_forward_and_input_gradient_run_at_their_waves_the_weight_gradient_fills_the_sms():
    """2048 tokens, 6144 -> 2304: 58 GFLOP a product. Forward output 2048 x 2304 (144 tiles, 2/3 busy): 0.58 ms
    x 1.5; input gradient 2048 x 6144 (8 x 48 = 384 tiles, 4 waves of 108: 384 / 432); weight gradient at full
    rate (split over its 2048-token reduction)."""
    op = gemm_op(2048, 2304, 6144)
    product_s = 2.0 * 2048 * 2304 * 6144 / 100e12
    assert forward_s(op, SPEEDS) == pytest.approx(product_s * 216 / 144)
    assert backward_s(op, SPEEDS) == pytest.approx(product_s * 432 / 384 + product_s)
    # matmul_work_s (what the A100 calibration fits) charges the same waves: forward, input and weight gradients.
    assert matmul_work_s([op], "none", 100e12, A100_SMS) == pytest.approx(product_s * (216 / 144 + 432 / 384 + 1))
    # Full recompute repeats the forward, waves included.
    assert matmul_work_s([op], "full", 100e12, A100_SMS) == pytest.approx(product_s * (2 * 216 / 144 + 432 / 384 + 1))


def test_no_sm_count_means_no_quantization():
    op = gemm_op(2048, 2304, 6144)
    flat = Speeds(matmul_flops_per_s=100e12, memory_bytes_per_s=1e12)
    assert forward_s(op, flat) == pytest.approx(op.matmul_flops / 100e12)
    assert backward_s(op, flat) == pytest.approx(2 * op.matmul_flops / 100e12)


def test_linear_layers_carry_their_gemm_shape():
    """A column-parallel 1024 -> 3072 linear over tp=2 on 4096 tokens: 4096 x 1536 outputs from 1024 inputs; the
    row-parallel one reads its tp share of the inputs."""
    shape = Shape(tokens=4096, seq=2048, key_len=2048, heads=8, tp=2, sp_div=1, elem=2, mask=1)
    assert _linear("qkv", shape, 1024, 3072, "sp").gemm == Gemm(rows=4096, cols=1536, inner=1024)
    assert _linear("out", shape, 3072, 1024, "tp").gemm == Gemm(rows=4096, cols=1024, inner=1536)


def test_presets_name_their_sms():
    """Datasheet / whitepaper SM counts: A100 108, H100 SXM 132, H200 132 (the same GH100)."""
    assert gpu_preset("a100-80gb").sm_count == 108
    assert gpu_preset("h100-sxm").sm_count == 132
    assert gpu_preset("h200").sm_count == 132
    assert gpu_preset("cpu").sm_count is None


GPT_H1024 = ModelSpec(
    num_layers=1, hidden_size=1024, num_attention_heads=16, vocab_size=50257, mlp="gelu", norm="layernorm",
    position_embedding="learned", max_position_embeddings=2048, dropout=0.1,
)  # fmt: skip


def test_eager_attention_products_move_the_scores():
    """One sequence of 2048, 16 heads of 64, fp16, tp=1. QK^T reads Q and K (2 x 2048 x 1024) and writes
    16 x 2048 x 2048 scores; softmax(.)V reads those and V and writes the context (2 x 2048 x 1024)."""
    shape = Shape(tokens=2048, seq=2048, key_len=2048, heads=16, tp=1, sp_div=1, elem=2, mask=1)
    core = {op.name: op for op in _eager_core(GPT_H1024, shape)}
    scores, activations = 16 * 2048 * 2048, 2 * 2048 * 1024
    assert core["scores"].matmul_io_bytes == 2 * (scores + activations)
    assert core["attn_values"].matmul_io_bytes == 2 * (scores + activations)
    assert core["scores"].gemm == Gemm(rows=2048, cols=2048, inner=64, batch=16)
    assert core["attn_values"].gemm == Gemm(rows=2048, cols=64, inner=2048, batch=16)
    # 4.3 GFLOP (43 us at 100 TFLOP/s) against 142.6 MB (143 us at 1 TB/s): bound by the traffic.
    assert forward_s(core["scores"], SPEEDS) == pytest.approx(2 * (scores + activations) / 1e12)
    # Batched products are not linear layers: an op-level policy recomputes them whole.
    assert not core["scores"].linear and not core["attn_values"].linear
    recomputed = {op.name: op for op in recomputed_ops(list(core.values()), "selective", "op_level")}
    assert recomputed["scores"].matmul_flops == core["scores"].matmul_flops


def test_a_token_routed_to_k_experts_runs_k_times_the_rows():
    """Top-2 routing: the expert MLPs' products take twice the tokens in all (grouped over the experts), so their
    GEMM has 2 x 4096 rows, as their FLOPs are twice a dense MLP's."""
    moe = GPT_H1024.model_copy(update={"num_experts": 8, "experts_per_token": 2})
    shape = Shape(tokens=4096, seq=2048, key_len=2048, heads=16, tp=1, sp_div=1, elem=2, mask=1)
    fc1 = {op.name: op for op in mlp_ops(moe, shape)}["fc1"]
    assert fc1.gemm == Gemm(rows=2 * 4096, cols=4096, inner=1024)
    assert fc1.matmul_flops == 2 * (2 * 4096 * 1024 * 4096)


# ------------------------------------------------------------------------------------- fused attention


def flash_op(shape: Shape, model: ModelSpec) -> OpCost:
    return next(op for op in block_ops(model, TrainingSpec(seq_len=int(shape.key_len), global_batch_size=1), shape)
                if op.flash)  # fmt: skip


def test_fused_attention_with_few_blocks_waits_for_its_longest_block():
    """Llama 3 8B's attention at tp 8 (4 heads a GPU), micro-batch 1, 2048 tokens: 4 x 2048 / 128 = 64 blocks of
    128 queries on 108 SMs. The last block of the causal mask takes all 2048 keys, so the pass takes one SM's time
    for it while the causal half of the work spread over all SMs would take a quarter of that: 0.5 x 64 / 108."""
    model = ModelSpec.model_validate(MODEL_PRESETS["llama3-8b"].model_dump())
    shape = Shape(tokens=2048, seq=2048, key_len=2048, heads=4, tp=8, sp_div=1, elem=2, mask=0)
    op = flash_op(shape, model)
    assert op.gemm == Gemm(rows=2048, cols=128, inner=2048, batch=4)
    assert flash_occupancy(op.gemm, A100_SMS) == pytest.approx(0.5 * 64 / 108)
    flash = Speeds(matmul_flops_per_s=100e12, memory_bytes_per_s=1e12, attention_flops_per_s=50e12, sm_count=108)
    causal_s = op.matmul_flops * 0.5 / 50e12
    assert forward_s(op, flash) == pytest.approx(causal_s * 108 / 32)
    assert backward_s(op, flash) == pytest.approx(2.5 * causal_s * 108 / 32)
    assert matmul_work_s([op], "none", 50e12, A100_SMS) == pytest.approx(3.5 * causal_s * 108 / 32)


def test_fused_attention_with_enough_blocks_fills_the_sms():
    """Micro-batch 4 at 8192 tokens and 32 heads: 4 x 32 x 64 = 8192 blocks, far over twice the SMs; and a
    sequence shorter than a block (64 queries) counts as one block of its own length."""
    assert flash_occupancy(Gemm(rows=8192, cols=128, inner=8192, batch=128), A100_SMS) == 1.0
    assert flash_occupancy(Gemm(rows=64, cols=128, inner=64, batch=54), A100_SMS) == pytest.approx(0.5 * 54 / 108)
    assert flash_occupancy(Gemm(rows=8192, cols=128, inner=8192, batch=1), None) == 1.0


def test_the_op_level_policy_recomputes_the_even_numbered_matmuls():
    """torchtitan counts a block's aten.mm calls in forward order and recomputes the 2nd, 4th and 6th: of Llama-3
    8B's wq 4096 | wk 1024 | wv 1024 (one qkv op here), wo, w1 14336 | w3 14336 (one op), w2, it recomputes wk
    (1024 / 6144 of the qkv op's FLOPs), wo whole, w3 (half of w1 | w3), and not w2."""
    model = ModelSpec.model_validate(MODEL_PRESETS["llama3-8b"].model_dump())
    shape = Shape(tokens=8192, seq=8192, key_len=8192, heads=32, tp=1, sp_div=1, elem=2, mask=0)
    block = block_ops(model, TrainingSpec(seq_len=8192, global_batch_size=1), shape)
    forward = {op.name: op.matmul_flops for op in block if op.linear}
    repeated = {op.name: op.matmul_flops for op in recomputed_ops(block, "selective", "op_level") if op.linear}
    assert repeated == pytest.approx(
        {
            "qkv_proj": forward["qkv_proj"] * 1024 / 6144,
            "out_proj": forward["out_proj"],
            "fc1_fc3": forward["fc1_fc3"] / 2,
        }  # fmt: skip
    )
