"""planner/export: each export is read back by its stack's own code, installed on CPU (the `dev` extra, .ci/setup):

- Megatron-LM: every flag is one of pretrain_gpt.py's (fixtures/megatron_lm_flags.txt, read from its source), and
  the flags that are Megatron-Core config fields build a real `TransformerConfig` (whose checks run), the way
  Megatron-LM's `core_transformer_config_from_args` builds it; the values outside that config are in a golden file.
- DeepSpeed: `DeepSpeedConfig` (batch arithmetic, ZeRO, precision) and `DeepSpeedZeroConfig`.
- torchtitan: its `ConfigManager` loads the TOML (strict: an unknown key fails).
- Accelerate: `accelerate launch`'s own reading of the config file, and the plugin it then builds from it.
- The contract request: request -> export -> request gives the same estimate.

fixtures/megatron_lm_flags.txt was made from NVIDIA/Megatron-LM at the commit its header names: the literal flags of
megatron/training/arguments.py plus `--field-name` (and `--no-`/`--disable-`) for each field of the config
dataclasses its ArgumentGroupFactory turns into flags.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import shlex
import sys
import tomllib
import types
from pathlib import Path
from typing import Any

import pytest

import planner
from planner.errors import InfeasiblePlanError
from planner.export import TARGETS, UnknownTargetError, export_plan
from planner.request import EstimateRequest, parse_estimate_request

FIXTURES = Path(__file__).parent / "fixtures"
MEGATRON_FLAGS = {
    line for line in (FIXTURES / "megatron_lm_flags.txt").read_text().splitlines() if line.startswith("--")
}

LLAMA_8B_16_GPUS: dict[str, Any] = {
    "model": {"name": "llama3-8b"},
    "training": {"seq_len": 4096, "global_batch_size": 64},
    "cluster": {"gpu": "h100-sxm", "num_nodes": 2, "gpus_per_node": 8},
}


def request(base: dict[str, Any] = LLAMA_8B_16_GPUS, **plan: Any) -> EstimateRequest:
    return parse_estimate_request({**base, "plan": plan})


def refused_fields(req: EstimateRequest, to: str) -> set[str]:
    with pytest.raises(InfeasiblePlanError) as refused:
        export_plan(req, to)
    assert refused.value.reason == "not_expressible"
    assert all(to in v.message for v in refused.value.violations), refused.value
    return {v.field for v in refused.value.violations}


# =============================================================================================== Megatron-LM


def megatron_flags(text: str) -> dict[str, str | bool]:
    """`--flag value` and `--switch` tokens of an argument list -> {flag: value or True}."""
    tokens, flags = shlex.split(text), {}
    for index, token in enumerate(tokens):
        if token.startswith("--"):
            following = tokens[index + 1] if index + 1 < len(tokens) else "--"
            flags[token] = following if not following.startswith("--") else True
    return flags


def _number_or_text(value: str | bool) -> Any:
    for kind in (int, float):
        try:
            return kind(value)
        except ValueError:
            continue
    return value


def transformer_config(flags: dict[str, str | bool]) -> Any:
    """Megatron-Core's TransformerConfig of these flags, built as Megatron-LM's `core_transformer_config_from_args`
    (megatron/training/argument_utils.py) builds it: every flag named like a config field sets it; --bf16/--fp16
    set the params and pipeline dtypes (validate_args), --swiglu the gated SiLU unit, --disable-bias-linear
    clears add_bias_linear, --attention-backend names an AttnBackend, and --num-layers-per-virtual-pipeline-stage
    gives the virtual pipeline size (num_layers / pp / that), --num-experts num_moe_experts."""
    import torch
    import torch.nn.functional as F
    from megatron.core.transformer import TransformerConfig
    from megatron.core.transformer.enums import AttnBackend

    fields = {field.name for field in dataclasses.fields(TransformerConfig)}
    named = {flag[2:].replace("-", "_"): value for flag, value in flags.items()}
    kwargs = {name: _number_or_text(value) for name, value in named.items() if name in fields}
    dtype = torch.bfloat16 if "bf16" in named else torch.float16 if "fp16" in named else torch.float32
    kwargs |= {"params_dtype": dtype, "pipeline_dtype": dtype}
    kwargs["attention_backend"] = AttnBackend[named["attention_backend"]]
    if "swiglu" in named:
        kwargs |= {"gated_linear_unit": True, "activation_func": F.silu}
    if "num_experts" in named:
        kwargs["num_moe_experts"] = int(named["num_experts"])
    if "disable_bias_linear" in named:
        kwargs["add_bias_linear"] = False
    if "num_layers_per_virtual_pipeline_stage" in named:
        per_rank = int(named["num_layers"]) // int(named["pipeline_model_parallel_size"])
        kwargs["virtual_pipeline_model_parallel_size"] = per_rank // int(named["num_layers_per_virtual_pipeline_stage"])
    return TransformerConfig(**kwargs)


MEGATRON_PLANS: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "3d, sequence parallel, distributed optimizer, selective": (
        LLAMA_8B_16_GPUS, {"tp": 4, "pp": 2, "zero_stage": 1, "sequence_parallel": True, "recompute": "selective"}),
    "interleaved, even chunks, full recompute": (
        LLAMA_8B_16_GPUS, {"tp": 2, "pp": 4, "schedule": "interleaved_1f1b", "virtual_stages": 2, "recompute": "full"}),
    "uneven split, interleaved": (
        LLAMA_8B_16_GPUS, {"tp": 4, "pp": 2, "schedule": "interleaved_1f1b", "virtual_stages": 2,
                           "layers_per_stage": [7, 9, 9, 7]}),
    "mixture of experts": (
        {"model": {"num_layers": 8, "hidden_size": 1024, "num_attention_heads": 8, "vocab_size": 32000,
                   "mlp": "swiglu", "norm": "rmsnorm", "num_experts": 8, "experts_per_token": 2},
         "training": {"seq_len": 2048, "global_batch_size": 32},
         "cluster": {"gpu": "h100-sxm", "num_nodes": 1, "gpus_per_node": 8}},
        {"tp": 2, "pp": 2, "sequence_parallel": True, "zero_stage": 1, "ep": 2}),
    "gpt3 with biases, learned positions, fp16, context parallel": (
        {"model": {"name": "gpt3-1.7b"}, "training": {"seq_len": 2048, "global_batch_size": 32, "precision": "fp16"},
         "cluster": {"gpu": "v100-sxm2-32gb", "num_nodes": 1, "gpus_per_node": 8}},
        {"tp": 2, "cp": 2, "sequence_parallel": True}),
}  # fmt: skip


@pytest.mark.parametrize("case", MEGATRON_PLANS)
def test_megatron_args_are_pretrain_gpt_flags_that_build_megatron_cores_config(case: str) -> None:
    base, plan = MEGATRON_PLANS[case]
    req = request(base, **plan)
    exported = export_plan(req, "megatron")
    assert exported.framework == "megatron" and exported.request.training.framework == "megatron"
    flags = megatron_flags(exported.text)
    assert set(flags) <= MEGATRON_FLAGS, set(flags) - MEGATRON_FLAGS
    config = transformer_config(flags)
    plan_ = req.plan
    assert (config.tensor_model_parallel_size, config.pipeline_model_parallel_size, config.context_parallel_size) == (
        plan_.tp, plan_.pp, plan_.cp)  # fmt: skip
    assert config.sequence_parallel == plan_.sequence_parallel
    assert config.virtual_pipeline_model_parallel_size == (plan_.virtual_stages if plan_.virtual_stages > 1 else None)
    assert config.recompute_granularity == (None if plan_.recompute == "none" else plan_.recompute)
    model = req.model
    assert (config.num_layers, config.hidden_size, config.ffn_hidden_size) == (
        model.num_layers, model.hidden_size, model.ffn_size)  # fmt: skip
    assert (config.num_query_groups or config.num_attention_heads) == model.kv_heads
    assert config.add_bias_linear == model.linear_bias and config.gated_linear_unit == (model.mlp == "swiglu")
    assert (config.num_moe_experts or 1, config.moe_router_topk if config.num_moe_experts else 1) == (
        model.num_experts, model.experts_per_token)  # fmt: skip
    assert config.expert_model_parallel_size == plan_.ep
    assert ("--expert-model-parallel-size" in flags) == (plan_.ep > 1)
    assert ("--use-distributed-optimizer" in flags) == (plan_.zero_stage == 1)
    assert int(flags["--global-batch-size"]) == req.training.global_batch_size
    assert int(flags["--micro-batch-size"]) == plan_.micro_batch_size


def test_megatron_layout_puts_each_chunk_s_layers_on_its_stage() -> None:
    from megatron.core.transformer.pipeline_parallel_layer_layout import PipelineParallelLayerLayout

    req = request(tp=4, pp=2, schedule="interleaved_1f1b", virtual_stages=2, layers_per_stage=[7, 9, 9, 7])
    layout = megatron_flags(export_plan(req, "megatron").text)["--pipeline-model-parallel-layout"]
    stages = PipelineParallelLayerLayout.parse_str_to_list(layout)
    assert [sum(layer.name == "decoder" for layer in stage) for stage in stages] == [7, 9, 9, 7]
    assert stages[0][0].name == "embedding" and stages[-1][-1].name == "loss"


def test_megatron_args_of_gpt3_175b_match_the_golden_file() -> None:
    """What no Megatron-Core config holds (batch, optimizer, precision switches, sequence length): the whole
    list for the paper's GPT-3 175B plan (Narayanan et al. 2021, table 1: tp 8, pp 8, 1536 sequences)."""
    base = {"model": {"name": "gpt3-175b"}, "training": {"seq_len": 2048, "global_batch_size": 1536},
            "cluster": {"gpu": "a100-80gb", "num_nodes": 128, "gpus_per_node": 8}}  # fmt: skip
    req = request(base, tp=8, pp=8, zero_stage=1, sequence_parallel=True, recompute="selective")
    golden = (FIXTURES / "export" / "megatron_gpt3_175b.txt").read_text()
    assert export_plan(req, "megatron").text == golden


