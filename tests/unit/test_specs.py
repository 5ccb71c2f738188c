"""Specs validate themselves and name every broken rule."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from planner import estimate
from planner.errors import InfeasiblePlanError, UnknownPresetError
from planner.presets import gpu_preset
from planner.specs import GpuSpec, ModelSpec, ParallelPlan


def test_plan_names_every_intrinsic_rule():
    with pytest.raises(ValidationError) as err:
        ParallelPlan(tp=1, sequence_parallel=True, schedule="1f1b", virtual_stages=2, layers_per_stage=(3, 3, 3))
    text = str(err.value)
    assert "plan.sequence_parallel" in text and "plan.virtual_stages" in text and "plan.layers_per_stage" in text


def test_interleaving_needs_pp_and_chunks():
    with pytest.raises(ValidationError, match="interleaved_1f1b needs pp >= 2"):
        ParallelPlan(schedule="interleaved_1f1b", virtual_stages=2)


def test_contextual_rules_all_reported(gpt3_request):
    request = {
        **gpt3_request,
        "training": {"seq_len": 2049, "global_batch_size": 1000},
        "plan": {**gpt3_request["plan"], "dp": 3, "tp": 5, "layers_per_stage": [4] * 23 + [5]},
    }
    with pytest.raises(InfeasiblePlanError) as err:
        estimate(request)
    codes = {v.code for v in err.value.violations}
    assert {
        "degrees_product",
        "tp_divides_num_attention_heads",
        "batch_divisible",
        "sp_divides_seq",
        "layers_per_stage_sum",
        "seq_exceeds_positions",
    } <= codes
    assert all(v.field.startswith(("plan", "training")) for v in err.value.violations)


def test_expert_parallelism_rules_name_the_field(gpt3_request):
    dense = {**gpt3_request, "plan": {**gpt3_request["plan"], "ep": 2}}
    with pytest.raises(InfeasiblePlanError) as err:
        estimate(dense)
    assert [(v.field, v.code) for v in err.value.violations] == [("plan.ep", "ep_needs_experts")]
    moe = {"num_layers": 96, "hidden_size": 256, "num_attention_heads": 8, "vocab_size": 1000, "num_experts": 6,
           "experts_per_token": 2, "mlp": "swiglu"}  # fmt: skip
    # dp=16 x cp=1, 6 experts; on Megatron-LM, which splits experts under tp (paraplan's executor would refuse tp 8)
    megatron = {**gpt3_request["training"], "framework": "megatron"}
    bad = {**gpt3_request, "model": moe, "training": megatron, "plan": {**gpt3_request["plan"], "ep": 4}}
    with pytest.raises(InfeasiblePlanError) as err:
        estimate(bad)
    assert {v.code for v in err.value.violations} == {"ep_divides_experts"}
    bad["plan"] = {**bad["plan"], "ep": 32}
    with pytest.raises(InfeasiblePlanError) as err:
        estimate(bad)
    assert {v.code for v in err.value.violations} == {"ep_divides_experts", "ep_divides_dp_cp"}


def test_even_split_puts_extra_layers_in_the_middle():
    counts = ParallelPlan(pp=4).stage_layer_counts(10)
    assert sum(counts) == 10 and counts == (2, 3, 3, 2)
    assert ParallelPlan(pp=4).stage_layer_counts(8) == (2, 2, 2, 2)


def test_dp_inferred_from_cluster(gpt3_request):
    plan = {k: v for k, v in gpt3_request["plan"].items() if k != "dp"}
    result = estimate({**gpt3_request, "plan": plan})
    assert result.step_time_s > 0


def _request(gpu: object, training: dict | None = None) -> dict:
    """A one-GPU Llama-3 8B request on `gpu` (a preset name or a GPU object)."""
    return {"model": "llama3-8b", "training": {"seq_len": 128, "global_batch_size": 8, **(training or {})},
            "cluster": {"gpu": gpu, "gpus_per_node": 1}, "plan": {"tp": 1}}  # fmt: skip


def _precision(gpu: object, training: dict) -> str:
    from planner.request import parse_estimate_request

    return parse_estimate_request(_request(gpu, training)).training.precision


def test_precision_defaults_to_fp32_on_the_cpu_device_only():
    """The executor trains fp32 on CPUs, so a CPU request without a precision is costed at fp32; GPUs stay bf16
    and an explicit precision is kept."""
    custom_cpu = gpu_preset("cpu").model_dump() | {"name": "my-cpu"}
    assert _precision("cpu", {}) == "fp32" and _precision("CPU", {}) == "fp32"
    assert _precision(custom_cpu, {}) == "fp32"
    assert _precision("h100-sxm", {}) == "bf16"
    assert _precision("cpu", {"precision": "bf16"}) == "bf16"


def test_precision_defaults_to_fp16_on_a_gpu_without_bf16():
    """A V100 has no bf16 tensor cores: a request naming no precision trains fp16 there, and says so."""
    assert _precision("v100-sxm2-32gb", {}) == "fp16"
    assert _precision("V100-SXM2-16GB", {}) == "fp16"
    assert _precision("v100-sxm2-32gb", {"precision": "fp32"}) == "fp32"
    result = estimate(_request("v100-sxm2-32gb"))
    assert result.step_time_s > 0
    assert any("no bf16 tensor cores" in note for note in result.assumptions)
    assert not any("bf16" in note for note in estimate(_request("a100-80gb")).assumptions)


def test_bf16_on_a_gpu_without_bf16_is_refused_naming_the_field():
    with pytest.raises(ValidationError) as err:
        estimate(_request("v100-sxm2-32gb", {"precision": "bf16"}))
    assert "training.precision: bf16 is not supported by v100-sxm2-32gb" in str(err.value)
    assert "use fp16" in str(err.value)


def test_a_plan_search_refuses_bf16_on_a_v100_and_defaults_to_fp16():
    from planner import search

    request = {key: value for key, value in _request("v100-sxm2-32gb").items() if key != "plan"}
    request["model"] = {"name": "llama3-8b", "num_layers": 2}
    result = search(request)
    assert result.found and all(ranked.estimate.step_time_s > 0 for ranked in result.plans)
    request["training"]["precision"] = "bf16"
    with pytest.raises(ValidationError, match="training.precision: bf16 is not supported by v100-sxm2-32gb"):
        search(request)


def test_a_gpu_spec_needs_fp16_and_fp32_but_not_bf16():
    fields = gpu_preset("v100-sxm2-32gb").model_dump()
    assert GpuSpec.model_validate(fields).peak_tflops == {"fp16": 125.0, "fp32": 15.7}
    with pytest.raises(ValidationError, match=r"peak_tflops lacks \['fp16'\]"):
        GpuSpec.model_validate(fields | {"peak_tflops": {"bf16": 100.0, "fp32": 10.0}})


# A GPU that is not a preset, given in full as `cluster.gpu` (as in docs/contract.md): an NVIDIA A40 (datasheet: 48 GB
# GDDR6 at 696 GB/s, bf16/fp16 tensor 299.4 with sparsity -> 149.7 dense, fp32 37.4, PCIe Gen4), memory as
# marketed, a 100 Gb/s NIC per GPU and the A100's matmul fraction assumed.
CUSTOM_GPU = {
    "name": "a40",
    "memory_bytes": 48 * 10**9,
    "peak_tflops": {"bf16": 149.7, "fp16": 149.7, "fp32": 37.4},
    "hbm_GBps": 696.0,
    "intra_node": {"name": "pcie-gen4-x16", "bandwidth_GBps": 32.0, "efficiency": 0.5, "latency_s": 20e-6},
    "inter_node": {"name": "nic-100g", "bandwidth_GBps": 12.5, "efficiency": 0.86, "latency_s": 20e-6},
    "matmul_efficiency": 0.691,
    "memory_efficiency": 0.88,
    "source": "NVIDIA A40 datasheet",
}


def test_an_estimate_on_a_custom_gpu_object():
    result = estimate(_request(CUSTOM_GPU))
    assert result.step_time_s > 0 and result.memory.capacity_bytes == 48 * 10**9
    assert any("a40 peak" in note for note in result.assumptions)
    # The same object without bf16 trains fp16 and refuses bf16, as a V100 preset does.
    fp16_only = CUSTOM_GPU | {"peak_tflops": {"fp16": 149.7, "fp32": 37.4}}
    assert _precision(fp16_only, {}) == "fp16"
    with pytest.raises(ValidationError, match="training.precision: bf16 is not supported by a40"):
        estimate(_request(fp16_only, {"precision": "bf16"}))


def test_the_contract_example_of_a_custom_gpu_estimates():
    """docs/contract.md's worked example of a GPU object is a request that estimates, on that GPU."""
    import json
    from pathlib import Path

    text = (Path(__file__).resolve().parents[2] / "docs" / "contract.md").read_text()
    blocks = [block.split("```")[0] for block in text.split("```json\n")[1:]]
    example = json.loads(next(block for block in blocks if '"gpu": {' in block))
    result = estimate(example)
    assert result.step_time_s > 0 and result.memory.capacity_bytes == example["cluster"]["gpu"]["memory_bytes"]


