"""Data parallelism's collectives and their exposure (planner/cost/data.py): fully sharded (ZeRO-3 / FSDP) gathers
and reduce-scatters per unit or per tensor, per micro-batch, against hand-computed values."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest

from planner.cost import data
from planner.cost.batch import PlanBatch
from planner.cost.params import block_params, block_tensors, embedding_tensors, head_tensors
from planner.cost.runtime import (
    ANALYTIC,
    DEEPSPEED,
    EVERY_STAGE_OVERLAPS,
    FSDP,
    OVERLAPPED_COLLECTIVE_HIDDEN_SHARE,
    PARAPLAN_CPU,
)
from planner.presets import model_preset
from planner.request import parse_estimate_request
from planner.units import MiB

A100_NVLINK_BUSBW = 300e9 * 0.77
A100_NETWORK_BUSBW = 25e9 * 0.86


def batch_of(
    model: str = "gpt3-1.7b", runtime=FSDP, nodes: int = 2, batch: int = 64, precision: str = "bf16", **plan: object
) -> PlanBatch:
    req = parse_estimate_request({
        "model": {"name": model},
        "training": {"seq_len": 2048, "global_batch_size": batch, "precision": precision},
        "cluster": {"gpu": "a100-80gb", "num_nodes": nodes, "gpus_per_node": 8},
        "plan": {"tp": 1, "pp": 1, "zero_stage": 3, "micro_batch_size": 1, **plan},
    })  # fmt: skip
    return PlanBatch.of_plan(req.model, req.training, req.cluster, req.plan, runtime=runtime)


def test_megatron_layout_tensor_counts():
    # GPT-3: two LayerNorms (weight, bias), fused QKV + bias, output + bias, two MLP matrices + biases.
    assert block_tensors(model_preset("gpt3-175b")) == 12
    # Llama: two RMSNorm weights, fused QKV, output, fused gate/up, down; no biases.
    assert block_tensors(model_preset("llama3-8b")) == 6
    assert block_tensors(model_preset("qwen2.5-7b")) == 7  # + the QKV bias
    gpt, llama = model_preset("gpt3-175b"), model_preset("llama3-8b")
    assert (embedding_tensors(gpt), head_tensors(gpt)) == (2, 2)  # word + positions; final norm, tied head
    assert (embedding_tensors(llama), head_tensors(llama)) == (1, 2)  # rotary; final norm + untied head


def test_a_zero3_block_gathers_bf16_and_reduce_scatters_fp32_on_its_ring():
    # 16 ranks on 2 nodes: 15 ring steps, one between the nodes; 8 GPUs per node share 8 NICs.
    batch = batch_of(nodes=2)
    block = block_params(batch.model).total
    n, step = 16, (14 * 3.4e-6 + 1 * 14e-6) / 15
    busbw = min(A100_NVLINK_BUSBW, 8 * A100_NETWORK_BUSBW)
    latency = 20e-6 + (n - 2) * step
    sharded = data.sharded_collectives(batch)
    assert sharded.block_gather_s[0, 0] == pytest.approx(latency + 15 / 16 * block * 2 / busbw)  # bf16 param_dtype
    assert sharded.block_scatter_s[0, 0] == pytest.approx(latency + 15 / 16 * block * 4 / busbw)  # fp32 reduce_dtype


@pytest.mark.parametrize("runtime", [FSDP, DEEPSPEED])
def test_zero3_gathers_twice_and_reduce_scatters_once_per_microbatch_with_or_without_recompute(runtime):
    for recompute in ("none", "full"):
        batch = batch_of(runtime=runtime, recompute=recompute)
        sharded = data.sharded_collectives(batch)
        one_pass = sharded.gather_s(batch.blocks), sharded.scatter_s(batch.blocks)
        m = batch.microbatches[0, 0]
        assert m == 4
        assert data.dp_during_backward_s(batch)[0, 0] == pytest.approx(m * (2 * one_pass[0] + one_pass[1])[0, 0])
    no_recompute, full = (data.dp_during_backward_s(batch_of(runtime=runtime, recompute=r)) for r in ("none", "full"))
    assert no_recompute == pytest.approx(full)


def test_deepspeed_issues_one_collective_per_tensor_at_its_fitted_bandwidth():
    fsdp_like = replace(DEEPSPEED, zero3_collective_per_tensor=False, zero3_bandwidth_efficiency=1.0)
    per_unit = data.sharded_collectives(batch_of(runtime=fsdp_like))
    batch = batch_of(runtime=DEEPSPEED)
    per_tensor = data.sharded_collectives(batch)
    latency = 20e-6 + 14 * (14 * 3.4e-6 + 14e-6) / 15
    bandwidth_term = per_unit.block_gather_s - latency
    efficiency = DEEPSPEED.zero3_bandwidth_efficiency
    assert per_tensor.block_gather_s[0, 0] == pytest.approx(12 * latency + bandwidth_term[0, 0] / efficiency)
    # Meetings: the loss mean, then per micro-batch two gathers and a reduce-scatter of every tensor.
    tensors = 24 * 12 + 2 + 2
    expected = DEEPSPEED.dp_step_reductions + 3 * 4 * tensors
    assert data.dp_meetings(batch)[0, 0] == expected


def contended(least_shown: float, hideable: float, share: float = OVERLAPPED_COLLECTIVE_HIDDEN_SHARE) -> float:
    """What shows of `hideable` collective seconds when `least_shown` of them cannot hide and the rest overlaps
    compute, which loses 1 - `share` of the overlapped time to the collectives (Runtime.overlap_hidden_share)."""
    return least_shown + (1 - share) * (hideable - least_shown)


def test_overlapped_gpu_collectives_cost_the_compute_beside_them_a_share_of_their_time():
    """NCCL's kernels take SMs and memory bandwidth from the compute they overlap, 18.9% of their time on average
    (Lee et al. 2025): what hides behind compute still costs that share. Where the stack's share is 1 (paraplan on
    CPUs without a profile) all that can hide does."""
    batch = batch_of(runtime=FSDP, nodes=2)
    hideable, least = data.dp_during_backward_s(batch)[0, 0], data.sharded_exposed_s(batch)[0, 0]
    assert least < hideable
    assert data.dp_comm_exposed_s(batch)[0, 0] == pytest.approx(least + 0.189 * (hideable - least))
    assert PARAPLAN_CPU.overlap_hidden_share == 1.0
    whole = batch_of(runtime=replace(FSDP, overlap_hidden_share=PARAPLAN_CPU.overlap_hidden_share), nodes=2)
    assert data.dp_comm_exposed_s(whole)[0, 0] == pytest.approx(least)


def test_prefetching_hides_a_units_collectives_behind_its_neighbours_compute():
    batch = batch_of(runtime=FSDP, nodes=2)
    sharded = data.sharded_collectives(batch)
    m, blocks = batch.microbatches[0, 0], batch.blocks[0, 0]
    forward = batch.block.forward_s[0, 0]
    backward = batch.block.backward_s[0, 0] + batch.block.recompute_s[0, 0]
    gather, scatter = sharded.block_gather_s[0, 0], sharded.block_scatter_s[0, 0]
    per_block = max(gather - forward, 0) + max(gather + scatter - backward, 0)
    root = 2 * sharded.root_gather_s[0, 0] + sharded.root_scatter_s[0, 0]
    assert data.sharded_exposed_s(batch)[0, 0] == pytest.approx(m * (blocks * per_block + root))
    hideable = data.dp_during_backward_s(batch)[0, 0]
    assert data.dp_comm_exposed_s(batch)[0, 0] == pytest.approx(contended(m * (blocks * per_block + root), hideable))
    assert data.dp_comm_exposed_s(batch)[0, 0] < hideable


def test_a_unit_whose_collectives_outlast_its_compute_shows_the_difference():
    # 1536 ranks of GPT-3 175B, one sequence each: a block's 3.6 GB and milliseconds of ring latency per collective
    # outlast its backward.
    batch = batch_of(model="gpt3-175b", runtime=FSDP, nodes=192, batch=1536)
    sharded = data.sharded_collectives(batch)
    gather, scatter = sharded.block_gather_s[0, 0], sharded.block_scatter_s[0, 0]
    forward = batch.block.forward_s[0, 0]
    backward = batch.block.backward_s[0, 0] + batch.block.recompute_s[0, 0]
    assert gather + scatter > backward
    shown = batch.blocks[0, 0] * (max(gather - forward, 0) + gather + scatter - backward)
    root = 2 * sharded.root_gather_s[0, 0] + sharded.root_scatter_s[0, 0]
    assert batch.microbatches[0, 0] == 1
    hideable = data.dp_during_backward_s(batch)[0, 0]
    assert data.dp_comm_exposed_s(batch)[0, 0] == pytest.approx(contended(shown + root, hideable))


def test_deepspeed_zero3_synchronizes_around_its_gathers_so_none_hides():
    batch = batch_of(runtime=DEEPSPEED)
    assert data.dp_comm_exposed_s(batch) == pytest.approx(data.dp_during_backward_s(batch))
    overlapping = batch_of(runtime=replace(DEEPSPEED, zero3_prefetch_overlap=True))
    assert np.all(data.dp_comm_exposed_s(overlapping) < data.dp_during_backward_s(overlapping))


def bucketed_exposed_s(batch: PlanBatch) -> float:
    """What DDP-style bucketed reduction shows when it overlaps the last micro-batch's backward (data.py): the
    reduction beyond that backward, and never less than the last layer's bucket."""
    hideable = data.dp_during_backward_s(batch)[0, 0]
    last_backward = batch.per_device("backward_s")[0, 0] + batch.per_device("recompute_s")[0, 0]
    return max(hideable - last_backward, hideable / batch.layers_on_device()[0, 0])


