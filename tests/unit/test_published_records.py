"""planner.devset turns published runs of any stack, GPU and model family (the record schema of
../shared/data/dev-set.json) into contract requests and measured step times: what each record states, and what
the stack that ran it does by default where it does not (issue 28: check the model "as a new user would")."""

from __future__ import annotations

import json
from typing import Any

import pytest

from planner import estimate
from planner.cost.flops import hardware_flops_per_step
from planner.devset import (
    DEFAULT_PATH,
    UnsupportedRecord,
    load_records,
    published_run,
    training_runs,
    unsupported_runs,
)
from planner.specs import ModelSpec, TrainingSpec


def record(**overrides: Any) -> dict[str, Any]:
    """A training_run record in the dev set's schema: Llama 3 8B under torchtitan's FSDP2 on 64 H100."""
    base = {
        "id": "example_llama3_8b",
        "record_type": "training_run",
        "source": {"key": "example", "title": "an example benchmark", "location": "table 1"},
        "model": {
            "name": "Llama 3 8B",
            "params_b": 8.0,
            "layers": 32,
            "hidden": 4096,
            "heads": 32,
            "kv_heads": 8,
            "ffn_hidden": 14336,
            "seq_len": 8192,
            "vocab": 128256,
        },
        "cluster": {"gpu_type": "H100-SXM5-80GB", "num_gpus": 64, "interconnect": "8 GPUs per node"},
        "parallel": {
            "tp": 1,
            "pp": 1,
            "dp": 64,
            "cp": 1,
            "vp": None,
            "ep": None,
            "zero_or_fsdp": "FSDP2",
            "sequence_parallel": None,
            "micro_batch": 1,
            "global_batch": 64,
            "grad_accum": None,
            "recompute": "selective (per-op)",
            "schedule": None,
        },
        "precision": "bf16",
        "measured": {"tokens_per_s_per_gpu": 5000},
    }
    for path, value in overrides.items():
        *parents, leaf = path.split("__")
        holder = base
        for key in parents:
            holder = holder[key]
        holder[leaf] = value
    return base


def test_an_fsdp2_llama_run_is_a_llama_model_under_the_fsdp_regime():
    run = published_run(record())
    assert run is not None
    model, training, cluster, plan = (run.request[k] for k in ("model", "training", "cluster", "plan"))
    assert (model["mlp"], model["norm"], model["position_embedding"]) == ("swiglu", "rmsnorm", "rope")
    assert model["tie_embeddings"] is False and model["dropout"] == 0.0 and model["num_kv_heads"] == 8
    assert training == {"seq_len": 8192, "global_batch_size": 64, "precision": "bf16", "optimizer": "adamw",
                        "attention_kernel": "flash", "framework": "fsdp"}  # fmt: skip
    assert cluster == {"gpu": "h100-sxm", "num_nodes": 8, "gpus_per_node": 8}
    assert plan["zero_stage"] == 3 and plan["overlap_grad_reduce"] and plan["recompute"] == "selective"
    # 64 sequences of 8192 tokens at 5000 tokens/s on each of 64 GPUs
    assert run.step_time_s == pytest.approx(64 * 8192 / (5000 * 64))
    assert estimate(run.request).step_time_s > 0


@pytest.mark.parametrize(
    ("sharding", "stage"), [("FSDP FULL_SHARD", 3), ("FSDP SHARD_GRAD_OP", 2), ("FSDP NO_SHARD", 0)]
)
def test_fsdp_sharding_strategies_are_zero_stages(sharding, stage):
    run = published_run(record(parallel__zero_or_fsdp=sharding))
    assert run is not None and run.request["plan"]["zero_stage"] == stage
    assert run.request["training"]["framework"] == "fsdp"


