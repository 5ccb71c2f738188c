"""The training-stack regimes (planner/cost/runtime.py): which one a request gets, what each holds, and that the
cost model reads the regime it is given."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from planner.cost.batch import PlanBatch
from planner.cost.layers import layer_kinds
from planner.cost.measured import ProfileCosts
from planner.cost.params import block_params, model_params
from planner.cost.runtime import ANALYTIC, DEEPSPEED, FSDP, MEGATRON, PARAPLAN_CPU, PARAPLAN_CUDA, runtime_for
from planner.cost.step import estimate_step
from planner.errors import InfeasiblePlanError
from planner.estimates import estimate_request
from planner.presets import gpu_preset
from planner.profiles import load_profile_json
from planner.request import parse_estimate_request
from planner.specs import ClusterSpec

TESTS = Path(__file__).resolve().parents[1]
H200_PROFILE = TESTS / "data" / "h200-llama3.2-1b" / "seq1024" / "profile.json"
CPU_PROFILE = TESTS / "unit" / "fixtures" / "validation" / "cpu-profile.json"


def cluster(gpu: str, gpus: int = 8) -> ClusterSpec:
    return ClusterSpec(gpu=gpu_preset(gpu), gpus_per_node=gpus)


def test_a_cpu_cluster_runs_the_executor_on_gloo():
    assert runtime_for(cluster("cpu", 2), None) is PARAPLAN_CPU
    assert runtime_for(cluster("cpu", 2), ProfileCosts(load_profile_json(CPU_PROFILE))) is PARAPLAN_CPU


def test_a_gpu_is_the_executor_where_a_profile_measured_its_memory_else_analytic():
    measured = ProfileCosts(load_profile_json(H200_PROFILE))
    assert measured.measures_memory
    assert runtime_for(cluster("h200"), measured) is PARAPLAN_CUDA
    assert runtime_for(cluster("h200"), None) is ANALYTIC
    timings_only = ProfileCosts(load_profile_json(H200_PROFILE).model_copy(update={"layers": []}))
    assert runtime_for(cluster("h200"), timings_only) is ANALYTIC
    profile = load_profile_json(H200_PROFILE)  # layers of Llama 3.2 1B, which answer no other model's layers
    wider = profile.model.model_copy(update={"hidden_size": profile.model.hidden_size * 2})
    assert not ProfileCosts(profile, wider).measures_memory
    assert runtime_for(cluster("h200"), ProfileCosts(profile, wider)) is ANALYTIC


def test_the_request_names_its_regime():
    request = {
        "model": {"name": "llama3.2-1b"},
        "training": {"seq_len": 1024, "global_batch_size": 8},
        "cluster": {"gpu": "h200", "gpus_per_node": 8, "profile": str(H200_PROFILE)},
        "plan": {"tp": 1},
    }
    assert parse_estimate_request(request).runtime is PARAPLAN_CUDA
    assert parse_estimate_request({**request, "cluster": {"gpu": "h200"}}).runtime is ANALYTIC


def test_the_request_names_its_stack():
    request = {
        "model": {"name": "llama3.2-1b"},
        "training": {"seq_len": 1024, "global_batch_size": 8},
        "cluster": {"gpu": "h100-sxm", "gpus_per_node": 8},
        "plan": {"tp": 1},
    }
    stacks = {"megatron": MEGATRON, "deepspeed": DEEPSPEED, "fsdp": FSDP, "paraplan": ANALYTIC}
    for framework, regime in stacks.items():
        training = {**request["training"], "framework": framework}
        assert parse_estimate_request({**request, "training": training}).runtime is regime
    assert parse_estimate_request(request).training.framework == "paraplan"  # the default: paraplan train


def model_state_bytes_per_param(framework: str, precision: str, dp: int, zero_stage: int) -> float:
    """Weights + gradients + optimizer bytes per parameter of a dp-way run of a one-stage plan, with sequences so
    short that the optimizer step, not backward, is the peak."""
    req = parse_estimate_request({
        "model": {"name": "llama3.2-1b"},
        "training": {"seq_len": 16, "global_batch_size": 64, "precision": precision, "framework": framework},
        "cluster": {"gpu": "h100-sxm", "gpus_per_node": dp},
        "plan": {"dp": dp, "zero_stage": zero_stage},
    })  # fmt: skip
    stage = estimate_step(req.model, req.training, req.cluster, req.plan, runtime=req.runtime).memory.by_stage[0]
    return (stage.params_bytes + stage.grads_bytes + stage.optimizer_bytes) / model_params(req.model)


@pytest.mark.parametrize(
    ("precision", "dp", "zero_stage", "expected"),
    [
        # Megatron-LM docs/source/api-guide/dist_optimizer.md: bytes per parameter, d = data-parallel size.
        ("fp16", 1, 0, 20),
        ("bf16", 1, 0, 18),
        ("fp16", 8, 1, 4 + 16 / 8),
        ("bf16", 8, 1, 6 + 12 / 8),
    ],
)
def test_megatron_stores_a_parameter_as_its_distributed_optimizer_docs_say(precision, dp, zero_stage, expected):
    assert model_state_bytes_per_param("megatron", precision, dp, zero_stage) == pytest.approx(expected, rel=1e-6)


def test_deepspeed_bf16_accumulates_gradients_in_fp32():
    """DeepSpeed's BF16_Optimizer: bf16 weights, autograd's bf16 gradients kept allocated beside a full fp32
    gradient buffer, fp32 master weights and Adam states partitioned under ZeRO-1 (deepspeed/runtime/
    bf16_optimizer.py `update_hp_grads(clear_lp_grads=False)`): 2 + 2 + 4 + 12/d bytes a parameter; fp16 keeps
    ZeRO's 2 + 2 + 12/d (Rajbhandari et al. 2020, sec. 3.1)."""
    assert model_state_bytes_per_param("deepspeed", "bf16", 8, 1) == pytest.approx(8 + 12 / 8, rel=1e-6)
    assert model_state_bytes_per_param("deepspeed", "fp16", 8, 1) == pytest.approx(4 + 12 / 8, rel=1e-6)


