"""Planning from a measured HardwareProfile: ProfileCosts answers layer, optimizer and collective costs, the edges
attach the profile that `cluster.profile` names, and every time term of the estimate says where it came from.

The profiles are synthetic (no torch): round numbers, so that each expected value is worked out by hand.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import planner
from planner.cost import comm
from planner.cost.batch import PlanBatch
from planner.cost.measured import MeasuredLayer, NotMeasured, ProfileCosts, predict_collective_s
from planner.cost.params import model_params
from planner.cost.tensor import tp_step_comm_s
from planner.estimates import layer_costs
from planner.layout import placement
from planner.presets import gpu_preset
from planner.profiles import ProfileError, save_profile_json
from planner.request import attach_profile, parse_estimate_request, parse_plan_request, profile_costs
from planner.search.solve import search
from planner.specs import (
    PROFILE_SCHEMA_VERSION,
    ClusterSpec,
    CollectiveFit,
    Degrees,
    HardwareProfile,
    LayerMeasurement,
    MeetingWait,
    ModelSpec,
    OptimizerMeasurement,
    TimingStats,
)

MODEL = ModelSpec(
    num_layers=4,
    hidden_size=128,
    num_attention_heads=4,
    num_kv_heads=2,
    ffn_hidden_size=352,
    vocab_size=256,
    mlp="swiglu",
    norm="rmsnorm",
    position_embedding="rope",
)
PARAMS = model_params(MODEL)  # untied, pp = tp = 1: what one device holds
SEQ_LEN = 128
FP32_BYTES = 4

# (forward_s, backward_s) of each layer kind at micro_batch_size 4, seq_len 128, fp32, tp 1, recompute none.
EMBEDDING = (0.001, 0.002)
BLOCK = (0.010, 0.020)
HEAD = (0.003, 0.004)
# One layer of each kind per micro-batch: embedding + 4 blocks + head.
PER_MICROBATCH_S = sum(EMBEDDING) + MODEL.num_layers * sum(BLOCK) + sum(HEAD)  # 0.13 s

ADAMW_S, ADAMW_PARAMS = 0.002, 1000  # 2e-6 s per parameter


# ------------------------------------------------------------------------------------------- builders


def timing(median_s: float) -> TimingStats:
    return TimingStats(median_s=median_s, spread=0.01, repeats=5)


def layer(
    kind: str,
    times: tuple[float, float],
    micro_batch_size: int = 4,
    recompute: str = "none",
    seq_len: int = SEQ_LEN,
    tp: int = 1,
    dtype: str = "fp32",
    on_ranks: bool = False,
    sequence_parallel: bool = False,
    concurrent_ranks: int = 1,
) -> LayerMeasurement:
    forward_s, backward_s = times
    return LayerMeasurement(
        layer=kind,
        tp=tp,
        tp_collectives=on_ranks,
        concurrent_ranks=concurrent_ranks,
        sequence_parallel=sequence_parallel,
        micro_batch_size=micro_batch_size,
        seq_len=seq_len,
        dtype=dtype,
        recompute=recompute,
        forward=timing(forward_s),
        backward=timing(backward_s),
        saved_bytes=1000 * micro_batch_size,
    )


def model_layers(micro_batch_size: int = 4, recompute_modes: tuple[str, ...] = ("none",)) -> list[LayerMeasurement]:
    """Embedding, block and head at one micro-batch size; the block in each of `recompute_modes`."""
    blocks = [layer("block", BLOCK, micro_batch_size, recompute=mode) for mode in recompute_modes]
    return [layer("embedding", EMBEDDING, micro_batch_size), *blocks, layer("head", HEAD, micro_batch_size)]


def adamw(time_s: float = ADAMW_S, num_params: int = ADAMW_PARAMS) -> OptimizerMeasurement:
    return OptimizerMeasurement(optimizer="adamw", num_params=num_params, time=timing(time_s))


def fit(op: str, tier: str, group_size: int, latency_s: float = 1e-4, bandwidth_GBps: float = 2.0) -> CollectiveFit:
    return CollectiveFit(
        op=op,
        tier=tier,
        group_size=group_size,
        latency_s=latency_s,
        bandwidth_GBps=bandwidth_GBps,
        r2=0.99,
        max_rel_error=0.05,
        num_samples=8,
    )


def make_profile(**fields: Any) -> HardwareProfile:
    """A CPU profile of MODEL; by default its layers at micro_batch_size 4 and an AdamW step."""
    base: dict[str, Any] = {
        "device_kind": "cpu",
        "device_name": "x86_64 test box",
        "torch_version": "2.7.0",
        "created": "2025-06-01T12:00:00+00:00",
        "model": MODEL,
        "layers": model_layers(),
        "optimizer": [adamw()],
    }
    return HardwareProfile(**(base | fields))


def cuda_profile(device_name: str) -> HardwareProfile:
    return make_profile(device_kind="cuda", device_name=device_name, cuda_version="12.8")


def request(profile: str | None = None, gpus_per_node: int = 1, num_nodes: int = 1, **plan: Any) -> dict[str, Any]:
    """The contract's estimate request for MODEL on the `cpu` device; `plan` overrides the single-process plan."""
    cluster: dict[str, Any] = {"gpu": "cpu", "num_nodes": num_nodes, "gpus_per_node": gpus_per_node}
    if profile is not None:
        cluster["profile"] = profile
    return {
        "model": MODEL.model_dump(exclude_none=True),
        "training": {"seq_len": SEQ_LEN, "global_batch_size": 8, "precision": "fp32"},
        "cluster": cluster,
        "plan": {"dp": 1, "tp": 1, "pp": 1, "micro_batch_size": 4, "recompute": "none"} | plan,
    }


def plan_request(profile: str | None, **search_options: Any) -> dict[str, Any]:
    req = request(profile)
    del req["plan"]
    return req | ({"search": search_options} if search_options else {})


@pytest.fixture
def save(tmp_path: Path):
    """Write a profile to tmp_path and return its path as the request names it."""

    def saved(profile: HardwareProfile, name: str = "profile.json") -> str:
        return str(save_profile_json(profile, tmp_path / name))

    return saved


def cpu_cluster(gpus_per_node: int = 1, num_nodes: int = 1) -> ClusterSpec:
    return ClusterSpec(gpu=gpu_preset("cpu"), gpus_per_node=gpus_per_node, num_nodes=num_nodes)


# ----------------------------------------------------------------------------------------- ProfileCosts


def test_layer_answers_measured_shapes_as_measured():
    costs = ProfileCosts(make_profile())
    found = costs.layer("block", 1, 4, SEQ_LEN, "fp32", "none")
    assert isinstance(found, MeasuredLayer)
    assert (found.forward_s, found.backward_s) == BLOCK
    assert isinstance(found.forward_s, float)
    head = costs.layer("head", 1, 4, SEQ_LEN, "fp32", "none")
    assert isinstance(head, MeasuredLayer) and (head.forward_s, head.backward_s) == HEAD