@pytest.mark.parametrize(
    ("zero", "precision", "pp", "why"),
    [
        (0, "bf16", 1, "no ZeRO: the engine all-reduces in its backward epilogue"),
        (1, "bf16", 1, "bf16 ZeRO-1 runs BF16_Optimizer, which reduces after backward"),
        (1, "fp16", 2, "the PipelineEngine reduces after the pipeline's flush"),
    ],
)
def test_deepspeed_reduces_after_backward_where_its_engine_does(zero, precision, pp, why):
    plan = {"zero_stage": zero, "pp": pp, "overlap_grad_reduce": True}
    deepspeed = batch_of(runtime=DEEPSPEED, nodes=4, precision=precision, **plan)
    assert not deepspeed.runtime.reduction_overlaps(deepspeed.zero_stage, pp, precision).any(), why
    everything = data.dp_during_backward_s(deepspeed) + data.dp_after_step_s(deepspeed)
    assert data.dp_comm_exposed_s(deepspeed) == pytest.approx(everything)
    # The same plan on a stack that overlaps hides all but the last bucket (and ZeRO-1's gather after the step).
    overlapping = replace(deepspeed, runtime=replace(DEEPSPEED, overlapped_reduction_stages=EVERY_STAGE_OVERLAPS,
                                                     pipeline_reduces_after_flush=False))  # fmt: skip
    hideable = data.dp_during_backward_s(overlapping)[0, 0]
    shown = contended(bucketed_exposed_s(overlapping), hideable) + data.dp_after_step_s(overlapping)[0, 0]
    assert data.dp_comm_exposed_s(overlapping)[0, 0] == pytest.approx(shown)
    assert shown < everything[0, 0]


