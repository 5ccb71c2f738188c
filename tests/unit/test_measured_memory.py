"""Memory from a CUDA profile (planner/cost/layers.py `layer_memory`, planner/cost/runtime.py's `EXECUTOR_MEMORY`):
layers' saved and working bytes as the allocator measured them, the executor's fp32 weights under autocast,
autocast's cached weight copies under full recompute, and AdamW's step when it peaks. A CPU profile, which
measures no allocator peak, leaves memory analytic."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from planner.cost.measured import LayerTable
from planner.cost.params import block_params, model_params
from planner.cost.step import estimate_step
from planner.presets import gpu_preset
from planner.request import parse_estimate_request, profile_costs
from planner.specs import ClusterSpec, HardwareProfile, LayerMeasurement
from tests.unit.test_profile_costs import BLOCK, EMBEDDING, HEAD, MODEL, SEQ_LEN, adamw, cuda_profile, layer

PARAMS = model_params(MODEL)
# Saved and peak bytes per micro-batch of 4 sequences, by layer kind (and recompute mode for the block).
# Larger than AdamW's step temporaries (4 bytes a parameter, 6.4 MB), so forward and backward hold the peak.
SAVED = {"embedding": 0, "block": 3_000_000, "block-full": 200_000, "head": 5_000_000}
PEAK = {"embedding": 2_000_000, "block": 3_500_000, "block-full": 3_600_000, "head": 9_000_000}
TIMES = {"embedding": EMBEDDING, "block": BLOCK, "head": HEAD}


def measured(kind: str, recompute: str = "none", micro_batch_size: int = 4, peak: bool = True) -> LayerMeasurement:
    key = f"{kind}-full" if recompute == "full" else kind
    scale = micro_batch_size / 4
    peak_bytes = int(PEAK[key] * scale) if peak else None
    return layer(kind, TIMES[kind], micro_batch_size, recompute=recompute, dtype="bf16").model_copy(
        update={"saved_bytes": int(SAVED[key] * scale), "peak_allocated_bytes": peak_bytes}
    )


def h100_profile(peak: bool = True, recompute: str = "none") -> HardwareProfile:
    layers = [measured("embedding", peak=peak), measured("block", recompute, peak=peak), measured("head", peak=peak)]
    return cuda_profile("NVIDIA H100 80GB HBM3").model_copy(update={"layers": layers, "optimizer": [adamw()]})


def tiny_profile() -> HardwareProfile:
    """h100_profile with layers that keep almost nothing: AdamW's step temporaries outweigh them."""
    layers = [m.model_copy(update={"saved_bytes": 1, "peak_allocated_bytes": 2}) for m in h100_profile().layers]
    return h100_profile().model_copy(update={"layers": layers})


def stage_memory(profile: HardwareProfile, gpus: int = 1, global_batch: int = 8, **plan: Any):
    """The estimate of MODEL in bf16 on `gpus` H100s with `profile` attached, micro-batches of 4, and its first
    stage's memory."""
    request = parse_estimate_request({
        "model": MODEL.model_dump(exclude_none=True),
        "training": {"seq_len": SEQ_LEN, "global_batch_size": global_batch, "precision": "bf16"},
        "cluster": {"gpu": "h100-sxm", "num_nodes": 1, "gpus_per_node": gpus},
        "plan": {"micro_batch_size": 4} | plan,
    })  # fmt: skip
    cluster = ClusterSpec(gpu=gpu_preset("h100-sxm"), gpus_per_node=gpus)
    estimate = estimate_step(request.model, request.training, cluster, request.plan, profile_costs(cluster, profile))
    return estimate, estimate.memory.by_stage[0]


def test_activations_are_the_measured_saved_bytes_plus_the_largest_measured_working_set():
    estimate, stage = stage_memory(h100_profile())
    saved = SAVED["embedding"] + MODEL.num_layers * SAVED["block"] + SAVED["head"]
    working = max(PEAK[kind] - SAVED[kind] for kind in ("embedding", "block", "head"))  # the head's 4 MB
    assert stage.activations_bytes == pytest.approx(saved + working)
    assert estimate.sources["memory"] == "profile"