def test_layer_interpolates_linearly_between_micro_batch_sizes():
    profile = make_profile(layers=[layer("block", (0.01, 0.02), 2), layer("block", (0.04, 0.05), 8)])
    costs = ProfileCosts(profile)
    found = costs.layer("block", 1, 4, SEQ_LEN, "fp32", "none")
    assert isinstance(found, MeasuredLayer)
    # 4 lies a third of the way from 2 to 8.
    assert found.forward_s == pytest.approx(0.01 + (0.04 - 0.01) / 3)
    assert found.backward_s == pytest.approx(0.02 + (0.05 - 0.02) / 3)


def test_layer_answers_an_array_of_micro_batch_sizes_element_by_element():
    profile = make_profile(layers=[layer("block", (0.01, 0.02), 2), layer("block", (0.04, 0.05), 8)])
    found = ProfileCosts(profile).layer("block", 1, np.array([2, 5, 8]), SEQ_LEN, "fp32", "none")
    assert isinstance(found, MeasuredLayer)
    np.testing.assert_allclose(found.forward_s, [0.01, 0.025, 0.04])
    np.testing.assert_allclose(found.backward_s, [0.02, 0.035, 0.05])


@pytest.mark.parametrize(
    ("args", "field"),
    [
        (("block", 1, 4, SEQ_LEN, "fp32", "full"), "recompute"),
        (("block", 2, 4, SEQ_LEN, "fp32", "none"), "tp"),
        (("block", 1, 4, SEQ_LEN, "bf16", "none"), "dtype"),
        (("block", 1, 4, 4 * SEQ_LEN, "fp32", "none"), "tokens"),  # 4x the measured tokens
        (("block", 1, 1, 2 * SEQ_LEN, "fp32", "none"), "seq_len"),  # one measured seq_len cannot fit s^2
    ],
)
def test_layer_returns_not_measured_naming_what_is_missing(args, field):
    found = ProfileCosts(make_profile()).layer(*args)
    assert isinstance(found, NotMeasured)
    assert found.field == field


def test_layer_of_a_kind_never_measured_is_not_measured():
    found = ProfileCosts(make_profile(layers=[layer("block", BLOCK)])).layer("head", 1, 4, SEQ_LEN, "fp32", "none")
    assert isinstance(found, NotMeasured) and found.field == "layer"


def test_optimizer_seconds_per_parameter():
    costs = ProfileCosts(make_profile())
    assert costs.optimizer_s_per_param("adamw") == pytest.approx(ADAMW_S / ADAMW_PARAMS)
    assert costs.optimizer_s_per_param("sgd") is None


def test_channel_fit_takes_the_nearest_measured_group_size_of_the_tier():
    two, eight = fit("all_reduce", "intra_node", 2), fit("all_reduce", "intra_node", 8, latency_s=2e-4)
    inter = fit("all_reduce", "inter_node", 16, latency_s=3e-4)
    costs = ProfileCosts(make_profile(collective_fits=[two, eight, inter]))
    assert costs.channel_fit("all_reduce", "intra_node", 2) == two
    assert costs.channel_fit("all_reduce", "intra_node", 8) == eight
    assert costs.channel_fit("all_reduce", "intra_node", 3) == two  # |log 2/3| < |log 8/3|
    assert costs.channel_fit("all_reduce", "intra_node", 6) == eight  # |log 8/6| < |log 2/6|
    assert costs.channel_fit("all_reduce", "intra_node", 4) == two  # as far from 2 as from 8: the smaller
    assert costs.channel_fit("all_reduce", "intra_node", 64) == eight
    assert costs.channel_fit("all_reduce", "inter_node", 2) == inter  # other tiers' sizes are not candidates
    assert costs.channel_fit("all_gather", "intra_node", 2) is None
    assert costs.channel_fit("send_recv", "inter_node", 2) is None
    assert ProfileCosts(make_profile()).channel_fit("all_reduce", "intra_node", 2) is None


@pytest.mark.parametrize(
    ("device_name", "gpu", "matches"),
    [
        ("NVIDIA H100 80GB HBM3", "h100-sxm", True),
        ("NVIDIA H100 80GB HBM3", "a100-80gb", False),
        ("NVIDIA H100 80GB HBM3", "h100-pcie", False),
        ("NVIDIA H100 80GB HBM3", "cpu", False),
        ("NVIDIA H100 PCIe", "h100-pcie", True),
        ("NVIDIA H100 PCIe", "h100-sxm", False),
        ("NVIDIA A100-SXM4-80GB", "a100-80gb", True),
        ("NVIDIA H200", "h100-sxm", False),
        ("NVIDIA H800", "h800", True),
        ("NVIDIA H800", "h100-sxm", False),
        ("NVIDIA A800-SXM4-80GB", "a800-80gb", True),
    ],
)
def test_device_mismatch_of_a_cuda_profile(device_name, gpu, matches):
    preset = gpu_preset(gpu)
    mismatch = ProfileCosts(cuda_profile(device_name)).device_mismatch(preset.kind, preset.name)
    assert (mismatch is None) == matches
    if not matches:
        assert device_name in mismatch and gpu in mismatch


def test_device_mismatch_of_a_cpu_profile():
    costs = ProfileCosts(make_profile())
    assert costs.device_mismatch("cpu", "cpu") is None
    mismatch = costs.device_mismatch("gpu", "h100-sxm")
    assert mismatch is not None and "cpu" in mismatch and "h100-sxm" in mismatch


def test_an_l40s_profile_does_not_describe_an_l4():
    preset = gpu_preset("l4")
    assert ProfileCosts(cuda_profile("NVIDIA L40S")).device_mismatch(preset.kind, preset.name) is not None


# ---------------------------------------------------------------------------------------- profile_costs


def test_profile_costs_read_the_profile_for_the_cluster():
    cluster = cpu_cluster()
    measured = profile_costs(cluster, make_profile())
    assert isinstance(measured, ProfileCosts)
    assert measured.profile == make_profile()
    assert not hasattr(cluster, "measured")  # the spec holds no profile: the cost model takes it as an argument


def test_profile_costs_refuse_another_device():
    cluster = ClusterSpec(gpu=gpu_preset("h100-sxm"), gpus_per_node=8)
    with pytest.raises(ProfileError, match=r"^cluster\.profile: ") as raised:
        profile_costs(cluster, make_profile())
    assert raised.value.field == "cluster.profile"
    assert profile_costs(cluster, cuda_profile("NVIDIA H100 80GB HBM3")) is not None


# ----------------------------------------------------------------------------------- request edges


def test_parse_estimate_request_loads_the_profile_file(save):
    req = parse_estimate_request(request(save(make_profile())))
    assert isinstance(req.measured, ProfileCosts)
    assert req.measured.profile == make_profile()
    assert req.model_dump() == parse_estimate_request(request()).model_dump() | {  # never serialised
        "cluster": req.cluster.model_dump()
    }


def test_parse_plan_request_loads_the_profile_file(save):
    req = parse_plan_request(plan_request(save(make_profile())))
    assert isinstance(req.measured, ProfileCosts)


def test_no_profile_no_resolver_call():
    def resolver(ref: str) -> HardwareProfile:
        raise AssertionError(f"resolver called for {ref!r}")

    req = parse_estimate_request(request(), resolve_profile=resolver)
    assert req.measured is None
    assert attach_profile(req, resolver) is req