def test_deepspeed_zero1_in_fp16_and_zero2_overlap_with_overlap_comm():
    for zero, precision in ((1, "fp16"), (2, "bf16")):
        assert DEEPSPEED.reduction_overlaps(np.array([[zero]]), 1, precision).all()
        assert not DEEPSPEED.reduction_overlaps(np.array([[zero]]), 2, precision).any()
    assert FSDP.reduction_overlaps(np.array([[0], [1], [2], [3]]), 4, "bf16").all()


# Mixtral 8x7B and its dense sibling Mistral 7B (planner/presets.py): the same attention, norms and edges; one
# SwiGLU MLP of 3 x 4096 x 14336 in Mistral, eight expert MLPs and a router (4096 x 8) in Mixtral.
ATTENTION_AND_NORMS = 4096 * 6144 + 4096 * 4096 + 2 * 4096
EDGES = 2 * 32000 * 4096 + 4096  # embedding, LM head, final norm
MIXTRAL_DENSE = 32 * (ATTENTION_AND_NORMS + 4096 * 8) + EDGES
MISTRAL = 32 * (ATTENTION_AND_NORMS + 3 * 4096 * 14336) + EDGES


def ddp_buckets_of(params: int) -> int:
    """The executor's DDP buckets of fp32 gradients (ANALYTIC's partial_gradient_bytes): 1 MiB, then 25 MiB each."""
    return 1 + math.ceil((params * 4 - MiB) / (25 * MiB))


