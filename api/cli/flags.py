"""The flags of `estimate` and `plan`, and the contract request they build: a request file's fields, overridden
and filled by the flags given (the request is the commands' options record: api/commands/estimate.py)."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from api.commands.flags import flag_name
from api.commands.inputs import model_from_flag
from api.errors import InputError

# Each `estimate` flag (by its parameter name) -> where its value goes in the contract request. `--model`
# is not here: it replaces the whole `model` section (see _model_from_flag).
FLAG_FIELDS: dict[str, tuple[str, str]] = {
    "gpu": ("cluster", "gpu"),
    "nodes": ("cluster", "num_nodes"),
    "gpus_per_node": ("cluster", "gpus_per_node"),
    "intra_node_GBps": ("cluster", "intra_node_GBps"),
    "inter_node_GBps": ("cluster", "inter_node_GBps"),
    "host_link_GBps": ("cluster", "host_link_GBps"),
    "host_memory_per_node_bytes": ("cluster", "host_memory_per_node_bytes"),
    "profile": ("cluster", "profile"),
    "seq_len": ("training", "seq_len"),
    "global_batch": ("training", "global_batch_size"),
    "precision": ("training", "precision"),
    "optimizer": ("training", "optimizer"),
    "attention": ("training", "attention_kernel"),
    "framework": ("training", "framework"),
    "dp": ("plan", "dp"),
    "tp": ("plan", "tp"),
    "pp": ("plan", "pp"),
    "cp": ("plan", "cp"),
    "ep": ("plan", "ep"),
    "zero": ("plan", "zero_stage"),
    "mbs": ("plan", "micro_batch_size"),
    "sp": ("plan", "sequence_parallel"),
    "recompute": ("plan", "recompute"),
    "schedule": ("plan", "schedule"),
    "virtual_stages": ("plan", "virtual_stages"),
    "layers_per_stage": ("plan", "layers_per_stage"),
    "offload": ("plan", "offload"),
    "top": ("search", "top_k"),
    "max_memory_fraction": ("search", "max_memory_fraction"),
    "memory_safety": ("search", "memory_safety"),
}


# Flags that change the GPU count or the model-parallel degrees: after one of them, a `plan.dp` read from the
# file no longer matches, so it is dropped and inferred again (unless --dp is given).
_RESHAPING_FLAGS = ("nodes", "gpus_per_node", "tp", "pp", "cp")


# What an estimate cannot do without, and the flag that supplies it.
_REQUIRED: tuple[tuple[str, str | None, str], ...] = (
    ("model", None, "--model"),
    ("cluster", "gpu", "--gpu"),
    ("training", "seq_len", "--seq-len"),
    ("training", "global_batch_size", "--global-batch"),
)


def flag_for_field(field: str) -> str | None:
    """The flag that sets a contract field (or the section holding it), for error messages."""
    if field == "model" or field.startswith("model."):
        return "--model"
    for parameter, (section, name) in FLAG_FIELDS.items():
        if field == f"{section}.{name}" or field.startswith(f"{section}.{name}."):
            return flag_name(parameter)
    return None


def build_request(
    base: dict[str, Any], model_flag: str | None, flags: dict[str, Any], command: str = "estimate"
) -> dict[str, Any]:
    """The contract request: the file's fields (`base`), overridden and filled by the flags given.

    `estimate` takes a `plan` (and ignores a file's `search`); `plan` takes a `search`, where the plan flags
    fix fields (`--tp 8` -> search.fixed.tp), and ignores a file's `plan`."""
    dropped = "search" if command == "estimate" else "plan"
    request = {key: value for key, value in base.items() if key != dropped}
    for section in ("training", "cluster", "plan" if command == "estimate" else "search"):
        value = request.get(section, {})
        # A section that is not an object is left as it is, for validation to name it.
        request[section] = dict(value) if isinstance(value, dict) else value
    if model_flag is not None:
        request["model"] = model_from_flag(model_flag)
    given = {name: value for name, value in flags.items() if value is not None}
    if command == "estimate":
        _drop_stale_dp(request, given)
    for name, value in given.items():
        section, field = FLAG_FIELDS[name]
        holder = request[section] if command == "estimate" or section != "plan" else _fixed_section(request)
        if isinstance(holder, dict):
            holder[field] = value
    _require_inputs(request)
    return request


def _drop_stale_dp(request: dict[str, Any], given: dict[str, Any]) -> None:
    if "dp" not in given and any(name in given for name in _RESHAPING_FLAGS) and isinstance(request["plan"], dict):
        request["plan"].pop("dp", None)


def _fixed_section(request: dict[str, Any]) -> dict[str, Any] | Any:
    """`search.fixed` of a plan request, created when absent (left alone when it is not an object)."""
    search = request["search"]
    if not isinstance(search, dict):
        return search
    fixed = search.get("fixed", {})
    search["fixed"] = dict(fixed) if isinstance(fixed, dict) else fixed
    return search["fixed"]


def _require_inputs(request: dict[str, Any]) -> None:
    missing = []
    for section, field, flag in _REQUIRED:
        holder = request if field is None else request.get(section)
        key = section if field is None else field
        if not isinstance(holder, dict) or holder.get(key) is None:
            path = section if field is None else f"{section}.{field}"
            missing.append({"field": path, "flag": flag, "message": f"required: pass {flag} or set {path}"})
    if missing:
        raise InputError("missing required input", kind="missing_input", fields=missing)


def parse_layers_per_stage(text: str | None) -> list[int] | None:
    if text is None:
        return None
    try:
        return [int(part) for part in text.split(",")]
    except ValueError:
        raise InputError(
            f"--layers-per-stage takes comma-separated layer counts such as 10,12,12,10; got {text!r}"
        ) from None


# Options `estimate` and `plan` share: the model, the training setup and the cluster.
ModelOption = Annotated[
    str | None,
    typer.Option(
        "--model",
        help="Preset name, ModelSpec JSON file, Hugging Face config.json or Hub id (owner/name), or inline JSON {...}.",
    ),
]


GpuOption = Annotated[str | None, typer.Option("--gpu", help="GPU preset, e.g. a100-80gb, h100-sxm.")]


NodesOption = Annotated[int | None, typer.Option("--nodes", help="Nodes (default 1).")]


GpusPerNodeOption = Annotated[int | None, typer.Option("--gpus-per-node", help="GPUs per node (default 8).")]


SeqLenOption = Annotated[int | None, typer.Option("--seq-len", help="Tokens per sequence.")]


GlobalBatchOption = Annotated[int | None, typer.Option("--global-batch", help="Sequences per optimizer step.")]


PrecisionOption = Annotated[
    str | None,
    typer.Option(
        "--precision",
        help="bf16 (default; fp16 on GPUs without bf16 such as the V100; fp32 with --gpu cpu), fp16 or fp32.",
    ),
]


OptimizerOption = Annotated[str | None, typer.Option("--optimizer", help="adamw (default) or sgd.")]


FrameworkOption = Annotated[
    str | None,
    typer.Option(
        "--framework",
        help="The stack that runs the plan: megatron, deepspeed, fsdp (torchtitan, Accelerate) or paraplan (default).",
    ),
]


AttentionOption = Annotated[str | None, typer.Option("--attention", help="flash (default) or eager attention kernel.")]


IntraNodeOption = Annotated[
    float | None, typer.Option("--intra-node-GBps", help="Override the GPU's intra-node link, GB/s.")
]


InterNodeOption = Annotated[
    float | None, typer.Option("--inter-node-GBps", help="Override the GPU's inter-node link, GB/s.")
]


HostLinkOption = Annotated[
    float | None,
    typer.Option("--host-link-GBps", help="Override the GPU's PCIe rate to host memory (CPU offload), GB/s."),
]


HostMemoryOption = Annotated[
    int | None,
    typer.Option(
        "--host-memory-per-node-bytes", help="Override a node's RAM (CPU offload; default: the GPU's DGX/HGX node)."
    ),
]


ProfileOption = Annotated[
    str | None,
    typer.Option("--profile", help="A HardwareProfile file or stored id (paraplan profile): plan from measurements."),
]


# The plan's fields, which `estimate` sets and `plan` keeps fixed while it searches the rest.
DpOption = Annotated[
    int | None, typer.Option(help="Data-parallel degree (estimate's default: GPUs / (tp x pp x cp)); plan: kept fixed.")
]


TpOption = Annotated[int | None, typer.Option(help="Tensor-parallel degree; plan: kept fixed.")]


PpOption = Annotated[int | None, typer.Option(help="Pipeline-parallel degree; plan: kept fixed.")]


CpOption = Annotated[int | None, typer.Option(help="Context-parallel degree; plan: kept fixed.")]


EpOption = Annotated[
    int | None,
    typer.Option(help="Expert-parallel degree (MoE: divides num_experts and dp x cp); plan: kept fixed."),
]


ZeroOption = Annotated[int | None, typer.Option(help="ZeRO stage 0-3; plan: kept fixed.")]


MbsOption = Annotated[int | None, typer.Option(help="Micro-batch size (sequences); plan: kept fixed.")]


SpOption = Annotated[
    bool | None, typer.Option("--sp/--no-sp", help="Sequence parallelism (needs tp > 1); plan: kept on or off.")
]


RecomputeOption = Annotated[str | None, typer.Option(help="none, selective or full; plan: kept fixed.")]


ScheduleOption = Annotated[str | None, typer.Option(help="gpipe, 1f1b or interleaved_1f1b; plan: kept fixed.")]


OffloadOption = Annotated[
    str | None,
    typer.Option(
        help="CPU offload: none, optimizer (ZeRO-Offload; zero >= 1) or optimizer_and_params (ZeRO-3); "
        "plan: kept fixed."
    ),
]


VirtualStagesOption = Annotated[
    int | None, typer.Option(help="Model chunks per device (interleaved); plan: kept fixed.")
]
