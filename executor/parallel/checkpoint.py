"""Activation recomputation (checkpointing) per transformer block.

- full: each block keeps only its input and reruns its whole forward during backward (Chen et al. 2016;
  Korthikanti et al. 2022 table 2).
- selective: each block's attention core (`attention.core`, softmax(QK^T)V) keeps only its inputs Q, K and V
  and is rerun during backward; everything else keeps what it saves (Korthikanti et al. 2022 sec. 5). That is
  exactly what the planner charges (planner/cost/ops.py: the ops marked `attention_core` are dropped and
  recomputed), and the saved bytes agree with it (tests/validation/test_saved_activations.py).
- none: nothing changes.

Both wrap with `checkpoint_wrapper`, non-reentrant, so it composes with DTensor (the core sees local tensors),
FSDP2 and DDP, and it preserves the RNG state for attention dropout. The core has no parameters, so wrapping it
leaves every parameter's FQN unchanged.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch import nn

    from executor.models import Transformer

RECOMPUTE_MODES = ("none", "selective", "full")


def recompute_block(block: nn.Module, mode: str) -> nn.Module:
    """`block` (a TransformerBlock) prepared for recompute `mode`: the wrapped block (full), the same block with
    its attention core wrapped (selective), or the block itself (none)."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    if mode not in RECOMPUTE_MODES:
        raise ValueError(f"recompute must be none, selective or full, got {mode!r}")
    if mode == "full":
        return checkpoint_wrapper(block)
    if mode == "selective":
        block.attention.core = checkpoint_wrapper(block.attention.core)
    return block


def apply_recompute(module: Transformer, mode: str) -> Transformer:
    """Prepare every block of `module` (a Transformer or a pipeline chunk) for recompute `mode`, in place."""
    for key in list(module.layers):
        module.layers[key] = recompute_block(module.layers[key], mode)
    return module