def test_attach_profile_keeps_an_attached_profile():
    calls: list[str] = []

    def resolver(ref: str) -> HardwareProfile:
        calls.append(ref)
        return make_profile()

    req = parse_estimate_request(request("box-1"), resolve_profile=resolver)
    assert attach_profile(req, resolver) is req
    assert calls == ["box-1"]


def test_a_missing_profile_file_names_the_field_and_the_path(tmp_path: Path):
    path = tmp_path / "nowhere" / "profile.json"
    with pytest.raises(ProfileError) as raised:
        parse_estimate_request(request(str(path)))
    assert raised.value.field == "cluster.profile"
    assert str(path) in str(raised.value)
    assert str(raised.value).startswith("cluster.profile: ")


def test_a_profile_of_another_schema_version_is_refused(tmp_path: Path):
    data = json.loads(make_profile().model_dump_json())
    data["schema_version"] = PROFILE_SCHEMA_VERSION + 1
    path = tmp_path / "old.json"
    path.write_text(json.dumps(data), encoding="utf-8")
    with pytest.raises(ProfileError, match="schema version") as raised:
        planner.estimate(request(str(path)))
    assert raised.value.field == "cluster.profile"


def test_a_profile_of_another_device_is_refused_at_the_edge(save):
    req = request(save(make_profile()))
    req["cluster"]["gpu"] = "h100-sxm"
    with pytest.raises(ProfileError, match="h100-sxm") as raised:
        parse_estimate_request(req)
    assert raised.value.field == "cluster.profile"


def test_a_resolver_finds_profiles_by_id():
    stored = {"cpu-box": make_profile(optimizer=[adamw(time_s=0.004)])}
    seen: list[str] = []

    def resolver(ref: str) -> HardwareProfile:
        seen.append(ref)
        if ref not in stored:
            raise ProfileError(f"no stored profile {ref!r}")
        return stored[ref]

    result = planner.estimate(request("cpu-box"), resolve_profile=resolver)
    assert seen == ["cpu-box"]
    assert result.sources["optimizer_s"] == "profile"
    assert result.breakdown.optimizer_s == pytest.approx(PARAMS * 0.004 / ADAMW_PARAMS)
    with pytest.raises(ProfileError, match="no stored profile 'elsewhere'") as raised:
        planner.estimate(request("elsewhere"), resolve_profile=resolver)
    assert raised.value.field == "cluster.profile"


# -------------------------------------------------------------------------------------------- estimate


def test_a_profile_of_other_layer_shapes_answers_no_layer_time_and_says_whose_it_is(save):
    """A profile's layer times are the measured model's; its optimizer and device figures serve any model."""
    moe = MODEL.model_copy(update={"num_experts": 4, "experts_per_token": 2})
    found = ProfileCosts(make_profile(), moe).layer("block", 1, 4, SEQ_LEN, "fp32", "none")
    assert isinstance(found, NotMeasured) and found.field == "cluster.profile"
    assert "num_experts 1 (not 4)" in str(found) and "experts_per_token 1 (not 2)" in str(found)
    deeper = MODEL.model_copy(update={"num_layers": MODEL.num_layers * 2})  # more layers of the same shapes
    assert isinstance(ProfileCosts(make_profile(), deeper).layer("block", 1, 4, SEQ_LEN, "fp32", "none"), MeasuredLayer)

    result = planner.estimate({**request(save(make_profile())), "model": moe.model_dump(exclude_none=True)})
    assert result.sources["compute_s"] == "analytic" and result.sources["optimizer_s"] == "profile"
    assert any("num_experts 1 (not 4)" in note for note in result.assumptions), result.assumptions


def test_single_process_estimate_from_the_profile(save):
    result = planner.estimate(request(save(make_profile())))
    assert result.num_microbatches == 2
    assert result.breakdown.compute_s == pytest.approx(2 * PER_MICROBATCH_S)  # 0.26 s
    assert result.breakdown.optimizer_s == pytest.approx(PARAMS * ADAMW_S / ADAMW_PARAMS)
    assert result.breakdown.bubble_s == 0
    assert result.breakdown.dp_comm_s == result.breakdown.tp_comm_s == result.breakdown.pp_comm_s == 0
    # The second micro-batch's fp32 gradients added to the first's (read 4 + 4, write 4) at the CPU's bandwidth.
    cpu = gpu_preset("cpu")
    accumulation = PARAMS * 12 / (cpu.hbm_GBps * 1e9 * cpu.memory_efficiency)
    assert result.breakdown.accumulation_s == pytest.approx(accumulation)
    assert result.step_time_s == pytest.approx(2 * PER_MICROBATCH_S + accumulation + PARAMS * ADAMW_S / ADAMW_PARAMS)
    assert result.sources["compute_s"] == result.sources["bubble_s"] == "profile"
    assert result.sources["optimizer_s"] == "profile"
    assert result.sources["memory"] == "analytic"
    assert not any("analytic:" in note for note in result.assumptions)


def test_optimizer_time_follows_the_measurement(save):
    slow = planner.estimate(request(save(make_profile(optimizer=[adamw(time_s=3 * ADAMW_S)]))))
    more = planner.estimate(request(save(make_profile(optimizer=[adamw(num_params=4 * ADAMW_PARAMS)]))))
    assert slow.breakdown.optimizer_s == pytest.approx(3 * PARAMS * ADAMW_S / ADAMW_PARAMS)
    assert more.breakdown.optimizer_s == pytest.approx(PARAMS * ADAMW_S / ADAMW_PARAMS / 4)
    # What the optimizer steps over is the device's fp32 weights.
    assert slow.memory.by_stage[0].params_bytes == PARAMS * FP32_BYTES


def test_zero_shards_the_measured_optimizer_step(save):
    path = save(make_profile())
    result = planner.estimate(request(path, gpus_per_node=2, dp=2, zero_stage=1))
    assert result.breakdown.optimizer_s == pytest.approx(PARAMS / 2 * ADAMW_S / ADAMW_PARAMS)
    assert result.sources["optimizer_s"] == "profile"


def test_an_unmeasured_optimizer_is_analytic(save):
    sgd = OptimizerMeasurement(optimizer="sgd", num_params=1000, time=timing(1.0))
    with_sgd_only = planner.estimate(request(save(make_profile(optimizer=[sgd]))))
    analytic = planner.estimate(request())
    assert with_sgd_only.sources["optimizer_s"] == "analytic"
    assert with_sgd_only.breakdown.optimizer_s == pytest.approx(analytic.breakdown.optimizer_s)