def test_megatron_refuses_what_it_cannot_run() -> None:
    assert refused_fields(request(tp=4, pp=4, schedule="gpipe"), "megatron") == {"plan.schedule"}
    assert refused_fields(request(tp=4, pp=2, zero_stage=3), "megatron") == {"plan.zero_stage"}


# ================================================================================================ DeepSpeed


ONE_GPU_1B = {"model": {"name": "llama3.2-1b"}, "training": {"seq_len": 2048, "global_batch_size": 16},
              "cluster": {"gpu": "h100-sxm", "num_nodes": 1, "gpus_per_node": 1}}  # fmt: skip
TWO_V100 = {"model": {"name": "llama3.2-1b"},
            "training": {"seq_len": 2048, "global_batch_size": 16, "precision": "fp16"},
            "cluster": {"gpu": "v100-sxm2-32gb", "num_nodes": 1, "gpus_per_node": 2}}  # fmt: skip


@pytest.mark.parametrize(
    ("base", "plan"),
    [(ONE_GPU_1B, {"zero_stage": 3, "micro_batch_size": 2}), (ONE_GPU_1B, {"zero_stage": 2, "micro_batch_size": 4}),
     (TWO_V100, {"tp": 2, "zero_stage": 1, "micro_batch_size": 1})],
)  # fmt: skip
def test_ds_config_is_read_by_deepspeeds_config(base: dict[str, Any], plan: dict[str, Any]) -> None:
    """Without a process group DeepSpeed counts one data-parallel rank, so these plans have dp = 1 and its batch
    check (train = micro x accumulation x dp ranks) runs on them as written."""
    from deepspeed.runtime.config import DeepSpeedConfig

    req = request(base, **plan)
    exported = export_plan(req, "deepspeed")
    assert exported.framework == "deepspeed" and exported.filename == "ds_config.json"
    config = DeepSpeedConfig(json.loads(exported.text))
    assert config.zero_optimization_stage == req.plan.zero_stage
    assert config.train_batch_size == req.training.global_batch_size
    assert config.train_micro_batch_size_per_gpu == req.plan.micro_batch_size
    assert config.gradient_accumulation_steps == req.plan.num_microbatches(req.training)
    assert config.bfloat16_config.enabled == (req.training.precision == "bf16")
    assert config.float16_config.enabled == (req.training.precision == "fp16")
    if config.float16_config.enabled:  # dynamic loss scaling, from 2^16
        assert config.float16_config.loss_scale == 0 and config.float16_config.initial_scale_power == 16
    assert config.tensor_parallel_config.autotp_size == (req.plan.tp if req.plan.tp > 1 else 0)


