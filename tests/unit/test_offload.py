"""CPU offload (plan.offload): each cost term against hand-computed values, the rules, and the search with offload in
its space. The reference setup: a small Llama on one node of 4 H100s, dp=4, DeepSpeed in fp16 (ZeRO's mixed-precision
bytes: 2-byte weights and gradients, 4-byte master weights, AdamW's 8 bytes of moments; DeepSpeed's bf16 would
keep 4-byte gradients), so every term is a multiple of P / 4, P the model's parameter count."""

from __future__ import annotations

import pytest

from planner import estimate, search
from planner.cost.optimizer import CPU_ADAM_S_PER_PARAM
from planner.cost.params import model_params
from planner.errors import InfeasiblePlanError
from planner.presets import PCIE_GEN5_HOST_GBPS
from planner.request import parse_estimate_request
from planner.rules import OFFLOAD_MIN_ZERO_STAGE, plan_violations

SMALL_LLAMA = {"name": "llama3-8b", "num_layers": 8, "hidden_size": 2048, "num_attention_heads": 16,
               "num_kv_heads": 4, "ffn_hidden_size": 5632, "vocab_size": 32000}  # fmt: skip
LINK_GBPS = 2.0  # a slow host link, so that the PCIe terms are visible next to compute


def request(offload: str = "none", zero: int = 3, **cluster) -> dict:
    return {
        "model": SMALL_LLAMA,
        "training": {"seq_len": 2048, "global_batch_size": 8, "framework": "deepspeed", "precision": "fp16"},
        "cluster": {"gpu": "h100-sxm", "num_nodes": 1, "gpus_per_node": 4, "host_link_GBps": LINK_GBPS, **cluster},
        "plan": {"dp": 4, "zero_stage": zero, "micro_batch_size": 1, "offload": offload},
    }


@pytest.fixture(scope="module")
def params() -> int:
    return model_params(parse_estimate_request(request()).model)


def test_optimizer_offload_moves_states_and_gradient_shards_to_the_host(params):
    """ZeRO-Offload at ZeRO-2: the GPU keeps its 16-bit weights and one block's gradient working copy; the host
    holds each GPU's shard of master weights + moments (12 bytes) and its fp32 gradients (4 bytes)."""
    plain, offloaded = estimate(request(zero=2)), estimate(request("optimizer", zero=2))
    stage, before = offloaded.memory.by_stage[0], plain.memory.by_stage[0]
    assert stage.optimizer_bytes == 0.0 and before.optimizer_bytes == pytest.approx(params / 4 * 12)
    assert stage.params_bytes == pytest.approx(before.params_bytes)  # ZeRO-2 keeps all 16-bit weights: 2 P
    assert stage.grads_bytes < before.grads_bytes - params / 4 * 2 * 0.99  # the sharded gradients left the GPU
    assert stage.host_bytes == pytest.approx(params / 4 * (12 + 4))
    assert offloaded.memory.host_bytes_per_node == pytest.approx(4 * params / 4 * 16)  # four GPUs on the node
    assert offloaded.memory.host_capacity_bytes == 2e12  # DGX H100
    assert plain.memory.host_bytes_per_node == 0.0 and plain.offload is None


def test_param_offload_also_moves_the_zero3_weight_shards(params):
    plain, offloaded = estimate(request(zero=3)), estimate(request("optimizer_and_params", zero=3))
    stage, before = offloaded.memory.by_stage[0], plain.memory.by_stage[0]
    sharded_weights = params / 4 * 2
    assert stage.params_bytes == pytest.approx(before.params_bytes - sharded_weights)  # FSDP's working copies stay
    assert stage.host_bytes == pytest.approx(params / 4 * (12 + 4 + 2))


def test_pcie_traffic_per_step(params):
    """D2H: the 16-bit gradient shard. H2D: optimizer offload, the updated 16-bit weight shard once; weight
    offload, the weight shard fetched for every forward and backward of each of the m = 2 micro-batches."""
    only_optimizer = estimate(request("optimizer")).offload
    assert only_optimizer.device_to_host_bytes == pytest.approx(params / 4 * 2)
    assert only_optimizer.host_to_device_bytes == pytest.approx(params / 4 * 2)
    assert only_optimizer.device_to_host_s == pytest.approx(params / 4 * 2 / (LINK_GBPS * 1e9))
    with_weights = estimate(request("optimizer_and_params")).offload
    assert with_weights.host_to_device_bytes == pytest.approx(2 * 2 * params / 4 * 2)
    assert with_weights.host_link_GBps == LINK_GBPS