def test_micro_batch_size_is_interpolated_in_the_estimate(save):
    # Measured at 2 and 8; times at 8 are not 4x those at 2, so plain scaling would give other numbers.
    at_2 = {"embedding": (0.001, 0.002), "block": (0.010, 0.020), "head": (0.003, 0.005)}
    at_8 = {"embedding": (0.004, 0.005), "block": (0.040, 0.050), "head": (0.009, 0.011)}
    layers = [layer(kind, times, 2) for kind, times in at_2.items()]
    layers += [layer(kind, times, 8) for kind, times in at_8.items()]
    result = planner.estimate(request(save(make_profile(layers=layers))))

    def at_4(kind: str) -> float:
        return sum(a + (b - a) / 3 for a, b in zip(at_2[kind], at_8[kind], strict=True))  # 4 = 2 + (8 - 2) / 3

    per_microbatch = at_4("embedding") + MODEL.num_layers * at_4("block") + at_4("head")
    assert result.breakdown.compute_s == pytest.approx(2 * per_microbatch)
    assert result.sources["compute_s"] == "profile"


def test_an_unmeasured_recompute_mode_falls_back_to_analytic_blocks(save):
    path = save(make_profile())
    result = planner.estimate(request(path, recompute="selective"))
    analytic = planner.estimate(request(recompute="selective"))
    analytic_block = layer_costs(request(recompute="selective"))[1]
    assert analytic_block.kind == "block"
    block_s = analytic_block.forward_s + analytic_block.backward_s + analytic_block.recompute_s
    expected = 2 * (sum(EMBEDDING) + MODEL.num_layers * block_s + sum(HEAD))
    assert result.breakdown.compute_s == pytest.approx(expected)
    assert result.breakdown.compute_s != pytest.approx(analytic.breakdown.compute_s)
    assert result.sources["compute_s"] == "profile+analytic"
    [note] = [note for note in result.assumptions if "times are analytic" in note]
    assert note.startswith("block times are analytic") and "recompute" in note and "selective" in note
    assert result.assumptions[0] == note  # the profile's notes come first


def test_layer_costs_record_where_their_times_came_from(save):
    path = save(make_profile(layers=model_layers(recompute_modes=("none", "full"))))
    embedding, *blocks, head = layer_costs(request(path, recompute="full"))
    assert len(blocks) == MODEL.num_layers
    assert {cost.time_source for cost in (embedding, *blocks, head)} == {"profile"}
    assert all(cost.time_note is None for cost in (embedding, *blocks, head))
    assert (blocks[0].forward_s, blocks[0].backward_s, blocks[0].recompute_s) == (*BLOCK, 0.0)
    # Without the profile, full recompute repeats the forward in a recompute term of its own.
    analytic_block = layer_costs(request(recompute="full"))[1]
    assert analytic_block.time_source == "analytic" and analytic_block.recompute_s > 0


def test_layers_the_profile_cannot_answer_are_noted(save):
    path = save(make_profile(layers=[layer("block", BLOCK)]))
    embedding, block, *_, head = layer_costs(request(path))
    assert block.time_source == "profile" and block.time_note is None
    assert embedding.time_source == head.time_source == "analytic"
    assert embedding.time_note.startswith("embedding times are analytic") and "layer='embedding'" in embedding.time_note
    result = planner.estimate(request(path))
    assert result.assumptions[:2] == [embedding.time_note, head.time_note]
    assert result.sources["compute_s"] == "profile+analytic"


def test_pipeline_stages_and_bubble_from_measured_layers(save):
    result = planner.estimate(request(save(make_profile()), gpus_per_node=2, pp=2))
    first = sum(EMBEDDING) + 2 * sum(BLOCK)  # 0.063 s
    last = 2 * sum(BLOCK) + sum(HEAD)  # 0.067 s
    assert result.breakdown.compute_s == pytest.approx(2 * last)  # m x the slowest device
    assert result.breakdown.bubble_s == pytest.approx(first)  # sum - max over the devices
    assert result.sources["bubble_s"] == "profile"


def test_an_empty_profile_changes_no_term(save):
    empty = make_profile(layers=[], optimizer=[])
    for plan in ({"dp": 2}, {"dp": 2, "recompute": "full"}, {"pp": 2}, {"dp": 2, "zero_stage": 1}):
        with_profile = planner.estimate(request(save(empty), gpus_per_node=2, **plan))
        without = planner.estimate(request(gpus_per_node=2, **plan))
        assert with_profile.breakdown == without.breakdown
        assert with_profile.memory == without.memory
        assert set(with_profile.sources.values()) == {"analytic"}
        notes = with_profile.assumptions[:3]
        assert [note.split(" ")[0] for note in notes] == ["embedding", "block", "head"]
        # The speeds note names the profile instead of the preset; the rest is as without one.
        assert with_profile.assumptions[3].startswith("times measured on ")
        assert without.assumptions[0].startswith("matmuls at ")
        assert with_profile.assumptions[4:] == without.assumptions[1:]


def test_without_a_profile_everything_is_analytic():
    result = planner.estimate(request())
    assert set(result.sources) == {*result.breakdown.model_dump(), "memory"}
    assert set(result.sources.values()) == {"analytic"}
    assert not any("times are analytic" in note for note in result.assumptions)


# ------------------------------------------------------------------------------------------ collectives


def test_dp_all_reduce_uses_the_measured_fit(save):
    all_reduce = fit("all_reduce", "intra_node", 2, latency_s=1e-4, bandwidth_GBps=2.0)
    path = save(make_profile(collective_fits=[all_reduce]))
    plan = {"dp": 2, "zero_stage": 0, "overlap_grad_reduce": False}
    result = planner.estimate(request(path, gpus_per_node=2, **plan))
    grad_bytes = PARAMS * FP32_BYTES
    # The alpha-beta all-reduce on 2 ranks: alpha + 2 (n - 1) / n x S / busbw = 1e-4 + S / 2e9.
    assert result.breakdown.dp_comm_s == pytest.approx(1e-4 + grad_bytes / 2e9)
    channel = comm.Channel(bus_bandwidth_Bps=2e9, latency_s=1e-4)
    assert result.breakdown.dp_comm_s == pytest.approx(comm.all_reduce_s(grad_bytes, 2, channel))
    assert result.breakdown.dp_comm_s == pytest.approx(predict_collective_s(all_reduce, grad_bytes))
    assert result.sources["dp_comm_s"] == "profile"
    assert result.sources["tp_comm_s"] == "analytic"  # tp = 1: no tensor-parallel group, nothing measured
    assert result.sources["pp_comm_s"] == "analytic"  # no send_recv fit


def test_dp_all_reduce_without_fits_is_analytic(save):
    plan = {"dp": 2, "zero_stage": 0, "overlap_grad_reduce": False}
    result = planner.estimate(request(save(make_profile()), gpus_per_node=2, **plan))
    link = gpu_preset("cpu").intra_node
    expected = link.latency_s + PARAMS * FP32_BYTES / link.bus_bandwidth_Bps
    assert result.breakdown.dp_comm_s == pytest.approx(expected)
    assert result.breakdown.dp_comm_s == pytest.approx(
        planner.estimate(request(gpus_per_node=2, **plan)).breakdown.dp_comm_s
    )
    assert result.sources["dp_comm_s"] == "analytic"


