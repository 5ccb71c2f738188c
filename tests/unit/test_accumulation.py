"""Gradient accumulation's memory traffic (planner/cost/accumulation.py) against hand-computed values, per stack."""

from __future__ import annotations

import pytest

from planner import estimate
from planner.cost.accumulation import accumulation_s
from planner.cost.batch import PlanBatch
from planner.presets import gpu_preset
from planner.request import parse_estimate_request

H100 = gpu_preset("h100-sxm")
H100_BYTES_PER_S = H100.hbm_GBps * 1e9 * H100.memory_efficiency


def batch_of(framework: str, precision: str = "bf16", pp: int = 1, **plan: object) -> PlanBatch:
    """Llama-3.2 1B on 8 H100s, 64 sequences a step: dp8 at micro-batch 1 runs 8 micro-batches."""
    req = parse_estimate_request({
        "model": {"name": "llama3.2-1b"},
        "training": {"seq_len": 1024, "global_batch_size": 64, "precision": precision, "framework": framework},
        "cluster": {"gpu": "h100-sxm", "gpus_per_node": 8},
        "plan": {"dp": 8 // pp, "pp": pp, "micro_batch_size": 1, "schedule": "1f1b", **plan},
    })  # fmt: skip
    return PlanBatch.of_plan(req.model, req.training, req.cluster, req.plan, runtime=req.runtime)


def test_the_executor_adds_each_later_microbatchs_fp32_gradients():
    batch = batch_of("paraplan", zero_stage=1)
    params, m = batch.device_params()[0, 0], batch.microbatches[0, 0]
    assert m == 8
    assert accumulation_s(batch)[0, 0] == pytest.approx((m - 1) * params * 12 / H100_BYTES_PER_S)


def test_a_single_microbatch_accumulates_nothing():
    req = {"model": {"name": "llama3.2-1b"}, "training": {"seq_len": 1024, "global_batch_size": 8},
           "cluster": {"gpu": "h100-sxm", "gpus_per_node": 8}, "plan": {"dp": 8, "zero_stage": 1}}  # fmt: skip
    assert estimate(req).breakdown.accumulation_s == 0


def test_a_sharded_gradient_adds_only_the_shard():
    """ZeRO-3 outside a pipeline reduce-scatters every micro-batch: the device adds its 1/8 shard."""
    batch = batch_of("fsdp", zero_stage=3)
    params, m = batch.device_params()[0, 0], batch.microbatches[0, 0]
    assert accumulation_s(batch)[0, 0] == pytest.approx((m - 1) * params / 8 * 10 / H100_BYTES_PER_S)


def test_fsdp2_in_a_pipeline_adds_the_whole_gradient():
    batch = batch_of("fsdp", pp=2, zero_stage=3)
    params, m = batch.device_params()[0], batch.microbatches[0, 0]
    assert accumulation_s(batch)[0] == pytest.approx((m - 1) * params * 10 / H100_BYTES_PER_S)


def test_megatron_fuses_accumulation_into_the_weight_gradient_gemm():
    assert accumulation_s(batch_of("megatron", zero_stage=1))[0, 0] == 0


def test_deepspeeds_bf16_optimizer_copies_every_microbatch_and_fp16_adds_16_bit_gradients():
    bf16 = batch_of("deepspeed", zero_stage=1)
    params, m = bf16.device_params()[0, 0], bf16.microbatches[0, 0]
    assert accumulation_s(bf16)[0, 0] == pytest.approx(m * params * 18 / H100_BYTES_PER_S)
    fp16 = batch_of("deepspeed", precision="fp16", zero_stage=1)
    assert accumulation_s(fp16)[0, 0] == pytest.approx((m - 1) * params * 6 / H100_BYTES_PER_S)
