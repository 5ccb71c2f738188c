"""DeepSpeed: `ds_config.json` (DeepSpeed's config reference, deepspeed/runtime/config.py and
deepspeed/runtime/zero/config.py): the batch, ZeRO stage, precision with its loss scaling, and AutoTP's degree.

The pipeline degree and the optimizer are not config keys: DeepSpeed takes them from code
(`deepspeed.pipe.PipelineModule(num_stages=...)`, `deepspeed.initialize(optimizer=...)`); the export's notes
say so.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from planner.export.base import Exporter, Rendered, cannot, fixed

if TYPE_CHECKING:
    from planner.errors import Violation
    from planner.request import EstimateRequest
    from planner.specs import ParallelPlan, TrainingSpec

# DeepSpeed's dynamic loss scaling for fp16 (`loss_scale: 0` turns it on): start at 2^16, halve on overflow
# after `hysteresis` overflows, double after `loss_scale_window` clean steps; its documented defaults
# (deepspeed/runtime/fp16/loss_scaler.py, DynamicLossScaler).
FP16_INITIAL_SCALE_POWER = 16
FP16_LOSS_SCALE_WINDOW_STEPS = 1000
FP16_HYSTERESIS_OVERFLOWS = 2
FP16_MIN_LOSS_SCALE = 1


def _refusals(req: EstimateRequest) -> list[Violation]:
    plan = req.plan
    found = []
    if plan.cp > 1:
        found.append(cannot("deepspeed", "plan.cp", "its sequence parallelism is Ulysses (an all-to-all over "
                            "attention heads), not the ring attention that context parallelism prices"))  # fmt: skip
    if plan.sequence_parallel:
        found.append(cannot("deepspeed", "plan.sequence_parallel", "AutoTP replicates norms and dropout; it "
                            "does not split activations over the sequence"))  # fmt: skip
    if plan.pp > 1 and plan.schedule != "1f1b":
        found.append(cannot("deepspeed", "plan.schedule", "its pipeline engine runs one 1F1B schedule "
                            "(deepspeed/runtime/pipe/schedule.py TrainSchedule)"))  # fmt: skip
    if plan.pp > 1 and len(set(plan.stage_layer_counts(req.model.num_layers))) > 1:
        found.append(cannot("deepspeed", "plan.layers_per_stage", "PipelineModule partitions 'uniform' or by "
                            "parameter count, not by a list of layer counts"))  # fmt: skip
    if plan.recompute == "selective":
        found.append(cannot("deepspeed", "plan.recompute", "deepspeed.checkpointing recomputes whole layers; "
                            "it has no selective (attention-only) recomputation"))  # fmt: skip
    return found


def precision_section(training: TrainingSpec) -> dict[str, Any]:
    if training.precision == "bf16":
        return {"bf16": {"enabled": True}}
    if training.precision == "fp16":
        return {"fp16": {"enabled": True, "loss_scale": 0, "initial_scale_power": FP16_INITIAL_SCALE_POWER,
                         "loss_scale_window": FP16_LOSS_SCALE_WINDOW_STEPS, "hysteresis": FP16_HYSTERESIS_OVERFLOWS,
                         "min_loss_scale": FP16_MIN_LOSS_SCALE}}  # fmt: skip
    return {}


def zero_section(plan: ParallelPlan) -> dict[str, Any]:
    """ZeRO's stage; `overlap_comm` overlaps its gradient reductions with backward, as the plan's
    overlap_grad_reduce says; no offload (the plan keeps model states on the GPU)."""
    section: dict[str, Any] = {"stage": plan.zero_stage, "overlap_comm": plan.overlap_grad_reduce}
    if plan.zero_stage >= 2:
        section["contiguous_gradients"] = True
    return section


def ds_config(req: EstimateRequest) -> dict[str, Any]:
    plan, training = req.plan, req.training
    config: dict[str, Any] = {
        "train_batch_size": training.global_batch_size,
        "train_micro_batch_size_per_gpu": plan.micro_batch_size,
        "gradient_accumulation_steps": plan.num_microbatches(training),
        "zero_optimization": zero_section(plan),
        **precision_section(training),
    }
    if plan.tp > 1:
        config["tensor_parallel"] = {"autotp_size": plan.tp}
    return config


def _notes(req: EstimateRequest) -> tuple[str, ...]:
    plan = req.plan
    notes = [f"optimizer: pass torch.optim.{'AdamW' if req.training.optimizer == 'adamw' else 'SGD'} to "
             "deepspeed.initialize (its lr and schedule are yours)"]  # fmt: skip
    if plan.pp > 1:
        notes.append(f"pp={plan.pp}: build the model as deepspeed.pipe.PipelineModule(layers, num_stages={plan.pp}, "
                     "partition_method='uniform')")  # fmt: skip
    if plan.recompute == "full":
        notes.append("recompute=full: wrap each transformer layer in deepspeed.checkpointing.checkpoint")
    if plan.tp > 1 or plan.pp > 1:
        notes.append("train_batch_size counts the data-parallel ranks only: pass the model-parallel groups (mpu) "
                     "to deepspeed.initialize")  # fmt: skip
    return tuple(notes)


def _render(req: EstimateRequest) -> Rendered:
    return Rendered(json.dumps(ds_config(req), indent=2) + "\n", _notes(req))


EXPORTER = Exporter(
    target="deepspeed",
    filename="ds_config.json",
    media_type="application/json",
    framework=fixed("deepspeed"),
    refusals=_refusals,
    render=_render,
)