def test_tier_channel_reads_the_fit_of_its_tier_and_op():
    fits = [
        fit("all_reduce", "intra_node", 2, latency_s=1e-4, bandwidth_GBps=2.0),
        fit("all_reduce", "inter_node", 2, latency_s=5e-4, bandwidth_GBps=0.5),
        fit("send_recv", "intra_node", 2, latency_s=2e-5, bandwidth_GBps=3.0),
    ]
    cluster = cpu_cluster()
    measured = profile_costs(cluster, make_profile(collective_fits=fits))
    assert comm.tier_channel(cluster, "intra_node", "all_reduce", 2, measured) == comm.Channel(2e9, 1e-4)
    assert comm.tier_channel(cluster, "inter_node", "all_reduce", 4, measured) == comm.Channel(0.5e9, 5e-4)
    assert comm.tier_channel(cluster, "intra_node", "send_recv", 2, measured) == comm.Channel(3e9, 2e-5)
    link = gpu_preset("cpu").inter_node
    assert comm.tier_channel(cluster, "inter_node", "send_recv", 2, measured) == comm.Channel(
        link.bus_bandwidth_Bps, link.latency_s
    )


def test_group_and_p2p_channels_from_the_fits():
    fits = [
        fit("all_reduce", "intra_node", 2, latency_s=1e-4, bandwidth_GBps=4.0),
        fit("all_reduce", "inter_node", 2, latency_s=5e-4, bandwidth_GBps=1.5),
        fit("send_recv", "inter_node", 2, latency_s=3e-4, bandwidth_GBps=0.75),
    ]
    cluster = cpu_cluster(gpus_per_node=2, num_nodes=2)
    measured = profile_costs(cluster, make_profile(collective_fits=fits))
    inside = placement("dp", Degrees(pp=1, dp=2, cp=1, tp=1), 2)
    assert inside.intra_node
    assert comm.group_channel(cluster, inside, measured) == comm.Channel(4e9, 1e-4)
    across = placement("dp", Degrees(pp=1, dp=4, cp=1, tp=1), 2)
    assert not across.intra_node and across.members_per_node == 2
    # Two members per node, each with its own share of the network, capped by the intra-node links.
    assert comm.group_channel(cluster, across, measured) == comm.Channel(min(4e9, 2 * 1.5e9), 5e-4)
    neighbours = placement("pp", Degrees(pp=4, dp=1, cp=1, tp=1), 2)
    assert neighbours.neighbours_cross_nodes
    assert comm.p2p_channel(cluster, neighbours, measured) == comm.Channel(0.75e9, 3e-4)


def test_pipeline_sends_use_the_send_recv_fit(save):
    send_recv = fit("send_recv", "intra_node", 2, latency_s=2e-5, bandwidth_GBps=3.0)
    result = planner.estimate(request(save(make_profile(collective_fits=[send_recv])), gpus_per_node=2, pp=2))
    activation = FP32_BYTES * 4 * SEQ_LEN * MODEL.hidden_size  # micro_batch_size x seq_len x hidden, fp32
    transfers = 2 * (2 + 2 - 1)  # forward and backward: m + pp - 1 boundary crossings each
    assert result.breakdown.pp_comm_s == pytest.approx(transfers * (2e-5 + activation / 3e9))
    assert result.sources["pp_comm_s"] == "profile"


# --------------------------------------------------------------------------------------------- search


def test_search_plans_from_the_profile(save):
    path = save(make_profile(layers=model_layers(recompute_modes=("none", "selective", "full"))))
    result = search(plan_request(path))
    assert result.found
    top = result.plans[0]
    assert top.estimate.sources["compute_s"] == "profile"
    assert top.estimate.sources["optimizer_s"] == "profile"
    # Times scale with the micro-batch size from the one measured point, so every plan runs 8 sequences
    # through the measured per-sequence times.
    assert top.estimate.breakdown.compute_s == pytest.approx(8 / 4 * PER_MICROBATCH_S)
    assert top.estimate.breakdown.optimizer_s == pytest.approx(PARAMS * ADAMW_S / ADAMW_PARAMS)
    again = planner.estimate(request(path, **top.plan.model_dump(exclude={"layers_per_stage"})))
    assert again.step_time_s == pytest.approx(top.estimate.step_time_s)


def test_search_takes_a_resolver():
    seen: list[str] = []

    def resolver(ref: str) -> HardwareProfile:
        seen.append(ref)
        return make_profile(layers=model_layers(recompute_modes=("none", "selective", "full")))

    result = search(plan_request("cpu-box"), resolve_profile=resolver)
    assert seen == ["cpu-box"]
    assert result.plans[0].estimate.sources["compute_s"] == "profile"


def test_search_refuses_a_missing_profile(tmp_path: Path):
    with pytest.raises(ProfileError) as raised:
        search(plan_request(str(tmp_path / "missing.json")))
    assert raised.value.field == "cluster.profile"


def test_planner_search_passes_the_resolver_on():
    result = planner.search(plan_request("cpu-box"), resolve_profile=lambda ref: make_profile())
    assert result.found


def test_search_costs_a_measured_micro_batch_size_as_the_estimate_does(save):
    # The block is measured (slow) at micro_batch_size 4 only; 16 is beyond 2x the measured tokens, so a plan
    # at 16 is analytic (and here much faster). Searching 4 alone or 4 and 16 must agree on the plan at 4.
    slow = make_profile(
        layers=[layer("embedding", (1e-5, 1e-5)), layer("block", (0.5, 1.0)), layer("head", (1e-5, 1e-5))]
    )
    path = save(slow)
    req = plan_request(path, top_k=1, recompute=["none"], zero_stages=[0], micro_batch_sizes=[4, 16])
    req["training"]["global_batch_size"] = 32
    at_16 = planner.estimate(request(path, micro_batch_size=16) | {"training": req["training"]})
    at_4 = planner.estimate(request(path, micro_batch_size=4) | {"training": req["training"]})
    assert at_16.step_time_s < at_4.step_time_s
    assert search(req).plans[0].plan.micro_batch_size == 16


# ------------------------------------------------------------------------------- layers timed on tp ranks

TP_FIT = fit("all_reduce", "intra_node", 2, latency_s=1e-3, bandwidth_GBps=1.0)


def tp_layers(on_ranks: bool, sequence_parallel: bool = False, scale: float = 1.0) -> list[LayerMeasurement]:
    """Embedding, block and head at tp 2: shards (on_ranks False) or timed on 2 ranks, `scale` x the tp-1 times."""
    times = {"embedding": EMBEDDING, "block": BLOCK, "head": HEAD}
    return [
        layer(kind, (f * scale, b * scale), tp=2, on_ranks=on_ranks, sequence_parallel=sequence_parallel)
        for kind, (f, b) in times.items()
    ]


def test_layers_timed_on_tp_ranks_hold_the_tp_collectives(save):
    shards = tp_layers(on_ranks=False, scale=0.5)
    on_ranks = tp_layers(on_ranks=True, scale=2.0)
    profile = make_profile(layers=model_layers() + shards + on_ranks, collective_fits=[TP_FIT])
    result = planner.estimate(request(save(profile), gpus_per_node=2, tp=2))
    assert result.breakdown.compute_s == pytest.approx(2 * 2.0 * PER_MICROBATCH_S)  # 2 micro-batches, 2x times
    assert result.breakdown.tp_comm_s == 0
    assert result.sources["tp_comm_s"] == "profile"
    assert any("timed inside the layers" in note for note in result.assumptions)


