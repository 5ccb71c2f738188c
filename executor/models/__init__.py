"""Reference transformers built from a planner ModelSpec (Llama-style, GPT-style, and their hybrids).

`build_model(spec)` returns a `Transformer` whose parameter count equals `planner.cost.params.model_params(spec)`
and whose FQNs stay stable under pipeline pruning; `init_weights(model, seed)` initialises it deterministically.
"""

from __future__ import annotations

from executor.models.init import canonical_fqn, init_weights
from executor.models.layers import Attention, FeedForward, MoEFeedForward, apply_rotary, rotary_cos_sin
from executor.models.transformer import Transformer, TransformerBlock, build_model, next_token_loss

__all__ = [
    "Attention",
    "FeedForward",
    "MoEFeedForward",
    "Transformer",
    "TransformerBlock",
    "apply_rotary",
    "build_model",
    "canonical_fqn",
    "init_weights",
    "next_token_loss",
    "rotary_cos_sin",
]
