"""The compute model's host floor and matmul roofline (planner/cost/compute.py), against hand-computed values."""

from __future__ import annotations

import pytest

from planner.cost.compute import Speeds, backward_s, forward_s, pass_s, recompute_s
from planner.cost.ops import OpCost, Shape, _linear
from planner.presets import gpu_preset

# 100 TFLOP/s of matmuls, 1 TB/s of HBM, 50 us per kernel launch in forward, 30 us in backward.
SPEEDS = Speeds(matmul_flops_per_s=100e12, memory_bytes_per_s=1e12, host_s_per_kernel=50e-6,
                host_s_per_backward_kernel=30e-6)  # fmt: skip


def gemm(flops: float, io_bytes: float = 0.0) -> OpCost:
    return OpCost("gemm", flops, 0.0, 0.0, kernels=1, backward_kernels=2, matmul_io_bytes=io_bytes)


def elementwise(traffic_bytes: float) -> OpCost:
    return OpCost("add", 0.0, 0.0, traffic_bytes, kernels=1, backward_kernels=1)


def test_a_large_pass_runs_at_the_device_speed():
    """1 TFLOP of GEMM (10 ms) and 1 GB of traffic (1 ms) outlast two launches (0.1 ms)."""
    ops = [gemm(1e12), elementwise(1e9)]
    assert pass_s(ops, SPEEDS) == pytest.approx(10e-3 + 1e-3)
    # Backward: 2x the GEMM's FLOPs (20 ms) and 1.5x the traffic (1.5 ms); three launches, still hidden.
    assert pass_s(ops, SPEEDS, backward=True) == pytest.approx(20e-3 + 1.5e-3)


def test_a_small_pass_waits_for_the_host():
    """1 GFLOP (10 us) and 1 MB (1 us) of work, but two launches of 50 us each: the host's 100 us. Backward's
    three launches (dgrad, wgrad, the element-wise one) come from autograd's engine, at 30 us each."""
    ops = [gemm(1e9), elementwise(1e6)]
    assert sum(forward_s(op, SPEEDS) for op in ops) == pytest.approx(11e-6)
    assert pass_s(ops, SPEEDS) == pytest.approx(2 * 50e-6)
    assert pass_s(ops, SPEEDS, backward=True) == pytest.approx(3 * 30e-6)


def test_recompute_is_a_forward_pass_with_its_floor():
    """The model's Python runs the recomputed forward inside backward: forward's host time per launch."""
    ops = [gemm(1e9), elementwise(1e6)]
    assert recompute_s(ops, "full", SPEEDS) == pytest.approx(100e-6)
    assert recompute_s(ops, "none", SPEEDS) == 0.0


def test_no_floor_without_a_host_cost():
    ops = [gemm(1e9), elementwise(1e6)]
    assert pass_s(ops, Speeds(100e12, 1e12)) == pytest.approx(11e-6)


def test_a_thin_gemm_is_bound_by_its_operands():
    """1 GFLOP (10 us of math) reading and writing 100 MB (100 us at 1 TB/s): memory-bound, in both directions."""
    op = gemm(1e9, io_bytes=100e6)
    assert forward_s(op, SPEEDS) == pytest.approx(100e-6)
    assert backward_s(op, SPEEDS) == pytest.approx(200e-6)
    assert forward_s(gemm(1e12, io_bytes=100e6), SPEEDS) == pytest.approx(10e-3)  # compute-bound


def test_linear_layers_count_their_operands():
    """A column-parallel linear of 2048 tokens, 1024 -> 3072 over tp=2 in 16 bits: input 2048 x 1024, weight
    shard 1024 x 1536, output 2048 x 1536."""

    shape = Shape(tokens=2048, seq=2048, key_len=2048, heads=8, tp=2, sp_div=1, elem=2, mask=1)
    op = _linear("qkv", shape, 1024, 3072, "sp")
    assert op.matmul_io_bytes == 2 * (2048 * 1024 + 1024 * 1536 + 2048 * 1536)
    assert (op.kernels, op.backward_kernels) == (1, 2)
    row = _linear("out", shape, 3072, 1024, "tp")  # row-parallel: the input is split, the output whole
    assert row.matmul_io_bytes == 2 * (2048 * 1536 + 1536 * 1024 + 2048 * 1024)


def test_fused_attention_runs_at_its_own_rate():
    """A causal flash op of 2 TFLOP (half of it computed) at 35 TFLOP/s of attention: 1e12 / 35e12 s forward and
    2.5x that backward (FlashAttention-2's five matmuls to two), whatever the GEMM rate."""
    flash = OpCost("flash", 2e12, 0.0, 0.0, attention_core=True, flash=True)
    speeds = Speeds(matmul_flops_per_s=100e12, memory_bytes_per_s=1e12, attention_flops_per_s=35e12)
    assert forward_s(flash, speeds) == pytest.approx(1e12 / 35e12)
    assert backward_s(flash, speeds) == pytest.approx(2.5e12 / 35e12)
    assert forward_s(flash, Speeds(100e12, 1e12)) == pytest.approx(1e12 / 100e12)  # no figure: the GEMM rate


def test_hopper_presets_take_flash_attention_2s_published_utilisation():
    """FlashAttention-2: 50-73% of the A100's peak (Dao 2023), 35% of the H100's (Shah et al. 2024)."""
    assert Speeds.of(gpu_preset("h100-sxm"), "bf16").flash_flops_per_s == pytest.approx(0.35 * 989.4e12)
    assert 0.50 <= gpu_preset("a100-80gb").attention_efficiency <= 0.73
    assert gpu_preset("mi300x").attention_efficiency is None