def test_shards_plus_fitted_collectives_without_tp_rank_timings(save):
    profile = make_profile(layers=model_layers() + tp_layers(on_ranks=False, scale=0.5), collective_fits=[TP_FIT])
    result = planner.estimate(request(save(profile), gpus_per_node=2, tp=2))
    assert result.breakdown.compute_s == pytest.approx(2 * 0.5 * PER_MICROBATCH_S)
    # 4 all-reduces per block and one each for embedding and head, per micro-batch.
    activation = 4 * 4 * SEQ_LEN * MODEL.hidden_size
    per_microbatch = (4 * MODEL.num_layers + 2) * (1e-3 + activation / 1e9)
    assert result.breakdown.tp_comm_s == pytest.approx(2 * per_microbatch)


def test_tp_rank_timings_answer_only_their_sequence_parallel_setting():
    profile = make_profile(
        layers=model_layers() + tp_layers(False, scale=0.5) + tp_layers(True, sequence_parallel=True, scale=3.0)
    )
    costs = ProfileCosts(profile)
    with_sp = costs.layer("block", 2, 4, SEQ_LEN, "fp32", "none", sequence_parallel=True)
    without = costs.layer("block", 2, 4, SEQ_LEN, "fp32", "none", sequence_parallel=False)
    assert isinstance(with_sp, MeasuredLayer) and isinstance(without, MeasuredLayer)
    assert (with_sp.forward_s, with_sp.includes_tp_comm) == (pytest.approx(3 * BLOCK[0]), True)
    assert (without.forward_s, without.includes_tp_comm) == (pytest.approx(0.5 * BLOCK[0]), False)


def test_tp_rank_timings_fall_back_to_shards_beyond_their_shapes():
    ranks_small = [
        layer("block", BLOCK, micro_batch_size=1, tp=2, on_ranks=True),
    ]
    shards = [layer("block", BLOCK, micro_batch_size=8, tp=2)]
    costs = ProfileCosts(make_profile(layers=model_layers() + ranks_small + shards))
    found = costs.layer("block", 2, np.array([1, 8]), SEQ_LEN, "fp32", "none")
    assert isinstance(found, MeasuredLayer)
    assert list(found.includes_tp_comm) == [True, False]  # mbs 8 is beyond 2x mbs 1: the shard answers


def test_fsdp_pays_the_collective_latency_once_per_unit(save):
    """ZeRO-3 (FSDP2) wraps each of the 4 blocks and the root: 5 all-gathers twice and 5 reduce-scatters per
    micro-batch, the volume split among them; DDP (ZeRO-0) reduces in one pass."""
    fits = [fit(op, "intra_node", 2, latency_s=1e-3, bandwidth_GBps=1.0) for op in ("all_reduce",)]
    path = save(make_profile(collective_fits=fits))
    plan = {"dp": 2, "overlap_grad_reduce": False}
    zero3 = planner.estimate(request(path, gpus_per_node=2, zero_stage=3, **plan)).breakdown.dp_comm_s
    zero0 = planner.estimate(request(path, gpus_per_node=2, zero_stage=0, **plan)).breakdown.dp_comm_s
    state = PARAMS * FP32_BYTES
    microbatches = 1  # global batch 8, dp 2, micro-batch 4
    assert zero3 == pytest.approx(microbatches * 3 * (5 * 1e-3 + state / 2 / 1e9))
    assert zero0 == pytest.approx(1e-3 + state / 1e9)


def test_zero1_adds_the_gather_of_updated_weights_which_never_overlaps(save):
    """ZeRO-1 runs as DDP's all-reduce plus each owner's broadcast of its updated share after the optimizer
    step (an all-gather's bytes): with overlap on, only the all-reduce can hide behind backward."""
    fits = [fit(op, "intra_node", 2, latency_s=1e-3, bandwidth_GBps=1.0) for op in ("all_reduce", "all_gather")]
    path = save(make_profile(collective_fits=fits))
    state = PARAMS * FP32_BYTES
    gather = 1e-3 + state / 2 / 1e9  # alpha + (n - 1) / n x S / busbw on 2 ranks
    for overlap in (False, True):
        plan = {"dp": 2, "overlap_grad_reduce": overlap}
        zero1 = planner.estimate(request(path, gpus_per_node=2, zero_stage=1, **plan)).breakdown.dp_comm_s
        zero0 = planner.estimate(request(path, gpus_per_node=2, zero_stage=0, **plan)).breakdown.dp_comm_s
        assert zero1 == pytest.approx(zero0 + gather)


def test_fsdp_stages_pay_the_measured_fsdp_unit_collectives(save):
    """ZeRO-3 runs on FSDP2: with fsdp_* fits its per-unit all-gathers and reduce-scatters take their measured
    times (framework work included), not the bare collectives'; ZeRO-0's all-reduce keeps the bare fit."""
    bare = [fit(op, "intra_node", 2, latency_s=1e-3, bandwidth_GBps=1.0) for op in ("all_reduce",)]
    fsdp = [
        fit("fsdp_all_gather", "intra_node", 2, latency_s=4e-3, bandwidth_GBps=0.5),
        fit("fsdp_reduce_scatter", "intra_node", 2, latency_s=6e-3, bandwidth_GBps=0.25),
    ]
    plan = {"dp": 2, "overlap_grad_reduce": False}
    with_fsdp = save(make_profile(collective_fits=bare + fsdp), "fsdp.json")
    without = save(make_profile(collective_fits=bare), "bare.json")
    zero3 = planner.estimate(request(with_fsdp, gpus_per_node=2, zero_stage=3, **plan)).breakdown.dp_comm_s
    unit_bytes = PARAMS * FP32_BYTES / 5  # 4 blocks and the root
    gather, scatter = 4e-3 + unit_bytes / 2 / 0.5e9, 6e-3 + unit_bytes / 2 / 0.25e9
    assert zero3 == pytest.approx(5 * (2 * gather + scatter))  # one micro-batch
    zero0 = {
        path: planner.estimate(request(path, gpus_per_node=2, zero_stage=0, **plan)) for path in (with_fsdp, without)
    }
    assert zero0[with_fsdp].breakdown.dp_comm_s == zero0[without].breakdown.dp_comm_s


def test_measured_overlap_hides_only_its_share_of_the_gradient_reduction(save):
    """Without a calibration the profile's measured compute-communication overlap decides how much of the
    hideable all-reduce hides: none at 0, all that can at 1 (paraplan's default on CPUs when it was not measured;
    a GPU stack's is Runtime.overlap_hidden_share)."""
    fits = [fit("all_reduce", "intra_node", 2, latency_s=1e-3, bandwidth_GBps=1.0)]
    plan = {"dp": 2, "zero_stage": 0}

    def dp_comm(**fields: Any) -> float:
        path = save(make_profile(collective_fits=fits, **fields), f"{fields}.json")
        return planner.estimate(request(path, gpus_per_node=2, **plan)).breakdown.dp_comm_s

    serial = planner.estimate(
        request(save(make_profile(collective_fits=fits)), gpus_per_node=2, overlap_grad_reduce=False, **plan)
    ).breakdown.dp_comm_s
    hidden_all, hidden_none, half = dp_comm(), dp_comm(comm_compute_overlap=0.0), dp_comm(comm_compute_overlap=0.5)
    assert hidden_none == pytest.approx(serial)
    assert hidden_all < serial
    assert half == pytest.approx((hidden_all + hidden_none) / 2)