def test_a_megatron_deepspeed_bloom_run_is_zero1_under_deepspeed_with_eager_attention():
    """BLOOM-176B (Megatron-DeepSpeed, ZeRO-1, A100): GeLU, LayerNorm, no dropout; Megatron's fused softmax on an
    A100; its TFLOP/s are model FLOPs, so the time is model FLOPs / (n x X)."""
    bloom = record(
        model={
            "name": "BLOOM 176B",
            "layers": 70,
            "hidden": 14336,
            "heads": 112,
            "kv_heads": None,
            "ffn_hidden": 57344,
            "seq_len": 2048,
            "vocab": 250880,
        },
        cluster={"gpu_type": "A100-SXM4-80GB", "num_gpus": 384, "interconnect": None},
        parallel__zero_or_fsdp="ZeRO-1 (Megatron-DeepSpeed)",
        parallel__tp=4,
        parallel__pp=12,
        parallel__dp=8,
        parallel__micro_batch=2,
        parallel__global_batch=2048,
        parallel__recompute="full",
        measured={"tflops_per_gpu": 150, "tflops_kind": "model FLOPs"},
    )
    run = published_run(bloom)
    assert run is not None
    model, training, plan = run.request["model"], run.request["training"], run.request["plan"]
    assert (model["mlp"], model["norm"], model["dropout"], model["num_kv_heads"]) == ("gelu", "layernorm", 0.0, 112)
    assert (training["framework"], training["attention_kernel"], training["precision"]) == (
        "deepspeed",
        "eager",
        "bf16",
    )
    assert (plan["zero_stage"], plan["tp"], plan["pp"], plan["dp"], plan["recompute"]) == (1, 4, 12, 8, "full")
    # Model FLOPs by hand: 3 x forward, forward = 24 B s l h^2 (1 + s / (6h)) + 2 B s h V.
    b, s, layers, h, v = 2048, 2048, 70, 14336, 250880
    flops = 3 * (24 * b * s * layers * h**2 * (1 + s / (6 * h)) + 2 * b * s * h * v)
    assert run.step_time_s == pytest.approx(flops / (384 * 150e12), rel=1e-3)


def test_a_mixtral_run_gets_its_experts_from_the_name_and_says_so():
    run = published_run(record(model__name="Mixtral 8x7B", parallel__ep=8, parallel__dp=64))
    assert run is not None
    assert (run.request["model"]["num_experts"], run.request["model"]["experts_per_token"]) == (8, 2)
    assert run.request["plan"]["ep"] == 8
    assert "experts_per_token=2" in run.filled_in


@pytest.mark.parametrize("name", ["T5-11B", "Flan-T5 XL", "BART-large", "BERT-large", "DHEN", "ViT-G"])
def test_models_that_are_not_decoders_are_named(name):
    with pytest.raises(UnsupportedRecord, match="^model.name: .*decoder-only"):
        published_run(record(model__name=name))


@pytest.mark.parametrize("name", ["GPT-NeoX-20B", "Pythia-12B", "Falcon-40B"])
def test_neox_style_models_rotate_with_a_gelu_mlp(name):
    model = published_run(record(model__name=name)).request["model"]
    assert (model["mlp"], model["norm"], model["position_embedding"]) == ("gelu", "layernorm", "rope")
    assert model["tie_embeddings"] is False and model["dropout"] == 0.0


def test_stated_architecture_fields_win_over_the_name():
    run = published_run(record(model__mlp="gelu", model__tie_embeddings=True))
    assert run is not None and run.request["model"]["mlp"] == "gelu" and run.request["model"]["tie_embeddings"]


@pytest.mark.parametrize(
    ("gpu_type", "preset"),
    [("H800 SXM5 80GB", "h800"), ("NVIDIA H800", "h800"), ("A800-SXM4-80GB", "a800-80gb"), ("H800 PCIe", "h100-pcie")],
)
def test_the_export_parts_run_on_their_own_presets(gpu_type, preset):
    """A800 and H800: the A100's and H100's compute with NVLink cut to 400 GB/s (planner/presets.py)."""
    run = published_run(record(cluster__gpu_type=gpu_type))
    assert run is not None and run.request["cluster"]["gpu"] == preset


def test_throughputs_convert_to_step_times():
    tokens = 64 * 8192
    assert published_run(record(measured={"tokens_per_s": 1e6})).step_time_s == pytest.approx(tokens / 1e6)
    assert published_run(record(measured={"samples_per_s": 16.0})).step_time_s == pytest.approx(64 / 16)
    assert published_run(record(measured={"iteration_time_s": 3.5})).step_time_s == 3.5
    assert published_run(record(measured={"notes": "no throughput"})) is None