def moe_batch(model: str = "mixtral-8x7b", runtime=ANALYTIC, **plan) -> PlanBatch:
    """One node of 8 A100s, dp8, 64 sequences of 2048: 8 micro-batches of 1."""
    return batch_of(model=model, runtime=runtime, nodes=1, batch=64, dp=8, **plan)


@pytest.mark.parametrize(("ep", "expert_meetings"), [(4, 1), (8, 0)])
def test_ddp_meets_once_more_for_the_experts_own_all_reduce_over_edp(ep, expert_meetings):
    """ZeRO-0, pure dp: DDP, told to ignore the experts, buckets the dense gradients only; `ExpertGradReduction`
    (executor/parallel/expert.py) all-reduces the rank's expert gradients flattened into one tensor over edp = 8 / ep
    ranks: one more meeting where edp = 2, none where each expert lives on one rank (ep = 8). Plus the loss mean."""
    assert ddp_buckets_of(MIXTRAL_DENSE) == 246
    batch = moe_batch(ep=ep, zero_stage=0)
    assert not batch.on_fsdp2[0, 0]
    assert data.dp_meetings(batch)[0, 0] == ANALYTIC.dp_step_reductions + 246 + expert_meetings


def test_with_ep1_the_experts_ride_in_ddps_buckets_and_a_dense_model_is_unchanged():
    experts = 32 * 8 * 3 * 4096 * 14336
    mixtral = data.dp_meetings(moe_batch(ep=1, zero_stage=0))[0, 0]
    assert mixtral == ANALYTIC.dp_step_reductions + ddp_buckets_of(MIXTRAL_DENSE + experts)
    mistral = data.dp_meetings(moe_batch(model="mistral-7b", zero_stage=0))[0, 0]
    assert ddp_buckets_of(MISTRAL) == 1106
    assert mistral == ANALYTIC.dp_step_reductions + 1106


# Collectives per unit: ZeRO-2 a gather, then a reduce-scatter per micro-batch; ZeRO-3 two gathers and a
# reduce-scatter per micro-batch (8 of them).
@pytest.mark.parametrize(("zero_stage", "per_unit"), [(2, 1 + 8), (3, 3 * 8)])
def test_fsdp2_meets_for_each_local_expert_unit_like_a_blocks(zero_stage, per_unit):
    """FSDP2 wraps each of a block's 8 / ep local experts as its own unit on the edp mesh (executor/parallel/data.py),
    beside the 32 blocks and the root: ep = 4 (edp 2) adds 32 x 2 units. ep = 8 (edp 1) adds none, nor does ep = 1,
    whose experts ride in their block's unit, nor a dense model. Plus the loss mean and the DTensor norm."""
    reductions = ANALYTIC.dp_step_reductions + 1
    assert data.dp_meetings(moe_batch(ep=4, zero_stage=zero_stage))[0, 0] == reductions + per_unit * (33 + 32 * 2)
    for ep in (8, 1):
        assert data.dp_meetings(moe_batch(ep=ep, zero_stage=zero_stage))[0, 0] == reductions + per_unit * 33
    assert data.dp_meetings(moe_batch(model="mistral-7b", zero_stage=zero_stage))[0, 0] == reductions + per_unit * 33


