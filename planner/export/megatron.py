"""Megatron-LM: the argument list of `pretrain_gpt.py` (megatron/training/arguments.py; the flags that are
TransformerConfig / ModelParallelConfig fields are built from megatron/core's dataclasses by Megatron-LM's
ArgumentGroupFactory, so `--tensor-model-parallel-size` sets `tensor_model_parallel_size`).

One flag and its value per line, so `torchrun ... pretrain_gpt.py $(cat pretrain_gpt_args.txt) --data-path ...`
runs it; data, tokenizer, learning rate and checkpoint flags are the user's.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from planner.export.base import Exporter, Rendered, cannot, fixed

if TYPE_CHECKING:
    from planner.errors import Violation
    from planner.request import EstimateRequest
    from planner.specs import ModelSpec, ParallelPlan, TrainingSpec

Args = list[tuple[str, str | None]]  # (flag, value); None: a switch

# Megatron-LM's `--recompute-granularity full` recomputes whole layers; `uniform` with one layer per group is
# the plain per-layer checkpointing the cost model prices as `full` (arguments.py, --recompute-method help).
_FULL_RECOMPUTE: Args = [("--recompute-granularity", "full"), ("--recompute-method", "uniform"),
                         ("--recompute-num-layers", "1")]  # fmt: skip
# AttnBackend (megatron/core/transformer/enums.py): fused kernels that never store the score matrix, or the
# unfused softmax(QK^T)V.
_ATTENTION_BACKEND = {"flash": "flash", "eager": "unfused"}


def _refusals(req: EstimateRequest) -> list[Violation]:
    plan, model = req.plan, req.model
    found = []
    if plan.pp > 1 and plan.schedule == "gpipe":
        found.append(cannot("megatron", "plan.schedule", "its pipeline schedules are 1F1B and interleaved 1F1B "
                            "(megatron/core/pipeline_parallel/schedules.py); it has no GPipe schedule"))  # fmt: skip
    if model.linear_bias and not model.qkv_bias:
        found.append(cannot("megatron", "model.qkv_bias", "the QKV projection has a bias whenever the other "
                            "linear layers do (add_bias_linear); it cannot drop only the QKV bias"))  # fmt: skip
    return found


def model_args(model: ModelSpec, training: TrainingSpec) -> Args:
    """The model's shape: Megatron-LM's flag for each ModelSpec field."""
    args: Args = [("--num-layers", str(model.num_layers)), ("--hidden-size", str(model.hidden_size)),
                  ("--ffn-hidden-size", str(model.ffn_size)),
                  ("--num-attention-heads", str(model.num_attention_heads))]  # fmt: skip
    if model.kv_heads != model.num_attention_heads:
        args += [("--group-query-attention", None), ("--num-query-groups", str(model.kv_heads))]
    if model.head_size * model.num_attention_heads != model.hidden_size:
        args.append(("--kv-channels", str(model.head_size)))
    learned = model.position_embedding == "learned"
    positions = model.max_position_embeddings if learned else training.seq_len
    args += [("--seq-length", str(training.seq_len)), ("--max-position-embeddings", str(positions)),
             ("--position-embedding-type", "learned_absolute" if learned else "rope"),
             ("--normalization", "RMSNorm" if model.norm == "rmsnorm" else "LayerNorm"),
             ("--vocab-size", str(model.vocab_size)),
             ("--hidden-dropout", str(model.dropout)), ("--attention-dropout", str(model.dropout))]  # fmt: skip
    if model.num_experts > 1:
        args += [("--num-experts", str(model.num_experts)), ("--moe-router-topk", str(model.experts_per_token))]
    if model.mlp == "swiglu":
        args.append(("--swiglu", None))
    if not model.tie_embeddings:
        args.append(("--untie-embeddings-and-output-weights", None))
    if not model.linear_bias:
        args.append(("--disable-bias-linear", None))
        if model.qkv_bias:
            args.append(("--add-qkv-bias", None))
    return args


def pipeline_layout(counts: tuple[int, ...]) -> str:
    """Megatron-Core's pipeline layout string (megatron/core/transformer/pipeline_parallel_layer_layout.py): one
    `|`-separated entry per model chunk in pipeline order, `t*n` for n transformer layers, the embedding `E`
    first and the loss `L` last (commas are cosmetic)."""
    chunks = [f"t*{count}" if count else "" for count in counts]
    chunks[0] = ",".join(filter(None, ["E", chunks[0]]))
    chunks[-1] = ",".join(filter(None, [chunks[-1], "L"]))
    return "|".join(chunks)


def pipeline_args(plan: ParallelPlan, num_layers: int) -> Args:
    """Pipeline depth and its split: even chunks as layers per virtual stage; any other split as the layout."""
    if plan.pp == 1:
        return []
    args: Args = [("--pipeline-model-parallel-size", str(plan.pp))]
    counts = plan.stage_layer_counts(num_layers)
    if len(set(counts)) > 1:
        return [*args, ("--pipeline-model-parallel-layout", pipeline_layout(counts))]
    if plan.virtual_stages > 1:
        args.append(("--num-layers-per-virtual-pipeline-stage", str(counts[0])))
    return args


def parallel_args(plan: ParallelPlan, num_layers: int) -> Args:
    """The mesh (data parallelism is what is left of the world: world / (tp x pp x cp); expert parallelism within
    it) and ZeRO-1."""
    args: Args = [("--tensor-model-parallel-size", str(plan.tp))]
    args += pipeline_args(plan, num_layers)
    if plan.cp > 1:
        args.append(("--context-parallel-size", str(plan.cp)))
    if plan.ep > 1:
        # Megatron-Core takes the expert groups from the dp x cp ranks, as the plan does (DESIGN.md, rank layout).
        args.append(("--expert-model-parallel-size", str(plan.ep)))
    if plan.sequence_parallel:
        args.append(("--sequence-parallel", None))
    if plan.zero_stage == 1:
        args.append(("--use-distributed-optimizer", None))
    if plan.overlap_grad_reduce:
        args.append(("--overlap-grad-reduce", None))
    return args


def training_args(plan: ParallelPlan, training: TrainingSpec) -> Args:
    """Batch, recomputation, precision (fp16: Megatron's dynamic loss scaling, its default without
    --loss-scale), optimizer and attention kernel."""
    args: Args = [("--micro-batch-size", str(plan.micro_batch_size)),
                  ("--global-batch-size", str(training.global_batch_size))]  # fmt: skip
    if plan.recompute == "selective":
        args.append(("--recompute-granularity", "selective"))
    elif plan.recompute == "full":
        args += _FULL_RECOMPUTE
    if training.precision != "fp32":
        args.append((f"--{training.precision}", None))
    args.append(("--optimizer", "adam" if training.optimizer == "adamw" else "sgd"))
    args.append(("--attention-backend", _ATTENTION_BACKEND[training.attention_kernel]))
    return args


def megatron_args(req: EstimateRequest) -> Args:
    return [*parallel_args(req.plan, req.model.num_layers), *training_args(req.plan, req.training),
            *model_args(req.model, req.training)]  # fmt: skip


def _render(req: EstimateRequest) -> Rendered:
    lines = [flag if value is None else f"{flag} {value}" for flag, value in megatron_args(req)]
    notes = ("adam is Megatron-LM's AdamW (decoupled --weight-decay)",) if req.training.optimizer == "adamw" else ()
    return Rendered("\n".join(lines) + "\n", notes)


EXPORTER = Exporter(
    target="megatron",
    filename="pretrain_gpt_args.txt",
    media_type="text/plain",
    framework=fixed("megatron"),
    refusals=_refusals,
    render=_render,
)