@pytest.mark.parametrize("kind", ["hardware FLOPs incl. recompute", "HFU"])
def test_tflops_counted_with_recompute_are_the_runs_hardware_flops(kind):
    """Full recomputation repeats the forward: a figure that counts it is hardware FLOPs (model FLOPs + one more
    forward), not model FLOPs."""
    stated = {"tflops_per_gpu": 400.0, "tflops_kind": kind}
    full = published_run(record(measured=stated, parallel__recompute="full"))
    model = published_run(record(measured={"tflops_per_gpu": 400.0, "tflops_kind": "model FLOPs"}))
    spec = ModelSpec.model_validate(full.request["model"])
    flops = hardware_flops_per_step(spec, TrainingSpec.model_validate(full.request["training"]), "full")
    assert full.step_time_s == pytest.approx(flops / (64 * 400e12))
    assert full.step_time_s > model.step_time_s
    hfu = published_run(record(measured={"hfu": 0.5}, parallel__recompute="full"))
    assert hfu.step_time_s == pytest.approx(flops / (64 * 989.4e12 * 0.5))


def test_mfu_alone_is_model_flops_over_the_presets_peak():
    """Korthikanti et al. 2022's 530B run with full recomputation publishes only its MFU, 42.1%."""
    run = next(r for r in training_runs(sources=("korthikanti2022_530B_2240gpu_dp8_full",)))
    b, s, layers, h, v = 2240, 2048, 105, 20480, 51200
    flops = 3 * (24 * b * s * layers * h**2 * (1 + s / (6 * h)) + 2 * b * s * h * v)
    assert run.step_time_s == pytest.approx(flops / (2240 * 312e12 * 0.421), rel=1e-3)


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"cluster__gpu_type": "TPU v4"}, "cluster.gpu_type"),
        ({"precision": "fp8 (Transformer Engine)"}, "precision"),
        ({"parallel__recompute": "selective + microbatch-level"}, "parallel.recompute"),
        ({"model__hidden": None}, "model.hidden"),
        ({"cluster__num_gpus": None}, "cluster.num_gpus"),
        ({"parallel__zero_or_fsdp": "FSDP HYBRID_SHARD"}, "parallel.zero_or_fsdp"),
        ({"parallel__zero_or_fsdp": "HSDP (shard 8, replicate 8)"}, "parallel.zero_or_fsdp"),
    ],
)
def test_what_cannot_be_modelled_is_named_and_left_out(tmp_path, overrides, field):
    with pytest.raises(UnsupportedRecord, match=f"^{field}: "):
        published_run(record(**overrides))
    path = tmp_path / "runs.json"
    path.write_text(json.dumps({"about": "test", "records": [record(**overrides), record(id="fine")]}))
    assert [run.id for run in training_runs(path)] == ["fine"]
    assert list(unsupported_runs(path)) == ["example_llama3_8b"]


def test_the_dev_sets_megatron_runs_keep_their_2021_settings():
    """Narayanan et al. 2021 table 1, GPT 1.7B: fp16, eager attention, Megatron-LM, dropout 0.1, 4 DGX nodes
    (8 x 200 Gb/s HDR a node)."""
    first = next(r for r in load_records(DEFAULT_PATH) if r["id"] == "narayanan2021_t1_1.7B")
    run = published_run(first)
    assert run is not None
    assert run.request["training"]["precision"] == "fp16"
    assert run.request["training"]["attention_kernel"] == "eager"
    assert run.request["training"]["framework"] == "megatron"
    assert run.request["model"]["dropout"] == 0.1 and run.request["model"]["mlp"] == "gelu"
    assert run.request["cluster"] == {"gpu": "a100-80gb", "num_nodes": 4, "gpus_per_node": 8, "inter_node_GBps": 25.0}