def test_ds_config_of_a_data_parallel_plan_keeps_the_batch_over_its_ranks() -> None:
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    req = request(zero_stage=3, micro_batch_size=2)  # dp = 16
    config = json.loads(export_plan(req, "deepspeed").text)
    zero = DeepSpeedZeroConfig(**config["zero_optimization"])
    assert int(zero.stage) == 3 and zero.overlap_comm is True
    assert config["train_batch_size"] == (
        config["train_micro_batch_size_per_gpu"] * config["gradient_accumulation_steps"] * req.plan.dp
    )


def test_deepspeed_refuses_what_it_cannot_run() -> None:
    assert refused_fields(request(tp=4, pp=2, zero_stage=2), "deepspeed") == {"plan.zero_stage"}
    assert refused_fields(request(cp=2, tp=4, sequence_parallel=True), "deepspeed") == {
        "plan.cp", "plan.sequence_parallel"}  # fmt: skip
    assert refused_fields(request(tp=2, pp=4, recompute="selective", schedule="gpipe"), "deepspeed") == {
        "plan.recompute", "plan.schedule"}  # fmt: skip


# =============================================================================================== torchtitan


def torchtitan_config_manager() -> Any:
    """torchtitan's ConfigManager (torchtitan/config/manager.py). Its package's __init__ imports the model zoo
    (MoE kernels need triton, about 1 GB) which reading a config does not use; the config package is loaded from
    torchtitan's own files under a bare parent package instead."""
    if "torchtitan" not in sys.modules:
        spec = importlib.util.find_spec("torchtitan")
        assert spec is not None and spec.submodule_search_locations, "torchtitan is not installed (.ci/setup)"
        package = types.ModuleType("torchtitan")
        package.__path__ = list(spec.submodule_search_locations)
        sys.modules["torchtitan"] = package
    from torchtitan.config import ConfigManager

    return ConfigManager()