def test_cpu_step_is_the_optimizer_term(params):
    """The node's CPUs step all its GPUs' shards at CPU-Adam's rate (Ren et al. 2021, Table 2: 2.57 s for 10B)."""
    offloaded = estimate(request("optimizer"))
    expected_s = 4 * params / 4 * 2.57 / 10e9
    assert pytest.approx(2.57e-10) == CPU_ADAM_S_PER_PARAM
    assert offloaded.breakdown.optimizer_s == pytest.approx(expected_s)
    assert offloaded.offload.cpu_optimizer_s == pytest.approx(expected_s)


def test_exposed_pcie_time_is_the_copy_back_plus_what_backward_does_not_hide(params):
    """The gradient copy overlaps the last micro-batch's backward; the weights' trip back is on the critical path."""
    traffic = estimate(request("optimizer")).offload
    upload_s = params / 4 * 2 / (LINK_GBPS * 1e9)
    assert traffic.host_to_device_s == pytest.approx(upload_s)
    assert upload_s <= traffic.exposed_s <= upload_s + traffic.device_to_host_s
    fast = estimate(request("optimizer", host_link_GBps=1e4)).offload  # a link so fast backward hides the copy
    assert fast.exposed_s == pytest.approx(params / 4 * 2 / 1e13)


def test_offload_is_never_faster_and_never_needs_more_gpu_memory():
    for zero, offload in ((1, "optimizer"), (2, "optimizer"), (3, "optimizer"), (3, "optimizer_and_params")):
        plain, offloaded = estimate(request(zero=zero)), estimate(request(offload, zero=zero))
        assert offloaded.step_time_s >= plain.step_time_s
        assert offloaded.memory.peak_bytes < plain.memory.peak_bytes


def test_the_preset_link_is_pcie_gen5_for_h100():
    cluster = parse_estimate_request(request(host_link_GBps=None)).cluster
    assert cluster.host_link_Bps == PCIE_GEN5_HOST_GBPS * 1e9 == 50e9


def test_on_a_cpu_device_offload_moves_nothing():
    cpu = {"gpu": "cpu", "host_link_GBps": None}
    base = request(**cpu) | {"training": {"seq_len": 256, "global_batch_size": 8, "framework": "deepspeed",
                                          "precision": "fp32"}}  # fmt: skip
    plain = estimate(base)
    offloaded = estimate(base | {"plan": {**base["plan"], "offload": "optimizer_and_params"}})
    assert offloaded.step_time_s == plain.step_time_s and offloaded.memory.peak_bytes == plain.memory.peak_bytes
    assert offloaded.offload is None and offloaded.memory.host_bytes_per_node == 0.0


# ------------------------------------------------------------------------------------------------ rules


def violations(req: dict) -> list[tuple[str, str]]:
    parsed = parse_estimate_request(req)
    return [(v.field, v.code) for v in plan_violations(parsed.plan, parsed.model, parsed.training, parsed.cluster)]


@pytest.mark.parametrize(
    ("offload", "zero"), [("optimizer", 0), ("optimizer_and_params", 1), ("optimizer_and_params", 2)]
)
def test_offload_needs_its_zero_stage(offload, zero):
    assert zero < OFFLOAD_MIN_ZERO_STAGE[offload]
    assert ("plan.offload", "offload_zero_stage") in violations(request(offload, zero=zero))


@pytest.mark.parametrize(("framework", "offload"), [("fsdp", "optimizer"), ("megatron", "optimizer_and_params"),
                                                    ("paraplan", "optimizer")])  # fmt: skip
def test_a_framework_without_that_offload_is_refused(framework, offload):
    req = request(offload, zero=3 if framework != "megatron" else 1)
    req["training"]["framework"] = framework
    assert ("plan.offload", "framework_offload") in violations(req)


