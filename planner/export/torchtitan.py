"""torchtitan: its job TOML (`--job.config_file`, torchtitan/config/job_config.py of the TOML releases, 0.1 and
0.2): the [parallelism] mesh, [activation_checkpoint] mode and the [training] batch. torchtitan runs PyTorch
FSDP2, so an export is estimated under the `fsdp` regime.

torchtitan's models are defined in Python, named by `[model] name` and `flavor`; its TOML cannot describe a shape,
so a model that is not one of its Llama 3 flavors is named by its own name, which the user registers as a flavor.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from planner.export.base import Exporter, Rendered, cannot, fixed
from planner.export.formats import toml_text

if TYPE_CHECKING:
    from planner.errors import Violation
    from planner.request import EstimateRequest
    from planner.specs import ModelSpec, ParallelPlan, TrainingSpec

# torchtitan/models/llama3/__init__.py `llama3_configs`: the flavors our presets match.
_LLAMA3_FLAVORS = {"llama3-8b": "8B", "llama3-70b": "70B", "llama3-405b": "405B"}
# torch.distributed.pipelining's schedule classes, by the names torchtitan looks them up with.
_SCHEDULES = {"gpipe": "GPipe", "1f1b": "1F1B", "interleaved_1f1b": "Interleaved1F1B"}
# fully_shard's reshard_after_forward: ZeRO-3 frees the gathered weights after forward, ZeRO-2 keeps them.
_RESHARD = {2: "never", 3: "always"}
_MIXED_PRECISION = {"bf16": "bfloat16", "fp32": "float32"}


def _refusals(req: EstimateRequest) -> list[Violation]:
    plan, model, training = req.plan, req.model, req.training
    found = []
    if not (model.mlp == "swiglu" and model.norm == "rmsnorm" and model.position_embedding == "rope"):
        shape = f"{model.mlp}, {model.norm}, {model.position_embedding} positions"
        found.append(cannot("torchtitan", "model.mlp", f"its dense decoder is Llama's (SwiGLU, RMSNorm, RoPE); "
                            f"this model has {shape}"))  # fmt: skip
    if model.num_experts > 1:
        found.append(cannot("torchtitan", "model.num_experts", "its llama3 model is dense; its mixture-of-experts "
                            "models (deepseek_v3, llama4) have their own shapes and flavors"))  # fmt: skip
    if training.optimizer != "adamw":
        found.append(
            cannot(
                "torchtitan",
                "training.optimizer",
                "its optimizers are Adam and AdamW (torchtitan/components/optimizer.py)",
            )
        )
    if training.precision == "fp16":
        found.append(cannot("torchtitan", "training.precision", "it trains in bfloat16 or float32; it has no fp16 "
                            "loss scaling"))  # fmt: skip
    if plan.tp > 1 and not plan.sequence_parallel:
        found.append(cannot("torchtitan", "plan.sequence_parallel", "its tensor-parallel plan always splits norms "
                            "and dropout over the sequence; set sequence_parallel"))  # fmt: skip
    if plan.zero_stage == 0 and (plan.tp > 1 or plan.pp > 1 or plan.cp > 1):
        found.append(cannot("torchtitan", "plan.zero_stage", "it runs DDP (zero_stage 0) only without tp, pp "
                            "and cp ('DDP has not supported > 1D parallelism'); use zero_stage 2 or 3"))  # fmt: skip
    return found


def module_fqns(counts: tuple[int, ...]) -> list[list[str]]:
    """The modules of each model chunk, in pipeline order (`module_fqns_per_model_part`): the embedding with the
    first chunk, the final norm and output head with the last."""
    parts, first_layer = [], 0
    for count in counts:
        parts.append([f"layers.{layer}" for layer in range(first_layer, first_layer + count)])
        first_layer += count
    parts[0].insert(0, "tok_embeddings")
    parts[-1] += ["norm", "output"]
    return parts


def parallelism(plan: ParallelPlan, num_layers: int) -> dict[str, Any]:
    """The mesh: DDP replicates over dp (ZeRO-0), FSDP shards over it (ZeRO-2/3)."""
    sharded = plan.zero_stage in _RESHARD
    section: dict[str, Any] = {
        "data_parallel_replicate_degree": 1 if sharded else plan.dp,
        "data_parallel_shard_degree": plan.dp if sharded else 1,
        "tensor_parallel_degree": plan.tp,
        "pipeline_parallel_degree": plan.pp,
        "context_parallel_degree": plan.cp,
    }
    if sharded:
        section["fsdp_reshard_after_forward"] = _RESHARD[plan.zero_stage]
    if plan.pp > 1:
        section["pipeline_parallel_schedule"] = _SCHEDULES[plan.schedule]
        section["pipeline_parallel_microbatch_size"] = plan.micro_batch_size
        section["module_fqns_per_model_part"] = module_fqns(plan.stage_layer_counts(num_layers))
    return section


def training_section(plan: ParallelPlan, training: TrainingSpec) -> dict[str, Any]:
    """torchtitan's `local_batch_size` is what one data-parallel rank runs per optimizer step before gradient
    accumulation: with pipelining the whole replica batch (split into micro-batches by the schedule), without it
    one micro-batch (accumulated global / (local x dp) times)."""
    per_replica = training.global_batch_size // plan.dp
    return {
        "local_batch_size": per_replica if plan.pp > 1 else plan.micro_batch_size,
        "global_batch_size": training.global_batch_size,
        "seq_len": training.seq_len,
        "mixed_precision_param": _MIXED_PRECISION[training.precision],
    }


def activation_checkpoint(plan: ParallelPlan) -> dict[str, Any]:
    """`selective` with option `op`: torchtitan's per-op policy, which keeps matmul and attention outputs and
    recomputes the rest; the closest it has to Korthikanti et al.'s selective recomputation."""
    if plan.recompute == "selective":
        return {"mode": "selective", "selective_ac_option": "op"}
    return {"mode": plan.recompute}


def flavor(model: ModelSpec) -> str:
    return _LLAMA3_FLAVORS.get(model.name or "", model.name or "custom")


def job_sections(req: EstimateRequest) -> dict[str, dict[str, Any]]:
    return {
        "model": {"name": "llama3", "flavor": flavor(req.model)},
        "optimizer": {"name": "AdamW"},
        "training": training_section(req.plan, req.training),
        "parallelism": parallelism(req.plan, req.model.num_layers),
        "activation_checkpoint": activation_checkpoint(req.plan),
    }


def _render(req: EstimateRequest) -> Rendered:
    notes = []
    if req.model.name not in _LLAMA3_FLAVORS:
        notes.append(f"model: register a llama3 flavor {flavor(req.model)!r} with this shape "
                     "(torchtitan/models/llama3/__init__.py)")  # fmt: skip
    return Rendered(toml_text(job_sections(req)), tuple(notes))


EXPORTER = Exporter(
    target="torchtitan",
    filename="torchtitan.toml",
    media_type="application/toml",
    framework=fixed("fsdp"),
    refusals=_refusals,
    render=_render,
)