def test_published_peak_memory_is_in_the_dev_sets_gigabytes():
    """`measured.memory_gb` counts 10^9 bytes, as the dev set's ZeRO example does (7.5B x 16 bytes = 120 GB)."""
    zero = next(r for r in load_records(DEFAULT_PATH) if r["id"] == "zero2020_fig1_baseline_DP")
    assert zero["measured"]["memory_gb"] * 1e9 == pytest.approx(7.5e9 * 16)
    run = published_run(record(measured={"iteration_time_s": 2.0, "memory_gb": 61.5}))
    assert run is not None and run.peak_memory_bytes == pytest.approx(61.5e9)
    assert published_run(record()).peak_memory_bytes is None


@pytest.mark.parametrize(
    ("interconnect", "per_gpu_GBps"),
    [
        ("NVLink; 4x100 Gb/s EFA per node, 8 GPUs per node", 400 / 8 / 8),  # AWS p4d-style: NICs x rate
        ("8x200 Gb/s HDR InfiniBand HCAs per node", 200 / 8),  # a DGX A100: the preset's own figure
        ("vTrain config: intra 150 GB/s, inter 800 Gb/s per node, 8 GPUs per node", 800 / 8 / 8),
        ("EFA 3.2 Tb/s, 8 GPUs per node", 3200 / 8 / 8),
        ("NVLink 600GB/s, 4x HDR 200Gbps", 800 / 8 / 8),  # Gbps, and a word between NICs and rate
        ("8 x ConnectX-7 400 Gb/s", 400 / 8),  # a NIC name with a digit in it
        ("p4d.24xlarge, 400 Gbps EFA", 400 / 8 / 8),  # EFA is quoted per instance
        ("AWS p5.48xlarge", 3200 / 8 / 8),  # the instance alone: its EFA
        ("RoCE 3.2 Tbps", 3200 / 8 / 8),
    ],
)
def test_the_nodes_network_is_shared_by_its_gpus(interconnect, per_gpu_GBps):
    run = published_run(record(cluster__interconnect=interconnect))
    assert run is not None and run.request["cluster"]["inter_node_GBps"] == pytest.approx(per_gpu_GBps)


def test_gpus_that_do_not_fill_nodes_of_8_fill_nodes_of_what_divides_both():
    run = published_run(
        record(cluster__num_gpus=12, cluster__interconnect=None, parallel__dp=12, parallel__global_batch=12)
    )
    assert (run.request["cluster"]["num_nodes"], run.request["cluster"]["gpus_per_node"]) == (3, 4)


def test_nvlinks_bytes_are_not_a_network():
    run = published_run(record(cluster__interconnect="NVLink 600 GB/s, 8 GPUs per node"))
    assert run is not None and "inter_node_GBps" not in run.request["cluster"]


@pytest.mark.parametrize(
    ("sharding", "schedule", "expected"),
    [
        ("FSDP2", None, {"schedule": "1f1b", "virtual_stages": 1}),  # torchtitan's default schedule
        ("ZeRO-1 (Megatron-DeepSpeed)", None, {"schedule": "1f1b", "virtual_stages": 1}),  # never interleaves
        ("none", None, {"schedule": "interleaved_1f1b", "virtual_stages": 2}),  # Megatron-LM: Narayanan's default
        ("FSDP2", "Interleaved 1F1B, 4 chunks", {"schedule": "interleaved_1f1b", "virtual_stages": 4}),
        ("FSDP2", "GPipe", {"schedule": "gpipe", "virtual_stages": 1}),
    ],
)
def test_the_pipeline_schedule_is_the_stated_one_or_the_stacks_default(sharding, schedule, expected):
    """32 layers on 4 stages (8 a stage: Megatron's unstated default takes the most chunks up to 3 dividing 8)."""
    run = published_run(record(parallel__zero_or_fsdp=sharding, parallel__schedule=schedule, parallel__pp=4,
                               parallel__dp=16))  # fmt: skip
    assert run is not None
    plan = {"schedule": "1f1b", "virtual_stages": 1} | run.request["plan"]
    assert {key: plan[key] for key in expected} == expected


def test_a_sharding_field_that_names_no_stack_leaves_it_to_the_sources_title():
    """torchtitan's paper, its sharding stated as "none": the FSDP stack, sharding nothing (ZeRO-0)."""
    run = published_run(record(parallel__zero_or_fsdp="none", source__title="torchtitan: one-stop PyTorch training"))
    assert run is not None and run.request["training"]["framework"] == "fsdp"
    assert run.request["plan"]["zero_stage"] == 0