@pytest.mark.parametrize(
    "plan",
    [{"tp": 4, "pp": 2, "zero_stage": 3, "sequence_parallel": True, "schedule": "interleaved_1f1b",
      "virtual_stages": 2, "recompute": "full"},
     {"tp": 2, "pp": 2, "zero_stage": 2, "sequence_parallel": True, "layers_per_stage": [15, 17]},
     {"zero_stage": 0, "micro_batch_size": 2, "recompute": "selective"}],
)  # fmt: skip
def test_torchtitan_toml_is_read_by_its_config_manager(tmp_path: Path, plan: dict[str, Any]) -> None:
    req = request(**plan)
    exported = export_plan(req, "torchtitan")
    assert exported.framework == "fsdp"
    path = tmp_path / exported.filename
    path.write_text(exported.text)
    job = torchtitan_config_manager().parse_args(["--job.config_file", str(path)])
    parallel, plan_ = job.parallelism, req.plan
    data_parallel = parallel.data_parallel_replicate_degree * parallel.data_parallel_shard_degree
    assert (data_parallel, parallel.tensor_parallel_degree, parallel.pipeline_parallel_degree) == (
        plan_.dp, plan_.tp, plan_.pp)  # fmt: skip
    assert job.activation_checkpoint.mode == plan_.recompute
    assert job.training.global_batch_size == req.training.global_batch_size and job.training.seq_len == 4096
    assert job.model.name == "llama3" and job.model.flavor == "8B"
    if plan_.pp > 1:
        parts = parallel.module_fqns_per_model_part
        layers = [int(name.split(".")[1]) for part in parts for name in part if name.startswith("layers.")]
        assert layers == list(range(req.model.num_layers))  # every layer once, in order
        assert [sum(name.startswith("layers.") for name in part) for part in parts] == list(
            plan_.stage_layer_counts(req.model.num_layers))  # fmt: skip
        microbatches = job.training.local_batch_size // parallel.pipeline_parallel_microbatch_size
        assert microbatches == plan_.num_microbatches(req.training)
    else:
        accumulation = job.training.global_batch_size // (job.training.local_batch_size * data_parallel)
        assert accumulation == plan_.num_microbatches(req.training)