def test_fsdp_keeps_fp32_sharded_parameters_gradients_and_adam_states():
    """FSDP2 under torchtitan's mixed-precision policy: 4 + 4 + 8 bytes, all sharded over dp by full sharding, and
    16-bit unsharded copies of the block in use and the next one (weights) and of one block's gradient."""
    model = llama_1b(dp=8)[0]
    working = 2 * 2 + 2
    expected = 16 / 8 + working * block_params(model).per_gpu(1) / model_params(model)
    assert model_state_bytes_per_param("fsdp", "bf16", 8, 3) == pytest.approx(expected, rel=1e-6)


def test_fsdp_zero2_keeps_sharded_parameters_and_their_gathered_16_bit_copy():
    """ZeRO-2 on FSDP2 is `fully_shard(reshard_after_forward=False)`: fp32 shards of the weights, gradients and Adam
    states, the bf16 gathered weights kept through the step, and one block's 16-bit gradient before its
    reduce-scatter. DeepSpeed's stage 2 keeps whole 16-bit weights instead (2 + 2/d + 12/d, no gathered copy)."""
    model = llama_1b(dp=8)[0]
    expected = (4 + 4 + 8) / 8 + 2 + 2 * block_params(model).per_gpu(1) / model_params(model)
    assert model_state_bytes_per_param("fsdp", "bf16", 8, 2) == pytest.approx(expected, rel=1e-6)
    deepspeed = 2 + (2 + 12) / 8 + 2 * block_params(model).per_gpu(1) / model_params(model)
    assert model_state_bytes_per_param("deepspeed", "fp16", 8, 2) == pytest.approx(deepspeed, rel=1e-6)


def test_fsdp_in_a_pipeline_accumulates_the_stages_unsharded_fp32_gradients():
    """Inside torch.distributed.pipelining no FSDP2 unit reduces before the stage's last backward
    (torch/distributed/pipelining/stage.py `backward_maybe_with_nosync`), so each device holds its whole
    unsharded gradient, upcast to the fp32 `reduce_dtype` (FSDP2's `to_accumulated_grad_if_needed`), beside its
    4-byte gradient shard, where one block's 16-bit gradient is held without a pipeline."""
    req = parse_estimate_request({
        "model": {"name": "llama3.2-1b"},
        "training": {"seq_len": 1024, "global_batch_size": 64, "framework": "fsdp"},
        "cluster": {"gpu": "h100-sxm", "gpus_per_node": 8},
        "plan": {"dp": 4, "pp": 2, "zero_stage": 3, "micro_batch_size": 1, "schedule": "1f1b"},
    })  # fmt: skip
    memory = estimate_step(req.model, req.training, req.cluster, req.plan, runtime=req.runtime).memory
    batch = PlanBatch.of_plan(req.model, req.training, req.cluster, req.plan, runtime=req.runtime)
    device_params = batch.device_params()[0]
    for device, stage in enumerate(memory.by_stage):
        sharded = device_params[device] / 4 * 4
        assert stage.grads_bytes == pytest.approx(sharded + 4 * device_params[device], rel=1e-9)
    unpipelined = estimate_step(req.model, req.training, req.cluster, req.plan, runtime=replace(FSDP,
                                fsdp2_in_torch_pipelining=False)).memory  # fmt: skip
    block = 2 * block_params(req.model).per_gpu(1)
    for device, stage in enumerate(unpipelined.by_stage):
        assert stage.grads_bytes == pytest.approx(device_params[device] / 4 * 4 + block, rel=1e-9)