def test_fsdp2_replicate_all_reduces_each_local_expert_unit_once():
    """ZeRO-0 under pp2 runs FSDP2's `replicate`: per device 16 blocks and the root, and with ep = 2 (edp 2 of the
    dp4 group) 16 x 4 expert units, one all-reduce each."""
    batch = batch_of(model="mixtral-8x7b", runtime=ANALYTIC, nodes=1, batch=64, dp=4, pp=2, ep=2, zero_stage=0)
    assert batch.on_fsdp2[0, 0]
    reductions = ANALYTIC.dp_step_reductions + 1
    np.testing.assert_array_equal(data.dp_meetings(batch)[0], reductions + 17 + 16 * 4)


# FSDP2 inside torch.distributed.pipelining (PlanBatch.fsdp2_pipelined): every unit reduces once a step, after the
# stage's last backward, and a backward leaves its parameters gathered (planner/cost/data.py `sharded_passes`).
def pipelined(zero_stage: int, runtime=FSDP) -> PlanBatch:
    return batch_of(runtime=runtime, nodes=2, pp=2, zero_stage=zero_stage)  # dp8 x pp2, 8 micro-batches


def test_pipelined_zero3_gathers_once_a_microbatch_and_once_more_and_reduce_scatters_once():
    batch = pipelined(3)
    m = batch.microbatches[0, 0]
    assert (m, batch.fsdp2_pipelined[0, 0]) == (8, True)
    passes = data.sharded_passes(batch)
    assert (passes.gathers[0, 0], passes.scatters[0, 0]) == (m + 1, 1)
    sharded = data.sharded_collectives(batch)
    gather, scatter = sharded.gather_s(batch.blocks), sharded.scatter_s(batch.blocks)
    assert data.dp_during_backward_s(batch) == pytest.approx((m + 1) * gather + scatter)
    # Without a pipeline the same stage reduce-scatters every micro-batch and gathers twice in each.
    alone = batch_of(runtime=FSDP, nodes=2, zero_stage=3, batch=128, dp=16)
    assert not alone.fsdp2_pipelined[0, 0]
    m_alone = alone.microbatches[0, 0]
    alone_passes = data.sharded_passes(alone)
    assert (alone_passes.gathers[0, 0], alone_passes.scatters[0, 0]) == (2 * m_alone, m_alone)


def test_pipelined_zero2_gathers_and_reduce_scatters_once():
    passes = data.sharded_passes(pipelined(2))
    assert (passes.gathers[0, 0], passes.scatters[0, 0]) == (1, 1)


def test_a_pipelined_stage_waits_for_all_its_reduce_scatters_after_its_last_backward():
    batch = pipelined(3)
    sharded = data.sharded_collectives(batch)
    blocks, m = batch.blocks[0], batch.microbatches[0, 0]
    forward = batch.block.forward_s[0, 0]
    backward = batch.block.backward_s[0, 0] + batch.block.recompute_s[0, 0]
    gather = sharded.block_gather_s[0, 0]
    first = blocks * max(gather - forward, 0) + sharded.root_gather_s[0]
    later = blocks * max(gather - backward, 0) + sharded.root_gather_s[0]
    reduce = blocks * sharded.block_scatter_s[0, 0] + sharded.root_scatter_s[0]
    assert data.sharded_exposed_s(batch)[0] == pytest.approx(first + m * later + reduce)
    assert np.all(data.sharded_exposed_s(batch)[0] >= reduce)


def test_pipelined_replicate_shows_every_all_reduce():
    batch = pipelined(0)  # ZeRO-0 under pp runs FSDP2's `replicate`
    assert batch.fsdp2_pipelined[0, 0]
    assert data.dp_comm_exposed_s(batch) == pytest.approx(data.dp_during_backward_s(batch))
    assert data.dp_meetings(batch)[0, 0] == FSDP.dp_step_reductions + 1 + batch.blocks[0, 0] + 1


def test_stacks_with_their_own_pipeline_engines_keep_their_counts():
    for runtime in (DEEPSPEED, replace(FSDP, fsdp2_in_torch_pipelining=False)):
        batch = pipelined(0, runtime)
        assert not batch.fsdp2_pipelined[0, 0]