@pytest.mark.parametrize(
    ("sharding", "stack"),
    [
        ("ZeRO-1", ("deepspeed", 1)),
        ("ZeRO-1 (Megatron-DeepSpeed)", ("deepspeed", 1)),
        ("Megatron-LM distributed optimizer (ZeRO-1)", ("megatron", 1)),
        ("distributed optimizer", ("megatron", 1)),
        ("none", ("megatron", 0)),
        # PyTorch's strategy names alone, and its DDP, are the FSDP stack's.
        ("FULL_SHARD", ("fsdp", 3)),
        ("SHARD_GRAD_OP", ("fsdp", 2)),
        ("DDP", ("fsdp", 0)),
    ],
)
def test_zero_stages_go_to_the_stack_that_ran_them(sharding, stack):
    run = published_run(record(parallel__zero_or_fsdp=sharding))
    assert run is not None
    assert (run.request["training"]["framework"], run.request["plan"]["zero_stage"]) == stack


@pytest.mark.parametrize(
    ("stated", "recompute"),
    [
        ("selective (per-op)", "selective"),
        ("SAC (op)", "selective"),
        ("activation checkpointing", "full"),
        (True, "full"),
        (False, "none"),
        ("no", "none"),
        ("off", "none"),
    ],
)
def test_recompute_as_records_state_it(stated, recompute):
    run = published_run(record(parallel__recompute=stated))
    assert run is not None and run.request["plan"]["recompute"] == recompute


def test_a_field_of_the_wrong_type_leaves_out_its_record_alone(tmp_path):
    odd = record(id="odd", precision=True)  # a boolean where the schema has text
    with pytest.raises(UnsupportedRecord, match="^record 'odd': "):
        published_run(odd)
    path = tmp_path / "runs.json"
    path.write_text(json.dumps({"about": "test", "records": [odd, record(id="fine")]}))
    assert [run.id for run in training_runs(path)] == ["fine"]
    assert list(unsupported_runs(path)) == ["odd"]


@pytest.mark.parametrize("stated", ["selective layer (every 2nd block)", "every other layer", "partial"])
def test_checkpointing_only_some_blocks_is_named(stated):
    with pytest.raises(UnsupportedRecord, match="^parallel.recompute: .*only some blocks"):
        published_run(record(parallel__recompute=stated))


@pytest.mark.parametrize(
    ("sharding", "offload"),
    [
        ("ZeRO-3", None),
        ("ZeRO-3 + CPU offload", "optimizer"),  # ZeRO-Offload
        ("ZeRO-3, offload optimizer and params to CPU", "optimizer_and_params"),  # ZeRO-Infinity's offload_param
        ("FSDP FULL_SHARD + CPU offload", "optimizer_and_params"),  # FSDP has no optimizer-only offload
        ("Megatron-LM distributed optimizer, optimizer CPU offload", "optimizer"),
    ],
)
def test_a_stated_cpu_offload_is_the_stacks_own(sharding, offload):
    run = published_run(record(parallel__zero_or_fsdp=sharding))
    assert run is not None and run.request["plan"].get("offload") == offload
    assert estimate(run.request).step_time_s > 0


@pytest.mark.parametrize(
    ("sharding", "grad_accum", "micro"),
    [
        ("FSDP2", None, 4),  # no accumulation stated: the whole per-rank batch, 256 / 64
        ("FSDP2", 2, 2),  # 256 / 64 over 2 accumulation steps
        ("none", 4, 1),  # stated accumulation, Megatron-LM
        ("none", None, 1),  # Megatron-LM, unstated: one sequence, as its papers' large runs
    ],
)
def test_an_unstated_micro_batch_follows_the_batch_and_the_stack(sharding, grad_accum, micro):
    run = published_run(record(parallel__zero_or_fsdp=sharding, parallel__micro_batch=None,
                               parallel__global_batch=256, parallel__grad_accum=grad_accum))  # fmt: skip
    assert run is not None and run.request["plan"]["micro_batch_size"] == micro
    assert f"micro_batch_size={micro}" in run.filled_in
