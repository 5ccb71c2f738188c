"""Activation recomputation (checkpointing) per transformer block.

- full: each block keeps only its input and reruns its whole forward during backward (Chen et al. 2016;
  Korthikanti et al. 2022 table 2): `checkpoint_wrapper`, non-reentrant, so it composes with DTensor, FSDP2
  and DDP and preserves the RNG state for dropout.
- selective: the attention core is recomputed (Korthikanti et al. 2022 sec. 5), the cost the planner's model
  charges (planner/cost/ops.py: ops with `attention_core`). Each block is wrapped the same way, but with torch's
  selective-checkpoint policy (torchtitan's "op-level SAC", minus its saving of attention): the outputs of the
  projections (`mm`, `addmm`) and of TP collectives are saved (MUST_SAVE); every other op is rerun
  (PREFER_RECOMPUTE): the attention core, whichever kernel SDPA picked (the CPU flash kernel, flash / efficient
  / cuDNN on GPUs, or the math fallback's bmm + softmax + dropout), and the element-wise ops around it (norms,
  RoPE, SiLU, residual adds), whose FLOPs are negligible next to the matmuls. So it keeps a little *less* than
  the planner assumes (norm and activation outputs are rerun too) at a negligible FLOP cost.
  Why not save every op but the core: the model's ops mutate fresh tensors in place (rms_norm's decomposition,
  dropout's mask), and torch refuses to hand a mutated cached tensor back ("Tensor cached during selective
  activation checkpoint has been mutated"). Why a policy at all: the model calls SDPA inline, there is no
  attention-core module to wrap. Works on CPU with plain and DTensor (TP/SP) blocks.
- none: nothing changes.
"""

from __future__ import annotations

from functools import cache, partial
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from executor.models import Transformer

# Outputs kept for backward; everything else in a block is recomputed. Matmuls are most of the FLOPs; the
# collectives are saved so that recompute does not talk to the other TP ranks again.
_SAVED_OPS = (
    ("aten", "mm"),
    ("aten", "addmm"),
    ("aten", "_scaled_mm"),
    ("_c10d_functional", "all_reduce"),
    ("_c10d_functional", "reduce_scatter_tensor"),
    ("_c10d_functional", "all_gather_into_tensor"),
)


@cache
def _saved_ops() -> frozenset[Any]:
    """The op overload packets in _SAVED_OPS that this torch build has."""
    import torch

    namespaces = {name: getattr(torch.ops, name) for name in {ns for ns, _ in _SAVED_OPS}}
    return frozenset(getattr(namespaces[ns], op) for ns, op in _SAVED_OPS if hasattr(namespaces[ns], op))


def _save_matmuls(ctx: Any, op: Any, *args: Any, **kwargs: Any) -> Any:
    from torch.utils.checkpoint import CheckpointPolicy

    packet = getattr(op, "overloadpacket", op)
    return CheckpointPolicy.MUST_SAVE if packet in _saved_ops() else CheckpointPolicy.PREFER_RECOMPUTE


def _wrapper(mode: str) -> Any:
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
    from torch.utils.checkpoint import create_selective_checkpoint_contexts

    if mode == "full":
        return checkpoint_wrapper
    selective = partial(create_selective_checkpoint_contexts, _save_matmuls)
    return partial(checkpoint_wrapper, context_fn=selective)


def apply_recompute(module: Transformer, mode: str) -> Transformer:
    """Wrap every block of `module` (a Transformer or a pipeline chunk) for recompute `mode`, in place."""
    if mode == "none":
        return module
    if mode not in ("full", "selective"):
        raise ValueError(f"recompute must be none, selective or full, got {mode!r}")
    wrap = _wrapper(mode)
    for key in list(module.layers):
        module.layers[key] = wrap(module.layers[key])
    return module