def test_a_bad_custom_gpu_names_its_fields():
    broken = CUSTOM_GPU | {"hbm_GBps": 0, "peak_tflops": {"bf16": 1.0}}
    broken.pop("matmul_efficiency")
    with pytest.raises(ValidationError) as err:
        estimate(_request(broken))
    fields = {".".join(map(str, e["loc"])) for e in err.value.errors()}
    assert {"cluster.gpu.hbm_GBps", "cluster.gpu.peak_tflops", "cluster.gpu.matmul_efficiency"} <= fields


def test_unknown_preset_suggests_close_names_with_the_other_field_errors():
    with pytest.raises(ValidationError) as err:
        estimate({"model": {"name": "llama3-8"}, "training": {}, "cluster": {}, "plan": {}})
    fields = {".".join(map(str, e["loc"])) for e in err.value.errors()}
    assert {"model", "training.seq_len", "cluster.gpu"} <= fields
    assert "Closest: llama3-8b" in str(err.value)
    with pytest.raises(UnknownPresetError, match="Closest: .*h100-sxm"):
        gpu_preset("h100")


def test_model_defaults_by_family():
    gpt = ModelSpec(num_layers=2, hidden_size=64, num_attention_heads=4, vocab_size=100)
    assert (gpt.ffn_size, gpt.position_embedding, gpt.qkv_bias, gpt.kv_heads) == (256, "learned", True, 4)
    llama = ModelSpec(num_layers=2, hidden_size=4096, num_attention_heads=32, vocab_size=100, mlp="swiglu")
    assert (llama.ffn_size, llama.position_embedding, llama.linear_bias) == (11008, "rope", False)


def test_bad_model_fields_are_named():
    with pytest.raises(ValidationError, match="num_kv_heads"):
        ModelSpec(num_layers=2, hidden_size=64, num_attention_heads=4, num_kv_heads=3, vocab_size=100)
    with pytest.raises(ValidationError, match="hidden_size"):
        ModelSpec(num_layers=2, hidden_size=65, num_attention_heads=4, vocab_size=100)