def test_a_stack_is_offered_only_the_zero_stages_it_runs():
    request = {
        "model": {"name": "llama3.2-1b"},
        "training": {"seq_len": 1024, "global_batch_size": 16, "framework": "megatron"},
        "cluster": {"gpu": "h100-sxm", "gpus_per_node": 8},
        "plan": {"dp": 8, "zero_stage": 3},
    }
    with pytest.raises(InfeasiblePlanError, match=r"training.framework=megatron runs ZeRO stages \[0, 1\], not 3"):
        estimate_request(request)
    deepspeed_pp = {**request, "training": {**request["training"], "framework": "deepspeed"}}
    deepspeed_pp["plan"] = {"dp": 4, "pp": 2, "zero_stage": 2}
    with pytest.raises(InfeasiblePlanError, match=r"with pipeline parallelism \(pp=2\), not 2"):
        estimate_request(deepspeed_pp)


def test_bytes_per_element():
    """The executor keeps fp32 weights and gradients under autocast, its weights the master copy; ZeRO's accounting
    16-bit ones and an fp32 master copy. Each puts the gradients it holds on the data-parallel wire (the executor's
    wrappers get no reduce dtype: 4 bytes; ZeRO's 16-bit ones: 2), and both fp32 partial gradients."""
    assert (PARAPLAN_CUDA.weight_bytes("bf16"), PARAPLAN_CUDA.gradient_bytes("bf16")) == (4, 4)
    assert (ANALYTIC.weight_bytes("bf16"), ANALYTIC.gradient_bytes("bf16")) == (2, 2)
    assert PARAPLAN_CUDA.master_weight_bytes("bf16") == 0 and ANALYTIC.master_weight_bytes("bf16") == 4
    assert ANALYTIC.weight_bytes("fp32") == ANALYTIC.gradient_bytes("fp32") == 4
    assert ANALYTIC.master_weight_bytes("fp32") == 0
    assert PARAPLAN_CUDA.data_parallel_bytes("bf16") == PARAPLAN_CUDA.gradient_bytes("bf16") == 4
    assert ANALYTIC.data_parallel_bytes("bf16") == ANALYTIC.gradient_bytes("bf16") == 2
    assert PARAPLAN_CUDA.partial_gradient_bytes == ANALYTIC.partial_gradient_bytes == 4


def test_fsdp2_runs_zero_2_and_3_and_zero_0_under_model_parallelism():
    zero = np.array([[0], [0], [1], [2], [3], [3]])
    tp = np.array([[1], [2], [2], [1], [1], [1]])
    shards = np.array([[2], [2], [2], [2], [2], [1]])
    on_fsdp2 = PARAPLAN_CUDA.on_fsdp2(zero, tp, 1, shards)[:, 0]
    assert on_fsdp2.tolist() == [False, True, False, True, True, False]
    assert PARAPLAN_CUDA.on_fsdp2(np.array([[0]]), np.array([[1]]), 2, np.array([[2]]))[0, 0]
    ddp_under_tp = replace(PARAPLAN_CUDA, replicate_under_model_parallel=False)
    assert not ddp_under_tp.on_fsdp2(zero, tp, 1, shards)[1, 0]


def llama_1b(**plan: object):
    req = parse_estimate_request({
        "model": {"name": "llama3.2-1b"},
        "training": {"seq_len": 1024, "global_batch_size": 16},
        "cluster": {"gpu": "h100-sxm", "gpus_per_node": 8},
        "plan": plan,
    })  # fmt: skip
    return req.model, req.training, req.cluster, req.plan


def test_the_cost_model_reads_the_regime_it_is_given():
    setup = llama_1b(dp=8, zero_stage=3)
    base = estimate_step(*setup, runtime=ANALYTIC)
    assert base == estimate_step(*setup)  # the default is the request's own regime
    slower = estimate_step(*setup, runtime=replace(ANALYTIC, step_host_overhead_s=0.25))
    assert slower.breakdown.compute_s == pytest.approx(base.breakdown.compute_s + 0.25)
    blocking = estimate_step(*setup, runtime=replace(ANALYTIC, blocking_fsdp_collectives=True))
    assert blocking.breakdown.dp_comm_s > base.breakdown.dp_comm_s
    fp32_weights = {**ANALYTIC.states, "bf16": ANALYTIC.states["bf16"]._replace(weight=4, unsharded=4)}
    fp32 = estimate_step(*setup, runtime=replace(ANALYTIC, states=fp32_weights))
    assert fp32.memory.by_stage[0].params_bytes == pytest.approx(2 * base.memory.by_stage[0].params_bytes)