def test_torchtitan_refuses_what_it_cannot_run() -> None:
    gpt_fp16 = {"model": {"name": "gpt3-1.7b"},
                "training": {"seq_len": 2048, "global_batch_size": 32, "precision": "fp16"},
                "cluster": {"gpu": "v100-sxm2-32gb", "num_nodes": 1, "gpus_per_node": 8}}  # fmt: skip
    assert refused_fields(request(gpt_fp16, zero_stage=3), "torchtitan") == {"model.mlp", "training.precision"}
    # ZeRO-2 under TP and PP is what torchtitan runs; ZeRO-1 (optimizer-only sharding) it has not
    zero_1 = request(tp=4, pp=2, zero_stage=1, sequence_parallel=True)
    assert refused_fields(zero_1, "torchtitan") == {"plan.zero_stage"}
    assert refused_fields(request(tp=4, zero_stage=3), "torchtitan") == {"plan.sequence_parallel"}
    moe_base = MEGATRON_PLANS["mixture of experts"][0]
    assert refused_fields(request(moe_base, zero_stage=3), "torchtitan") == {"model.num_experts"}
    assert refused_fields(request(tp=4, zero_stage=0, sequence_parallel=True), "torchtitan") == {"plan.zero_stage"}


# =============================================================================================== Accelerate


