"""FSDP2's per-unit hooks on the host (planner/cost/data.py `fsdp_hooks_s`): what they add beyond the blocks' host
slack (planner/cost/compute.py `host_slack_s`), where they apply, and their place in the step, against
hand-computed values."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from planner.cost.batch import PlanBatch
from planner.cost.compute import Speeds, host_slack_s, pass_device_and_host_s, pass_s
from planner.cost.data import fsdp_hooks_s
from planner.cost.ops import OpCost
from planner.cost.runtime import DEEPSPEED, FSDP, FSDP2_UNIT_HOST_S, MEGATRON, PARAPLAN_CPU
from planner.cost.step import estimate_step
from planner.presets import gpu_preset
from planner.request import parse_estimate_request

A100 = Speeds.of(gpu_preset("a100-80gb"), "bf16", host_s_per_kernel=10e-6, host_s_per_backward_kernel=5e-6)


def request(model: str = "llama3.2-1b", dp: int = 8, mbs: int = 1, batch: int = 8, **plan: object):
    return parse_estimate_request({
        "model": {"name": model},
        "training": {"seq_len": 2048, "global_batch_size": batch, "framework": "fsdp"},
        "cluster": {"gpu": "a100-80gb", "num_nodes": 1, "gpus_per_node": 8},
        "plan": {"dp": dp, "zero_stage": 3, "micro_batch_size": mbs, **plan},
    })  # fmt: skip


def batch_of(runtime=FSDP, **kwargs: object) -> PlanBatch:
    req = request(**kwargs)
    return PlanBatch.of_plan(req.model, req.training, req.cluster, req.plan, runtime=runtime)


def test_a_device_bound_pass_has_its_device_time_beyond_the_launches_as_slack():
    # 100 GFLOP of matmul at 312 TFLOP/s x the A100 preset's efficiency (~0.5 ms), 3 launches at 10 us each.
    op = OpCost("gemm", 1e11, 0.0, 0.0, kernels=3)
    device, host = pass_device_and_host_s([op], A100)
    assert host == pytest.approx(30e-6)
    assert device == pytest.approx(1e11 / (312e12 * gpu_preset("a100-80gb").matmul_efficiency))
    assert host_slack_s((device, host)) == pytest.approx(device - 30e-6)
    assert pass_s([op], A100) == pytest.approx(device)


def test_a_host_bound_pass_has_none():
    op = OpCost("tiny", 1e3, 0.0, 0.0, kernels=40)
    assert host_slack_s(pass_device_and_host_s([op], A100)) == 0.0
    assert pass_s([op], A100) == pytest.approx(400e-6)


def test_each_block_unit_adds_its_hooks_beyond_the_slack_and_the_root_adds_all_of_its_own():
    batch = batch_of()
    forward, backward = FSDP2_UNIT_HOST_S
    slack_f, slack_b = batch.block.forward_slack_s[0, 0], batch.block.backward_slack_s[0, 0]
    per_block = max(forward - slack_f, 0.0) + max(backward - slack_b, 0.0)
    expected = 16 * per_block + forward + backward  # Llama 3.2 1B: 16 blocks, and the root
    assert fsdp_hooks_s(batch)[0, 0] == pytest.approx(expected)
    # Micro-batch 1 at 2k tokens: the forward's launches outlast its kernels, so a block's forward hooks show whole.
    assert slack_f == 0.0 and per_block >= forward


def test_a_large_micro_batch_hides_the_block_hooks_behind_the_device():
    batch = batch_of(mbs=8, batch=64)
    assert batch.block.forward_slack_s[0, 0] > FSDP2_UNIT_HOST_S[0]
    assert batch.block.backward_slack_s[0, 0] > FSDP2_UNIT_HOST_S[1]
    assert fsdp_hooks_s(batch)[0, 0] == pytest.approx(sum(FSDP2_UNIT_HOST_S))  # the root's alone


def test_a_blocks_local_experts_hook_with_it_where_each_is_a_unit():
    """Mixtral 8x7B at ep 4 on 16 ranks: two local experts a block, each its own unit over an edp group of 4
    (executor/parallel/data.py `_experts_on_edp`), so three units' hooks share each block's slack."""
    req = parse_estimate_request({
        "model": {"name": "mixtral-8x7b"},
        "training": {"seq_len": 512, "global_batch_size": 16, "framework": "fsdp"},
        "cluster": {"gpu": "h100-sxm", "num_nodes": 2, "gpus_per_node": 8},
        "plan": {"dp": 16, "ep": 4, "zero_stage": 3, "micro_batch_size": 1},
    })  # fmt: skip
    batch = PlanBatch.of_plan(req.model, req.training, req.cluster, req.plan, runtime=FSDP)
    forward, backward = FSDP2_UNIT_HOST_S
    slack_f, slack_b = batch.block.forward_slack_s[0, 0], batch.block.backward_slack_s[0, 0]
    per_block = max(3 * forward - slack_f, 0.0) + max(3 * backward - slack_b, 0.0)
    assert per_block > 0
    assert fsdp_hooks_s(batch)[0, 0] == pytest.approx(32 * per_block + forward + backward)


@pytest.mark.parametrize("runtime", [MEGATRON, DEEPSPEED, PARAPLAN_CPU])
def test_stacks_whose_hooks_are_other_code_or_measured_add_none(runtime):
    assert not fsdp_hooks_s(batch_of(runtime=runtime)).any()


def test_one_data_parallel_rank_has_no_units():
    assert not fsdp_hooks_s(batch_of(dp=1, tp=8)).any()


def test_the_hooks_add_to_compute_once_per_micro_batch():
    req = request(mbs=1, batch=32)  # 4 micro-batches a step
    with_hooks = estimate_step(req.model, req.training, req.cluster, req.plan, runtime=FSDP)
    without = estimate_step(req.model, req.training, req.cluster, req.plan, runtime=replace(FSDP,
                            fsdp_unit_host_s=(0.0, 0.0)))  # fmt: skip
    hooks = fsdp_hooks_s(batch_of(mbs=1, batch=32))[0, 0]
    added = with_hooks.breakdown.compute_s - without.breakdown.compute_s
    assert with_hooks.num_microbatches == 4 and added == pytest.approx(4 * hooks)
    assert np.isclose(with_hooks.step_time_s - without.step_time_s, added, rtol=0.05)