def test_weights_and_gradients_are_fp32_and_adamw_keeps_its_two_moments():
    _, stage = stage_memory(h100_profile())
    assert stage.params_bytes == pytest.approx(4 * PARAMS)
    assert stage.grads_bytes == pytest.approx(4 * PARAMS)
    assert stage.optimizer_bytes == pytest.approx(8 * PARAMS)


def test_one_micro_batch_peaks_before_any_gradient_exists():
    _, accumulating = stage_memory(h100_profile())
    _, single = stage_memory(h100_profile(), global_batch=4)
    assert single.grads_bytes == 0
    assert single.activations_bytes == pytest.approx(accumulating.activations_bytes)
    assert single.params_bytes + single.optimizer_bytes == accumulating.params_bytes + accumulating.optimizer_bytes


def test_ddp_buckets_hold_the_gradients_even_with_one_micro_batch():
    _, stage = stage_memory(h100_profile(), gpus=2, global_batch=8, dp=2)  # 4 sequences a rank
    assert stage.grads_bytes == pytest.approx(4 * PARAMS)
    _, fsdp = stage_memory(h100_profile(), gpus=2, global_batch=8, dp=2, zero_stage=2)
    assert fsdp.grads_bytes == 0  # FSDP2's gradients are freed by zero_grad like plain ones


def test_one_micro_batch_stepping_at_its_peak_counts_every_gradient():
    _, stage = stage_memory(tiny_profile(), global_batch=4)
    assert stage.activations_bytes == 0
    assert stage.grads_bytes == pytest.approx(4 * PARAMS)


def test_full_recompute_keeps_the_blocks_autocast_weight_copies():
    _, stage = stage_memory(h100_profile(recompute="full"), recompute="full")
    saved = MODEL.num_layers * SAVED["block-full"] + SAVED["head"]
    working = max(PEAK["block-full"] - SAVED["block-full"], PEAK["head"] - SAVED["head"], PEAK["embedding"])
    copies = MODEL.num_layers * 2 * block_params(MODEL).sharded  # bf16, tp 1
    assert stage.activations_bytes == pytest.approx(saved + working + copies)


def test_adamw_step_is_the_peak_when_its_temporaries_outweigh_the_activations():
    _, stage = stage_memory(tiny_profile())
    assert stage.activations_bytes == 0
    assert stage.optimizer_bytes == pytest.approx((8 + 4) * PARAMS)  # the moments and sqrt(v)


def test_zero_1_shards_the_moments_and_the_step_temporaries_but_not_the_fp32_weights():
    _, stage = stage_memory(tiny_profile(), gpus=2, dp=2, zero_stage=1)
    assert stage.params_bytes == pytest.approx(4 * PARAMS)
    assert stage.optimizer_bytes == pytest.approx((8 + 4) * PARAMS / 2)


def test_a_profile_without_allocator_peaks_leaves_memory_analytic():
    with_peaks, _ = stage_memory(h100_profile())
    without, stage = stage_memory(h100_profile(peak=False))
    analytic, analytic_stage = stage_memory(HardwareProfile(**(h100_profile().model_dump() | {"layers": []})))
    assert without.sources["memory"] == "analytic"
    assert stage == analytic_stage
    assert with_peaks.memory != without.memory


def test_layer_table_interpolates_peaks_and_keeps_nan_where_none_was_measured():
    table = LayerTable.from_measurements([measured("block", micro_batch_size=size) for size in (2, 8)])
    found = table.lookup("block", 1, 4, SEQ_LEN, "bf16", "none")
    assert found.peak_bytes == pytest.approx(PEAK["block"])  # linear: 4 is a third of the way from 2 to 8
    cpu = LayerTable.from_measurements([measured("block", micro_batch_size=2, peak=False)])
    assert np.isnan(cpu.lookup("block", 1, 2, SEQ_LEN, "bf16", "none").peak_bytes)