def test_fsdp_selective_recompute_is_torchtitans_op_level_policy():
    """torchtitan's op-level selective checkpointing keeps, per block, its input, the attention kernel's output and
    logsumexp, and the odd-numbered matmuls' results. Llama-3 8B at 8,192 tokens, bf16, tp 1: input
    8192 x 4096 x 2 B; of the matmuls wq 4096, wk 1024, wv 1024, wo 4096, w1 14336, w3 14336, w2 4096 wide, the
    1st, 3rd, 5th and 7th are kept (wq, wv, w1, w2); attention output 8192 x 4096 x 2 B and logsumexp
    8192 x 32 heads x 4 B."""
    tokens = 8192
    expected = tokens * 4096 * 2 + tokens * (4096 + 1024 + 14336 + 4096) * 2 + tokens * 4096 * 2 + tokens * 32 * 4
    req = parse_estimate_request({
        "model": {"name": "llama3-8b"},
        "training": {"seq_len": tokens, "global_batch_size": 8, "framework": "fsdp"},
        "cluster": {"gpu": "h100-sxm", "gpus_per_node": 8},
        "plan": {"dp": 8, "zero_stage": 3, "recompute": "selective"},
    })  # fmt: skip
    block = layer_kinds(req.model, req.training, req.cluster, req.plan, runtime=req.runtime).block
    assert block.saved_bytes == pytest.approx(expected, rel=1e-12)
    megatron = replace(req.runtime, selective_recompute="attention_core")
    kept_by_megatron = layer_kinds(req.model, req.training, req.cluster, req.plan, runtime=megatron).block.saved_bytes
    assert block.saved_bytes < kept_by_megatron / 2  # flash keeps no scores: Megatron's selective keeps nearly all


# What an overlapped reduction's note says on a GPU without a profile (Runtime.overlap_hidden_share).
OVERLAPS = (
    "gradient reduction overlaps with backward; 81% of the overlapped time hides (the compute beside a collective "
    "loses the rest to it)"
)


@pytest.mark.parametrize(
    ("framework", "plan", "note"),
    [
        ("fsdp", {"dp": 8, "zero_stage": 3}, OVERLAPS),
        ("fsdp", {"dp": 4, "pp": 2, "zero_stage": 3}, "FSDP2 in a pipeline reduces after its last backward"),
        ("deepspeed", {"dp": 4, "pp": 2, "zero_stage": 1}, "deepspeed's pipeline reduces after its flush"),
        ("deepspeed", {"dp": 8, "zero_stage": 0}, "deepspeed reduces bf16 ZeRO-0 gradients after backward"),
        ("deepspeed", {"dp": 8, "zero_stage": 2}, OVERLAPS),
    ],
)
def test_the_assumptions_say_why_a_reduction_cannot_overlap(framework, plan, note):
    result = estimate_request({
        "model": {"name": "llama3.2-1b"},
        "training": {"seq_len": 1024, "global_batch_size": 64, "framework": framework},
        "cluster": {"gpu": "h100-sxm", "gpus_per_node": 8},
        "plan": {**plan, "schedule": "1f1b"},
    })  # fmt: skip
    assert [line for line in result.assumptions if line.startswith("gradient reduction")] == [
        note if note.startswith("gradient reduction") else f"gradient reduction does not overlap with backward: {note}"
    ]


def test_hfu_counts_the_matmuls_the_op_level_policy_repeats():
    """Llama-3 8B under FSDP, selective: each of the 32 blocks repeats wk (4096 x 1024), wo (4096 x 4096) and w3
    (4096 x 14336) over its 8,192 tokens, 2 FLOPs a multiply-add, for each of the 8 sequences: HFU exceeds MFU by
    that over the model FLOPs (3 x forward, the same for both)."""
    result = estimate_request({
        "model": {"name": "llama3-8b"},
        "training": {"seq_len": 8192, "global_batch_size": 8, "framework": "fsdp"},
        "cluster": {"gpu": "h100-sxm", "gpus_per_node": 8},
        "plan": {"dp": 8, "zero_stage": 3, "recompute": "selective"},
    })  # fmt: skip
    repeated = 32 * 8 * 2 * 8192 * 4096 * (1024 + 4096 + 14336)
    model_flops = result.model_tflops_per_gpu * 1e12 * result.step_time_s * 8
    assert result.hfu / result.mfu == pytest.approx(1 + repeated / model_flops, rel=1e-9)
