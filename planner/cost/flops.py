"""FLOPs of a training step: model FLOPs (what the model needs) and hardware FLOPs (with recomputation).

Conventions follow Narayanan et al. 2021 (sec. 5.1, eq. 3) and Chowdhery et al. 2022 (PaLM, appendix B,
"model FLOPs utilization"): a multiply-add is 2 FLOPs, backward is 2x forward, the attention score matrix
is counted whole (causal masking not discounted), and model FLOPs exclude recomputation.
"""

from __future__ import annotations

from planner.cost.ops import ACTIVATION_BYTES, OpCost, SelectivePolicy, Shape, block_ops, head_ops, recomputed_ops
from planner.specs import ModelSpec, TrainingSpec


def one_sequence(model: ModelSpec, training: TrainingSpec) -> Shape:
    """The shape of one whole sequence on one unsplit GPU: the unit model FLOPs are counted in."""
    return Shape(
        tokens=training.seq_len,
        seq=training.seq_len,
        key_len=training.seq_len,
        heads=model.num_attention_heads,
        tp=1,
        sp_div=1,
        elem=ACTIVATION_BYTES[training.precision],
        mask=1,
    )


def forward_flops(ops: list[OpCost]) -> float:
    return sum(op.matmul_flops for op in ops)


def model_flops_per_step(model: ModelSpec, training: TrainingSpec) -> float:
    """3 x forward FLOPs of every block and the LM head, for every sequence of the global batch."""
    shape = one_sequence(model, training)
    per_sequence = model.num_layers * forward_flops(block_ops(model, training, shape))
    per_sequence += forward_flops(head_ops(model, shape))
    return 3 * per_sequence * training.global_batch_size


def recompute_flops_per_step(
    model: ModelSpec, training: TrainingSpec, recompute: str, policy: SelectivePolicy = "attention_core"
) -> float:
    """Forward FLOPs repeated in backward: all block FLOPs (full), or what the stack's selective policy repeats
    (`recomputed_ops`: the attention core, or torchtitan's op-level share)."""
    ops = block_ops(model, training, one_sequence(model, training))
    repeated = recomputed_ops(ops, recompute, policy)
    return model.num_layers * forward_flops(repeated) * training.global_batch_size


def hardware_flops_per_step(
    model: ModelSpec, training: TrainingSpec, recompute: str, policy: SelectivePolicy = "attention_core"
) -> float:
    return model_flops_per_step(model, training) + recompute_flops_per_step(model, training, recompute, policy)


def narayanan_eq3_flops(model: ModelSpec, training: TrainingSpec) -> float:
    """Narayanan et al. 2021, eq. 3: F = 96 B s l h^2 (1 + s/(6h) + V/(16 l h)), full recomputation included.

    Exact for GPT models with f = 4h and multi-head attention; tests compare it with the per-op count."""
    b, s, layers = training.global_batch_size, training.seq_len, model.num_layers
    h, v = model.hidden_size, model.vocab_size
    return 96 * b * s * layers * h**2 * (1 + s / (6 * h) + v / (16 * layers * h))
