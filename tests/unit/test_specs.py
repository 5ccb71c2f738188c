"""Specs validate themselves and name every broken rule."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from planner import estimate
from planner.errors import InfeasiblePlanError, UnknownPresetError
from planner.presets import gpu_preset
from planner.specs import ModelSpec, ParallelPlan


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


def test_even_split_puts_extra_layers_in_the_middle():
    counts = ParallelPlan(pp=4).stage_layer_counts(10)
    assert sum(counts) == 10 and counts == (2, 3, 3, 2)
    assert ParallelPlan(pp=4).stage_layer_counts(8) == (2, 2, 2, 2)


def test_dp_inferred_from_cluster(gpt3_request):
    plan = {k: v for k, v in gpt3_request["plan"].items() if k != "dp"}
    result = estimate({**gpt3_request, "plan": plan})
    assert result.step_time_s > 0


def test_precision_defaults_to_fp32_on_the_cpu_device_only():
    """The executor trains fp32 on CPUs, so a CPU request without a precision is costed at fp32; GPUs stay bf16
    and an explicit precision is kept."""
    from planner.request import parse_estimate_request

    def precision(gpu: object, training: dict) -> str:
        request = {"model": "llama3-8b", "training": {"seq_len": 128, "global_batch_size": 8, **training},
                   "cluster": {"gpu": gpu, "gpus_per_node": 1}, "plan": {"tp": 1}}  # fmt: skip
        return parse_estimate_request(request).training.precision

    custom_cpu = gpu_preset("cpu").model_dump() | {"name": "my-cpu"}
    assert precision("cpu", {}) == "fp32" and precision("CPU", {}) == "fp32" and precision(custom_cpu, {}) == "fp32"
    assert precision("h100-sxm", {}) == "bf16"
    assert precision("cpu", {"precision": "bf16"}) == "bf16"


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