def test_host_memory_over_the_node_is_refused_naming_the_field_and_the_bytes(params):
    needed = 4 * params / 4 * 18
    with pytest.raises(InfeasiblePlanError) as refused:
        estimate(request("optimizer_and_params", host_memory_per_node_bytes=int(needed // 2)))
    (violation,) = refused.value.violations
    assert violation.field == "cluster.host_memory_per_node_bytes" and violation.code == "host_memory_exceeded"
    assert f"over by {needed - int(needed // 2):,.0f} bytes" in violation.message


def test_a_gpu_without_a_known_node_needs_the_host_memory_field():
    found = violations(request("optimizer", gpu="h100-pcie"))
    assert ("cluster.host_memory_per_node_bytes", "host_memory_unknown") in found
    assert violations(request("optimizer", gpu="h100-pcie", host_memory_per_node_bytes=10**12)) == []


# ----------------------------------------------------------------------------------------------- search


def test_405b_on_16_h100_fits_the_gpus_only_with_offload_and_not_the_dgx_h100_ram():
    """docs/offload.md's question: ZeRO-3 with CPU offload fits the GPUs, but 405B's offloaded states (18 bytes a
    parameter over 16 GPUs, 8 to a node) need ~3.65 TB of host memory per node, over DGX H100's 2 TB."""
    req = {"model": "llama3-405b", "training": {"seq_len": 8192, "global_batch_size": 16},
           "cluster": {"gpu": "h100-sxm", "num_nodes": 2}, "search": {"top_k": 3}}  # fmt: skip
    result = search(req)
    assert not result.found and result.counts.over_host_memory > 0
    assert any(near.over_host_bytes > 0 and near.plan.offload != "none" for near in result.closest)
    roomy = search(req | {"cluster": {**req["cluster"], "host_memory_per_node_bytes": 4 * 10**12}})
    assert roomy.found and all(ranked.plan.offload == "optimizer_and_params" for ranked in roomy.plans)


def test_search_with_offload_returns_only_plans_that_fit_gpu_and_host_and_obey_the_rules():
    req = {"model": "llama3-70b", "training": {"seq_len": 4096, "global_batch_size": 32, "framework": "deepspeed"},
           "cluster": {"gpu": "a100-80gb", "num_nodes": 1}, "search": {"top_k": 5, "partition": False}}  # fmt: skip
    result = search(req)
    assert result.found
    limit = result.memory_limit_bytes
    for ranked in result.plans:
        plan, est = ranked.plan, ranked.estimate
        assert est.memory.peak_bytes <= limit
        assert est.memory.host_bytes_per_node <= est.memory.host_capacity_bytes
        assert plan.zero_stage >= OFFLOAD_MIN_ZERO_STAGE[plan.offload]
        assert plan.dp * plan.tp * plan.pp * plan.cp == 8
    assert any(ranked.plan.offload != "none" for ranked in result.plans)  # 70B on 8 A100s needs offload


def test_search_keeps_a_fixed_offload_and_refuses_one_outside_the_allowed():
    req = {"model": SMALL_LLAMA, "training": {"seq_len": 2048, "global_batch_size": 8, "framework": "deepspeed"},
           "cluster": {"gpu": "h100-sxm", "num_nodes": 1, "gpus_per_node": 4},
           "search": {"fixed": {"offload": "optimizer"}, "partition": False}}  # fmt: skip
    result = search(req)
    assert result.found and all(ranked.plan.offload == "optimizer" for ranked in result.plans)
    req["search"]["offloads"] = ["none"]
    with pytest.raises(InfeasiblePlanError) as refused:
        search(req)
    assert [v.field for v in refused.value.violations] == ["search.fixed.offload"]


def test_an_offloading_plan_never_beats_its_twin_that_fits():
    """A search where everything fits without offload ranks no offloading plan first."""
    req = {"model": SMALL_LLAMA, "training": {"seq_len": 2048, "global_batch_size": 8, "framework": "deepspeed"},
           "cluster": {"gpu": "h100-sxm", "num_nodes": 1, "gpus_per_node": 4},
           "search": {"partition": False}}  # fmt: skip
    assert search(req).plans[0].plan.offload == "none"


def test_on_a_cpu_device_the_search_offers_no_offload_it_would_only_repeat_its_twin():
    req = {"model": SMALL_LLAMA, "training": {"seq_len": 256, "global_batch_size": 8, "framework": "deepspeed"},
           "cluster": {"gpu": "cpu", "num_nodes": 1, "gpus_per_node": 2}, "search": {"partition": False}}  # fmt: skip
    result = search(req)
    assert result.found and {ranked.plan.offload for ranked in result.plans} == {"none"}
    fixed = search(req | {"search": {"partition": False, "fixed": {"offload": "optimizer"}}})
    assert {ranked.plan.offload for ranked in fixed.plans} == {"optimizer"}  # asked for, still answered
