"""Hugging Face Accelerate: the config YAML `accelerate launch --config_file` reads
(accelerate/commands/config/config_args.py ClusterConfig). Accelerate runs data parallelism through one of three
back ends, chosen here by the plan's ZeRO stage: DDP (`MULTI_GPU`, ZeRO-0), DeepSpeed ZeRO-1 (`DEEPSPEED`) or
PyTorch FSDP2 (`FSDP`, ZeRO-2 and 3), so the export is estimated under the `fsdp` or `deepspeed` regime.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from planner.export.base import Exporter, Rendered, cannot
from planner.export.formats import yaml_text

if TYPE_CHECKING:
    from planner.errors import Violation
    from planner.request import EstimateRequest
    from planner.specs import ParallelPlan

_MIXED_PRECISION = {"bf16": "bf16", "fp16": "fp16", "fp32": "no"}


def framework(req: EstimateRequest) -> str:
    return "deepspeed" if req.plan.zero_stage == 1 else "fsdp"


def _refusals(req: EstimateRequest) -> list[Violation]:
    plan = req.plan
    found = [
        cannot(
            "accelerate",
            f"plan.{axis}",
            f"{axis}={getattr(plan, axis)}: paraplan exports Accelerate's "
            "data-parallel configs (DDP, DeepSpeed ZeRO, FSDP2) only; export this plan to megatron, deepspeed "
            "or torchtitan",
        )  # fmt: skip
        for axis in ("tp", "pp", "cp")
        if getattr(plan, axis) > 1
    ]
    if plan.recompute == "selective":
        found.append(cannot("accelerate", "plan.recompute", "its activation checkpointing (FSDP's, or the "
                            "model's gradient_checkpointing_enable) recomputes whole layers"))  # fmt: skip
    return found


def distributed_type(plan: ParallelPlan) -> str:
    if plan.zero_stage == 1:
        return "DEEPSPEED"
    if plan.zero_stage >= 2:
        return "FSDP"
    return "MULTI_GPU" if plan.num_gpus > 1 else "NO"


def backend_section(req: EstimateRequest) -> dict[str, Any]:
    """The back end's own section: DeepSpeed's stage and accumulation, or FSDP2's resharding and checkpointing."""
    plan = req.plan
    if plan.zero_stage == 1:
        steps = plan.num_microbatches(req.training)
        return {"deepspeed_config": {"zero_stage": 1, "gradient_accumulation_steps": steps,
                                     "offload_optimizer_device": "none", "offload_param_device": "none",
                                     "zero3_init_flag": False}}  # fmt: skip
    if plan.zero_stage >= 2:
        return {"fsdp_config": {"fsdp_version": 2, "fsdp_reshard_after_forward": plan.zero_stage == 3,
                                "fsdp_auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
                                "fsdp_activation_checkpointing": plan.recompute == "full",
                                "fsdp_state_dict_type": "SHARDED_STATE_DICT"}}  # fmt: skip
    return {}


def launch_config(req: EstimateRequest) -> dict[str, Any]:
    plan, cluster = req.plan, req.cluster
    return {
        "compute_environment": "LOCAL_MACHINE",
        "distributed_type": distributed_type(plan),
        "num_machines": cluster.num_nodes,
        "num_processes": plan.num_gpus,
        "machine_rank": 0,
        "main_training_function": "main",
        "mixed_precision": _MIXED_PRECISION[req.training.precision],
        "use_cpu": False,
        **backend_section(req),
    }


def _notes(req: EstimateRequest) -> tuple[str, ...]:
    plan = req.plan
    notes = [f"batch: a DataLoader of batch_size={plan.micro_batch_size} per process"]
    if plan.zero_stage != 1:
        notes.append(f"Accelerator(gradient_accumulation_steps={plan.num_microbatches(req.training)})")
    if plan.recompute == "full" and plan.zero_stage < 2:
        notes.append("recompute=full: call model.gradient_checkpointing_enable()")
    return tuple(notes)


def _render(req: EstimateRequest) -> Rendered:
    return Rendered(yaml_text(launch_config(req)), _notes(req))


EXPORTER = Exporter(
    target="accelerate",
    filename="accelerate_config.yaml",
    media_type="application/yaml",
    framework=framework,
    refusals=_refusals,
    render=_render,
)
