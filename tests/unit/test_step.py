"""Whole-step invariants of the estimate."""

from __future__ import annotations

import pytest

from planner import estimate
from planner.estimates import layer_costs


def with_plan(request: dict, **changes) -> dict:
    return {**request, "plan": {**request["plan"], **changes}}


def test_breakdown_adds_up_and_units_are_consistent(gpt3_request):
    result = estimate(gpt3_request)
    assert result.breakdown.total_s == pytest.approx(result.step_time_s)
    assert result.tokens_per_s == pytest.approx(1536 * 2048 / result.step_time_s)
    assert result.tokens_per_s_per_gpu * 1024 == pytest.approx(result.tokens_per_s)
    assert 0.3 < result.mfu < 0.7 and result.hfu >= result.mfu
    assert result.fits and len(result.memory.by_stage) == 8
    assert result.num_microbatches == 96


def test_interleaving_divides_the_bubble(gpt3_request):
    plain = estimate(with_plan(gpt3_request, schedule="1f1b", virtual_stages=1))
    interleaved = estimate(gpt3_request)
    assert interleaved.breakdown.bubble_s == pytest.approx(plain.breakdown.bubble_s / 3, rel=0.05)


def test_no_pipeline_no_bubble(gpt3_request):
    request = with_plan(gpt3_request, pp=1, dp=128, schedule="1f1b", virtual_stages=1, zero_stage=3)
    result = estimate(request)
    assert result.breakdown.bubble_s == 0 and result.breakdown.pp_comm_s == 0


def test_recompute_trades_memory_for_time(gpt3_request):
    modes = {mode: estimate(with_plan(gpt3_request, recompute=mode)) for mode in ("none", "selective", "full")}
    act = {mode: r.memory.by_stage[0].activations_bytes for mode, r in modes.items()}
    assert act["full"] < act["selective"] < act["none"]
    assert modes["full"].step_time_s > modes["selective"].step_time_s >= modes["none"].step_time_s
    assert modes["none"].hfu == pytest.approx(modes["none"].mfu)


def model_states(request: dict, **plan) -> float:
    stages = estimate(with_plan(request, **plan)).memory.by_stage
    stage = stages[min(1, len(stages) - 1)]  # a middle stage where there is one
    return stage.params_bytes + stage.grads_bytes + stage.optimizer_bytes


def test_zero_stages_shrink_model_states(gpt3_request):
    unpipelined = {"tp": 8, "pp": 1, "dp": 128, "sequence_parallel": True, "schedule": "1f1b", "virtual_stages": 1}
    states = [model_states(gpt3_request, zero_stage=z, **unpipelined) for z in range(4)]
    assert states[0] > states[1] > states[2] > states[3]


def test_in_a_pipeline_fsdp2s_zero2_holds_more_than_zero1(gpt3_request):
    """Inside torch.distributed.pipelining FSDP2 reduces once a step, so ZeRO-2 accumulates the stage's whole
    unsharded gradient and keeps its gathered weights beside their shards (planner/cost/data.py `sharded_passes`),
    where ZeRO-1 on DDP holds the gradient and the weights once."""
    assert model_states(gpt3_request, zero_stage=2) > model_states(gpt3_request, zero_stage=1)
    assert model_states(gpt3_request, zero_stage=3) < model_states(gpt3_request, zero_stage=1)


def test_gpipe_holds_more_activations_than_1f1b(gpt3_request):
    gpipe = estimate(with_plan(gpt3_request, schedule="gpipe", virtual_stages=1))
    one_f = estimate(with_plan(gpt3_request, schedule="1f1b", virtual_stages=1))
    assert gpipe.memory.by_stage[0].activations_bytes > 10 * one_f.memory.by_stage[0].activations_bytes


def test_first_stage_holds_most_activations_and_last_the_logits(gpt3_request):
    stages = estimate(with_plan(gpt3_request, schedule="1f1b", virtual_stages=1)).memory.by_stage
    assert stages[0].activations_bytes > stages[3].activations_bytes > stages[6].activations_bytes


def test_not_fitting_is_an_answer_with_the_stage_and_bytes():
    request = {
        "model": {"name": "llama3-70b"},
        "training": {"seq_len": 8192, "global_batch_size": 64},
        "cluster": {"gpu": "h100-sxm", "num_nodes": 1},
        "plan": {"dp": 8, "recompute": "none"},
    }
    result = estimate(request)
    assert not result.fits
    assert result.memory.peak_bytes > result.memory.capacity_bytes
    assert "stage 0" in result.why_not_fits[0] and "over by" in result.why_not_fits[0]


def test_uneven_layers_per_stage_slow_the_pipeline(gpt3_request):
    even = estimate(with_plan(gpt3_request, schedule="1f1b", virtual_stages=1))
    skewed = estimate(
        with_plan(gpt3_request, schedule="1f1b", virtual_stages=1, layers_per_stage=[19, 11, 11, 11, 11, 11, 11, 11])
    )
    assert skewed.step_time_s > even.step_time_s
    assert skewed.memory.by_stage[0].layers == 19


def test_layer_records_cover_the_model(gpt3_request):
    layers = layer_costs(gpt3_request)
    assert [layer.kind for layer in layers[:2]] == ["embedding", "block"] and layers[-1].kind == "head"
    assert len(layers) == 96 + 2
    assert all(layer.forward_s > 0 and layer.backward_s > layer.forward_s for layer in layers[1:-1])


def test_context_parallel_splits_activations(gpt3_request):
    base = {
        **gpt3_request,
        "training": {"seq_len": 32768, "global_batch_size": 64},
        "model": {"name": "llama3-8b"},
    }
    base = {**base, "cluster": {"gpu": "h100-sxm", "num_nodes": 4}}
    no_cp = estimate(with_plan(base, dp=4, tp=8, pp=1, cp=1, schedule="1f1b", virtual_stages=1))
    cp4 = estimate(with_plan(base, dp=1, tp=8, pp=1, cp=4, schedule="1f1b", virtual_stages=1))
    assert cp4.memory.by_stage[0].activations_bytes < no_cp.memory.by_stage[0].activations_bytes / 3


def test_every_breakdown_term_is_composed_once_and_has_a_label(gpt3_request):
    """The breakdown's fields are the one list of terms: step_times answers each of them, and no other, and each
    carries the label the CLI prints."""
    from planner.cost.batch import PlanBatch
    from planner.cost.step import step_times
    from planner.request import parse_estimate_request
    from planner.specs import TimeBreakdown

    req = parse_estimate_request(gpt3_request)
    batch = PlanBatch.of_plan(req.model, req.training, req.cluster, req.plan)
    assert list(step_times(batch)) == list(TimeBreakdown.model_fields)
    assert all(field.description for field in TimeBreakdown.model_fields.values())


def test_kind_columns_take_layer_cost_fields_by_name():
    """The search's columns copy each LayerCost field of the same name; only the derived ones are not LayerCost's."""
    from dataclasses import fields

    from planner.cost.batch import KIND_COLUMNS_DERIVED, KindColumns
    from planner.cost.layers import LayerCost

    copied = {f.name for f in fields(KindColumns)} - set(KIND_COLUMNS_DERIVED)
    assert copied <= {f.name for f in fields(LayerCost)}
    assert set(KIND_COLUMNS_DERIVED).isdisjoint(f.name for f in fields(LayerCost))