def accelerate_launch_environment(config_file: Path) -> tuple[Any, dict[str, str]]:
    """What `accelerate launch --config_file F train.py` makes of the file: its arguments and the environment its
    launcher hands the workers (accelerate/commands/launch.py `launch_command`)."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env

    args = launch_command_parser().parse_args(["--config_file", str(config_file), "train.py"])
    args, defaults, precision_from_config = _validate_launch_command(args)
    if not args.use_deepspeed:
        return args, prepare_multi_gpu_env(args)
    fields = [*defaults.deepspeed_config, *(["mixed_precision"] if precision_from_config else [])]
    args.deepspeed_fields_from_accelerate_config = ",".join(fields)  # as launch_command sets it
    return args, prepare_deepspeed_cmd_env(args)[1]


ONE_NODE_8B = {**LLAMA_8B_16_GPUS, "cluster": {"gpu": "h100-sxm", "num_nodes": 1, "gpus_per_node": 8}}


@pytest.mark.parametrize(
    ("plan", "framework"),
    [({"zero_stage": 3, "micro_batch_size": 2, "recompute": "full"}, "fsdp"),
     ({"zero_stage": 2, "micro_batch_size": 1}, "fsdp"),
     ({"zero_stage": 1, "micro_batch_size": 2}, "deepspeed"),
     ({"zero_stage": 0, "micro_batch_size": 1}, "fsdp")],
)  # fmt: skip
def test_accelerate_config_is_read_by_accelerate_launch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, plan: dict[str, Any], framework: str
) -> None:
    from accelerate.utils import DeepSpeedPlugin, FullyShardedDataParallelPlugin

    req = request(ONE_NODE_8B, **plan)
    exported = export_plan(req, "accelerate")
    assert exported.framework == framework
    path = tmp_path / exported.filename
    path.write_text(exported.text)
    args, environment = accelerate_launch_environment(path)
    assert args.num_processes == 8 and args.mixed_precision == "bf16"
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    zero = req.plan.zero_stage
    assert (args.use_fsdp, args.use_deepspeed, args.multi_gpu) == (zero >= 2, zero == 1, zero == 0)
    if zero >= 2:
        fsdp = FullyShardedDataParallelPlugin()
        assert fsdp.fsdp_version == 2 and fsdp.reshard_after_forward == (zero == 3)
        assert fsdp.activation_checkpointing == (req.plan.recompute == "full")
    if zero == 1:
        deepspeed = DeepSpeedPlugin()
        assert deepspeed.zero_stage == 1
        assert deepspeed.gradient_accumulation_steps == req.plan.num_microbatches(req.training)


def test_accelerate_refuses_model_parallel_plans() -> None:
    assert refused_fields(request(tp=4, pp=2, zero_stage=3, sequence_parallel=True), "accelerate") == {
        "plan.tp", "plan.pp"}  # fmt: skip


# ======================================================================================= request, regimes


@pytest.mark.parametrize(
    "base",
    [LLAMA_8B_16_GPUS,
     {**LLAMA_8B_16_GPUS, "model": {"name": "llama3-8b", "num_layers": 8}},  # a preset with overrides
     {**LLAMA_8B_16_GPUS, "training": {**LLAMA_8B_16_GPUS["training"], "framework": "megatron"}}],
)  # fmt: skip
def test_request_export_round_trips_to_the_same_estimate(base: dict[str, Any]) -> None:
    req = request(base, tp=4, pp=2, zero_stage=1, sequence_parallel=True, recompute="selective")
    exported = export_plan(req, "request")
    assert exported.framework == req.training.framework
    again = parse_estimate_request(json.loads(exported.text))
    assert again == req
    # Everything but `assumptions`, whose text says whether training.framework was given or defaulted: the export
    # writes it out.
    assert numbers(planner.estimate(again)) == numbers(planner.estimate(req))
    assert export_plan(again, "request").text == exported.text


def numbers(estimate: Any) -> dict[str, Any]:
    return estimate.model_dump(exclude={"assumptions"})


def test_an_exported_plan_is_estimated_under_its_stacks_regime() -> None:
    """The same plan costs what each stack's regime says (planner/cost/runtime.py): ZeRO-3 under DeepSpeed's
    and under FSDP's (torchtitan's) accounting of model states differ; each export's request estimates as the
    original request with that framework."""
    req = request(zero_stage=3, micro_batch_size=1)
    estimates = {}
    for to, framework in (("deepspeed", "deepspeed"), ("torchtitan", "fsdp")):
        exported = export_plan(req, to)
        same_with_framework = request(
            {**LLAMA_8B_16_GPUS, "training": {**LLAMA_8B_16_GPUS["training"], "framework": framework}},
            zero_stage=3, micro_batch_size=1)  # fmt: skip
        estimates[to] = planner.estimate(exported.request)
        assert estimates[to] == planner.estimate(same_with_framework)
    assert estimates["deepspeed"] != estimates["torchtitan"]


def test_a_plan_that_runs_nowhere_is_invalid_not_inexpressible() -> None:
    broken = request(tp=3)  # 3 divides neither the 32 heads nor the 16 GPUs
    for to in TARGETS:
        with pytest.raises(InfeasiblePlanError) as refused:
            export_plan(broken, to)
        assert refused.value.reason == "invalid_plan"
        assert {v.field for v in refused.value.violations} >= {"plan.tp"}


def test_an_unknown_target_is_refused_by_name() -> None:
    with pytest.raises(UnknownTargetError, match="one of megatron, deepspeed, torchtitan, accelerate, request"):
        export_plan(request(), "nemo")
    assert TARGETS == ("megatron", "deepspeed", "torchtitan", "accelerate", "request")


def test_toml_and_yaml_writers_quote_what_would_read_back_as_another_type() -> None:
    import yaml

    from planner.export.formats import toml_text, yaml_text

    values = {"text": "no", "number": "1e3", "flag": True, "count": 3, "ratio": 0.5, "nested": [["a", "b"], ["c"]]}
    assert tomllib.loads(toml_text({"section": values})) == {"section": values}
    flat = {key: value for key, value in values.items() if key != "nested"}
    assert yaml.safe_load(yaml_text({"outer": flat, **flat})) == {"outer": flat, **flat}


# ================================================================================================ the CLI


def cli(*args: Any) -> Any:
    from typer.testing import CliRunner

    from api.cli import app

    return CliRunner().invoke(app, [str(arg) for arg in args])


def request_file(tmp_path: Path, base: dict[str, Any], name: str = "request.json", **plan: Any) -> Path:
    path = tmp_path / name
    path.write_text(json.dumps({**base, "plan": plan}))
    return path


def test_cli_export_writes_the_file_to_stdout_and_the_estimate_to_stderr(tmp_path: Path) -> None:
    path = request_file(tmp_path, ONE_GPU_1B, zero_stage=0, micro_batch_size=1)
    result = cli("export", path, "--to", "deepspeed")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["zero_optimization"]["stage"] == 0
    assert "estimated as training.framework=deepspeed" in result.stderr and "fits" in result.stderr
    assert "set in code: optimizer" in result.stderr


def test_cli_export_out_and_json(tmp_path: Path) -> None:
    path = request_file(tmp_path, ONE_GPU_1B, zero_stage=3, micro_batch_size=1)
    out = tmp_path / "job.toml"
    result = cli("export", path, "--to", "torchtitan", "--out", out)
    assert result.exit_code == 0, result.output
    assert out.read_text() == export_plan(parse_estimate_request(json.loads(path.read_text())), "torchtitan").text
    assert "torchtitan (torchtitan.toml), estimated as training.framework=fsdp" in result.stdout
    answer = json.loads(cli("export", path, "--to", "torchtitan", "--json").stdout)
    assert answer["content"] == out.read_text() and answer["framework"] == "fsdp"
    assert answer["estimate"]["fits"] is True and answer["request"]["training"]["framework"] == "fsdp"


def test_cli_export_refusals_exit_1_naming_the_field(tmp_path: Path) -> None:
    path = request_file(tmp_path, LLAMA_8B_16_GPUS, tp=4, pp=2, zero_stage=1, sequence_parallel=True)
    unknown = cli("export", path, "--to", "nemo")
    assert unknown.exit_code == 1 and "to: unknown export target 'nemo'" in unknown.stderr
    refused = cli("export", path, "--to", "torchtitan")
    assert refused.exit_code == 1 and refused.stdout == ""
    assert "cannot run this plan" in refused.stderr and "plan.zero_stage: torchtitan" in refused.stderr
    both = cli("export", path, "--plan-id", "0" * 32, "--to", "request")
    assert both.exit_code == 1 and "not both" in both.stderr
    no_target = cli("export", path)
    assert no_target.exit_code == 1 and "--to" in no_target.stderr


def test_estimate_and_export_exit_2_when_the_plan_does_not_fit(tmp_path: Path) -> None:
    """Llama 3 8B on one 80 GB GPU without sharding: 16 bytes of model states per parameter alone is 128 GB."""
    one_gpu_8b = {**LLAMA_8B_16_GPUS, "cluster": {"gpu": "h100-sxm", "num_nodes": 1, "gpus_per_node": 1}}
    too_big = request_file(tmp_path, one_gpu_8b, zero_stage=0)
    estimate = cli("estimate", too_big, "--json")
    assert estimate.exit_code == 2 and json.loads(estimate.stdout)["fits"] is False
    exported = cli("export", too_big, "--to", "megatron")
    assert exported.exit_code == 2 and "does NOT fit" in exported.stderr
    assert "--num-layers 32" in exported.stdout  # the file is still written
    fits = cli("estimate", request_file(tmp_path, ONE_GPU_1B, "small.json", zero_stage=0), "--json")
    assert fits.exit_code == 0 and json.loads(fits.stdout)["fits"] is True


def test_plan_save_request_writes_the_best_plan_that_estimate_takes_back(tmp_path: Path) -> None:
    search = tmp_path / "search.json"
    search.write_text(json.dumps({**ONE_NODE_8B, "search": {"top_k": 2}}))
    saved = tmp_path / "best.json"
    searched = cli("plan", search, "--json", "--save-request", saved)
    assert searched.exit_code == 0, searched.output
    best = json.loads(searched.stdout)["plans"][0]
    request_ = json.loads(saved.read_text())
    assert request_["plan"] == best["plan"] and request_["model"] == {"name": "llama3-8b"}
    estimated = cli("estimate", saved, "--json")
    assert estimated.exit_code == 0
    assert json.loads(estimated.stdout)["step_time_s"] == pytest.approx(best["estimate"]["step_time_s"])
    assert cli("export", saved, "--to", "request").stdout == saved.read_text()


def test_cli_exports_a_search_stored_by_the_service(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from api.service import PlanSearches
    from api.store import ApiStore
    from profiler.store import DATABASE_URL_ENV

    url = f"sqlite:///{tmp_path / 'paraplan.db'}"
    monkeypatch.setenv(DATABASE_URL_ENV, url)
    store = ApiStore(url)
    searches = PlanSearches(store)
    body = {**ONE_NODE_8B, "search": {"top_k": 2}}
    row = searches.store(body, *searches.search(body))
    ranked = json.loads(row.result)["plans"]
    store.close()
    result = cli("export", "--plan-id", row.id, "--rank", len(ranked), "--to", "request")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["plan"] == ranked[-1]["plan"]
    beyond = cli("export", "--plan-id", row.id, "--rank", len(ranked) + 1, "--to", "request")
    assert beyond.exit_code == 1 and "--rank" in beyond.stderr