# ------------------------------------------------------------------------------- layers timed on a loaded node


def loaded_layers(scale: float, concurrent_ranks: int = 2) -> list[LayerMeasurement]:
    """Embedding, block and head at tp 1, timed with `concurrent_ranks` ranks busy: `scale` x the alone times."""
    times = {"embedding": EMBEDDING, "block": BLOCK, "head": HEAD}
    return [layer(kind, (f * scale, b * scale), concurrent_ranks=concurrent_ranks) for kind, (f, b) in times.items()]


def test_loaded_times_answer_plans_that_keep_as_many_ranks_busy():
    costs = ProfileCosts(make_profile(layers=model_layers() + loaded_layers(1.25)))
    alone = costs.layer("block", 1, 4, SEQ_LEN, "fp32", "none")
    busy = costs.layer("block", 1, 4, SEQ_LEN, "fp32", "none", busy_ranks=2)
    other = costs.layer("block", 1, 4, SEQ_LEN, "fp32", "none", busy_ranks=4)  # never timed with 4 busy
    assert (alone.forward_s, alone.contention) == (pytest.approx(BLOCK[0]), 1.0)
    assert (busy.forward_s, busy.contention) == (pytest.approx(1.25 * BLOCK[0]), pytest.approx(1.25))
    assert (other.forward_s, other.contention) == (pytest.approx(BLOCK[0]), 1.0)


def test_loaded_times_beyond_their_shapes_fall_back_to_the_alone_ones():
    loaded = [layer("block", (2 * BLOCK[0], 2 * BLOCK[1]), micro_batch_size=1, concurrent_ranks=2)]
    alone = [layer("block", BLOCK, micro_batch_size=1), layer("block", BLOCK, micro_batch_size=8)]
    costs = ProfileCosts(make_profile(layers=model_layers() + alone + loaded))
    found = costs.layer("block", 1, np.array([1, 8]), SEQ_LEN, "fp32", "none", busy_ranks=2)
    # mbs 8 is beyond 2x the loaded mbs 1: the alone time answers, with no contention.
    assert list(found.contention) == pytest.approx([2.0, 1.0])
    assert list(found.forward_s) == pytest.approx([2 * BLOCK[0], BLOCK[0]])


def test_data_parallel_ranks_compute_at_the_loaded_speed(save):
    path = save(make_profile(layers=model_layers() + loaded_layers(1.5), collective_fits=[]))
    result = planner.estimate(request(path, gpus_per_node=2, dp=2))
    assert result.breakdown.compute_s == pytest.approx(1.5 * PER_MICROBATCH_S)  # one micro-batch per rank


def test_a_pipeline_fills_and_drains_at_the_alone_speed(save):
    """Two stages, two micro-batches: each device's first forward and last backward (one micro-batch of work)
    and the bubble run while the other device waits; the other micro-batch runs with both busy."""
    path = save(make_profile(layers=model_layers() + loaded_layers(1.5)))
    result = planner.estimate(request(path, gpus_per_node=2, pp=2))
    first = sum(EMBEDDING) + 2 * sum(BLOCK)
    last = 2 * sum(BLOCK) + sum(HEAD)
    assert result.breakdown.compute_s == pytest.approx(1.5 * last + last)
    assert result.breakdown.bubble_s == pytest.approx(first)
    one_microbatch = planner.estimate(request(path, gpus_per_node=2, pp=2) | {
        "training": {"seq_len": SEQ_LEN, "global_batch_size": 4, "precision": "fp32"}})  # fmt: skip
    assert one_microbatch.breakdown.compute_s == pytest.approx(last)  # never both busy: alone throughout


def test_the_optimizer_of_a_loaded_node_is_timed_loaded(save):
    loaded = OptimizerMeasurement(optimizer="adamw", num_params=ADAMW_PARAMS, time=timing(3 * ADAMW_S),
                                  concurrent_ranks=2)  # fmt: skip
    path = save(make_profile(optimizer=[adamw(), loaded]))
    alone = planner.estimate(request(path)).breakdown.optimizer_s
    busy = planner.estimate(request(path, gpus_per_node=2, pp=2)).breakdown.optimizer_s
    assert alone == pytest.approx(PARAMS * ADAMW_S / ADAMW_PARAMS)
    assert busy == pytest.approx(3 * max_stage_params(path) * ADAMW_S / ADAMW_PARAMS)


def max_stage_params(path: str) -> float:
    """Parameters of the larger of two pipeline stages of MODEL."""
    result = planner.estimate(request(path, gpus_per_node=2, pp=2))
    return max(stage.params_bytes for stage in result.memory.by_stage) / FP32_BYTES


def test_a_search_over_a_loaded_node_costs_every_plan_as_the_estimate_does(save):
    """On two busy ranks, data-parallel plans run at the loaded times, pipelines partly at the alone ones: the
    search's batched costs and its pruning bound must agree with the estimate of each plan it returns."""
    layers = model_layers(recompute_modes=("none", "selective", "full")) + loaded_layers(1.4)
    path = save(make_profile(layers=layers, collective_fits=[TP_FIT]))
    req = plan_request(path, top_k=50, recompute=["none"])
    req["cluster"]["gpus_per_node"] = 2
    result = search(req)
    assert {(p.plan.dp, p.plan.pp) for p in result.plans} >= {(2, 1), (1, 2)}
    for ranked in result.plans:
        again = planner.estimate(request(path, gpus_per_node=2, **ranked.plan.model_dump()))
        assert again.step_time_s == pytest.approx(ranked.estimate.step_time_s)


# ------------------------------------------------------------- meetings, DTensor optimizer steps, FSDP2 on a CPU


def meeting_wait(micro_batch_size: int, wait_s: float) -> MeetingWait:
    return MeetingWait(micro_batch_size=micro_batch_size, seq_len=SEQ_LEN, recompute="none", concurrent_ranks=2,
                       meetings_per_pass=8, free=timing(0.1), synced=timing(0.1 + 8 * wait_s), collective_s=1e-4,
                       wait_s=wait_s)  # fmt: skip


def test_the_wait_per_meeting_is_the_one_measured_at_the_nearest_micro_batch_size():
    costs = ProfileCosts(make_profile(meeting_waits=[meeting_wait(1, 1e-3), meeting_wait(4, 2e-3),
                                                     meeting_wait(4, 4e-3)]))  # fmt: skip
    # 3 is nearer 4 than 1 (by ratio); two shapes measured at 4 answer their mean.
    assert list(costs.meeting_wait_s(np.array([1, 3, 4, 16]))) == pytest.approx([1e-3, 3e-3, 3e-3, 3e-3])
    assert list(ProfileCosts(make_profile()).meeting_wait_s(np.array([4]))) == [0.0]


def two_rank_step(path: str, **plan: Any) -> Any:
    return planner.estimate(request(path, gpus_per_node=2, **plan)).breakdown


def test_every_meeting_of_data_parallel_ranks_pays_the_measured_wait(save):
    """One micro-batch of 4 per rank. ZeRO-3 meets its peer at each of 5 FSDP2 units (4 blocks and the root) 3 times
    (2 all-gathers, 1 reduce-scatter), for the loss's mean and for the gradient norm of its DTensor shards: 17.
    ZeRO-2: a gather and a reduce-scatter per unit, loss, norm: 12. DDP (ZeRO-0): its 2 gradient buckets (the first
    of 1 MiB, then the rest of the model's 3.2 MB) and the loss: 3; ZeRO-1 adds the owners' broadcasts: 4."""
    fits = [fit(op, "intra_node", 2) for op in ("all_reduce", "all_gather", "reduce_scatter")]
    waiting = save(make_profile(collective_fits=fits, meeting_waits=[meeting_wait(4, 1e-3)]), "waits.json")
    never = save(make_profile(collective_fits=fits), "none.json")
    for zero, meetings in ((3, 17), (2, 12), (0, 3), (1, 4)):
        plan = {"dp": 2, "zero_stage": zero}
        extra = two_rank_step(waiting, **plan).dp_comm_s - two_rank_step(never, **plan).dp_comm_s
        assert extra == pytest.approx(meetings * 1e-3), zero


def test_every_pipeline_hand_off_pays_the_measured_wait(save):
    """Two stages, two micro-batches: 2 x (2 + 1) hand-offs on the critical path, and the sums of the loss and
    of the gradient norm over the stages."""
    waiting = save(make_profile(meeting_waits=[meeting_wait(4, 1e-3)]), "waits.json")
    never = save(make_profile(), "none.json")
    extra = two_rank_step(waiting, pp=2).pp_comm_s - two_rank_step(never, pp=2).pp_comm_s
    assert extra == pytest.approx(8 * 1e-3)
    assert two_rank_step(waiting, pp=2).dp_comm_s == 0  # one data-parallel rank: no dp meetings


def test_plans_on_dtensors_step_the_optimizer_at_its_sharded_speed(save):
    """FSDP2 (ZeRO-2/3) and tensor-parallel plans hold DTensor parameters: their step takes the time measured on
    DTensor shards; DDP (ZeRO-0/1) and pipeline plans hold plain tensors."""

    def on_two(time_s: float, sharded: bool) -> OptimizerMeasurement:
        return OptimizerMeasurement(optimizer="adamw", num_params=ADAMW_PARAMS, time=timing(time_s),
                                    concurrent_ranks=2, sharded=sharded)  # fmt: skip

    both = save(make_profile(optimizer=[adamw(), on_two(2 * ADAMW_S, False), on_two(5 * ADAMW_S, True)]), "b.json")
    plain = save(make_profile(optimizer=[adamw(), on_two(2 * ADAMW_S, False)]), "p.json")
    dtensors = [{"dp": 2, "zero_stage": 3}, {"dp": 2, "zero_stage": 2}, {"tp": 2}]
    plain_tensors = [{"dp": 2, "zero_stage": 1}, {"dp": 2, "zero_stage": 0}, {"pp": 2}]
    for plan, ratio in [(plan, 2.5) for plan in dtensors] + [(plan, 1.0) for plan in plain_tensors]:
        with_sharded, without = two_rank_step(both, **plan).optimizer_s, two_rank_step(plain, **plan).optimizer_s
        assert with_sharded == pytest.approx(ratio * without), plan


def test_fsdp2_on_a_cpu_hides_none_of_its_collectives(save):
    """FSDP2 overlaps its all-gathers and reduce-scatters by issuing them, synchronously, on their own CUDA streams;
    on a CPU they block the rank, so overlapping changes nothing for ZeRO-2/3, while DDP hides part of its
    all-reduce. On a GPU, FSDP2 hides its share too."""
    fits = [fit(op, "intra_node", 2) for op in ("all_reduce", "all_gather", "reduce_scatter")]
    path = save(make_profile(collective_fits=fits))
    for zero, hides in ((3, False), (2, False), (0, True)):
        overlapped = two_rank_step(path, dp=2, zero_stage=zero, overlap_grad_reduce=True).dp_comm_s
        serial = two_rank_step(path, dp=2, zero_stage=zero, overlap_grad_reduce=False).dp_comm_s
        assert (overlapped < serial) == hides and overlapped <= serial, zero

    def on_gpu(overlap: bool) -> float:
        gpu = request(gpus_per_node=2, dp=2, zero_stage=3, overlap_grad_reduce=overlap)
        gpu["cluster"]["gpu"] = "h100-sxm"
        return planner.estimate(gpu).breakdown.dp_comm_s

    assert on_gpu(True) < on_gpu(False)


def test_tensor_parallel_ranks_meet_for_the_gradient_norm_and_once_more_under_sequence_parallelism(save):
    """At tp 2 the gradient norm reduces the column-split and the row-split matrices: 2 meetings a step. Sequence
    parallelism leaves the norms' gradients partial, summed by one all-reduce a step: one meeting more."""
    fits = [fit("all_reduce", "intra_node", 2)]
    waiting = save(make_profile(collective_fits=fits, meeting_waits=[meeting_wait(4, 1e-3)]), "waits.json")
    never = save(make_profile(collective_fits=fits), "none.json")
    for plan, meetings in (({"tp": 2}, 2), ({"tp": 2, "sequence_parallel": True}, 3), ({"dp": 2}, 0)):
        extra = two_rank_step(waiting, **plan).tp_comm_s - two_rank_step(never, **plan).tp_comm_s
        assert extra == pytest.approx(meetings * 1e-3), plan


def test_sequence_parallel_norm_gradients_are_all_reduced_once_a_step(save):
    """4 blocks of 2 RMSNorms and the final norm, 128 fp32 weights each: one all-reduce of 4,608 bytes over tp
    (Megatron-LM's finalize_model_grads), at the profile's all_reduce fit; nothing without SP."""
    path = save(make_profile(collective_fits=[fit("all_reduce", "intra_node", 2, latency_s=1e-4, bandwidth_GBps=2.0)]))

    def per_step_s(**plan: Any) -> float:
        req = parse_estimate_request(request(path, gpus_per_node=2, **plan))
        batch = PlanBatch.of_plan(req.model, req.training, req.cluster, req.plan, measured=req.measured)
        return float(tp_step_comm_s(batch)[0, 0])

    norm_bytes = (2 * MODEL.num_layers + 1) * MODEL.hidden_size * FP32_BYTES
    ring = 2 * (2 - 1) / 2  # all-reduce bus factor for 2 ranks (nccl-tests)
    assert per_step_s(tp=2, sequence_parallel=True) == pytest.approx(1e-4 + ring * norm_bytes / 2e9)
    assert per_step_s(tp=2) == 0.0
