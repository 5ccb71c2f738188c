"""A reference decoder-only transformer built from any planner ModelSpec: Llama-style or GPT-style.

Llama (Touvron et al. 2023): RMSNorm, RoPE, SwiGLU, GQA, no biases. GPT-2 (Radford et al. 2019): LayerNorm,
learned positions, GELU, biases, tied head, dropout. Both are pre-norm; the spec's fields pick each piece, so
hybrids (GPT-NeoX, Qwen2, Mixtral) come out of the same code. Parameter counts equal
`planner.cost.params.model_params(spec)` exactly (tests/unit/test_models.py checks every preset).

Module names (FQNs) are those of torchtitan's Llama, which the tensor-parallel plan and the notes in
shared/notes/torch-distributed-on-cpu.md use: `tok_embeddings`, `layers.<i>.attention.wq`, ...,
`layers.<i>.feed_forward.w1`, `norm`, `output`.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from executor.models.init import init_weights
from executor.models.layers import Attention, make_dropout, make_mlp, make_norm
from planner.specs import ModelSpec


class TransformerBlock(nn.Module):
    """Pre-norm block: x + drop(attention(norm(x))), then h + drop(mlp(norm(h))) (Radford et al. 2019, sec. 2.3)."""

    def __init__(self, spec: ModelSpec, **factory: Any) -> None:
        super().__init__()
        self.attention_norm = make_norm(spec, **factory)
        self.attention = Attention(spec, **factory)
        self.attention_dropout = make_dropout(spec.dropout)  # GPT-2's resid_pdrop after the output projection
        self.ffn_norm = make_norm(spec, **factory)
        self.feed_forward = make_mlp(spec, **factory)
        self.ffn_dropout = make_dropout(spec.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x + self.attention_dropout(self.attention(self.attention_norm(x)))
        return h + self.ffn_dropout(self.feed_forward(self.ffn_norm(h)))


class Transformer(nn.Module):
    """Embeddings, blocks in an `nn.ModuleDict` keyed "0".."L-1", final norm and LM head.

    Pipeline stages are pruned copies (torchtitan style): delete `layers` entries and set `tok_embeddings`
    (with `pos_embeddings`) or `norm`/`output` to None. FQNs of what remains do not change, and `forward`
    skips what is missing: without `tok_embeddings` its input is the previous stage's hidden states, without
    `output` it returns hidden states.

    Learned positions are added to the token embeddings, so the embedding's output must hold the whole
    sequence: under sequence parallelism keep `tok_embeddings` output replicated and shard at the first block.
    A tied head shares its Parameter with `tok_embeddings`; call `tie_weights()` again after anything that
    replaces parameters (e.g. `to_empty`). Pipeline stages of a tied model on different ranks each hold a copy
    that nothing keeps in sync (torchtitan does not allow tied embeddings with pipeline parallelism either).
    """

    def __init__(self, spec: ModelSpec, **factory: Any) -> None:
        super().__init__()
        self.spec = spec
        h = spec.hidden_size
        self.tok_embeddings: nn.Embedding | None = nn.Embedding(spec.vocab_size, h, **factory)
        self.pos_embeddings: nn.Embedding | None = None
        if spec.position_embedding == "learned":
            assert spec.max_position_embeddings is not None  # ModelSpec fills it for learned positions
            self.pos_embeddings = nn.Embedding(spec.max_position_embeddings, h, **factory)
        self.embedding_dropout = make_dropout(spec.dropout)
        self.layers = nn.ModuleDict({str(i): TransformerBlock(spec, **factory) for i in range(spec.num_layers)})
        self.norm: nn.Module | None = make_norm(spec, **factory)
        self.output: nn.Linear | None = nn.Linear(h, spec.vocab_size, bias=False, **factory)
        self.positions: torch.Tensor | None = None  # this rank's sequence positions under context parallelism
        self.tie_weights()

    def tie_weights(self) -> None:
        """Share the LM head's weight with the word embedding when the spec ties them (Press & Wolf 2017)."""
        if self.spec.tie_embeddings and self.tok_embeddings is not None and self.output is not None:
            self.output.weight = self.tok_embeddings.weight

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """[b, s] token ids -> [b, s, h]: word embedding plus learned positions (GPT-2), then dropout."""
        assert self.tok_embeddings is not None
        hidden = self.tok_embeddings(tokens)
        if self.pos_embeddings is not None:
            hidden = hidden + self._positions(tokens.shape[1], hidden)
        return self.embedding_dropout(hidden)

    def _positions(self, seq: int, hidden: torch.Tensor) -> torch.Tensor:
        """Rows 0..seq-1 of the learned position table, after checking they line up with `hidden`; under context
        parallelism the rows of this rank's positions."""
        assert self.pos_embeddings is not None
        if self.positions is not None:
            return self.pos_embeddings(self.positions)
        if seq > self.pos_embeddings.num_embeddings:
            raise ValueError(
                f"sequence length {seq} exceeds max_position_embeddings ({self.pos_embeddings.num_embeddings})"
            )
        if hidden.shape[1] != seq:
            # A sequence-sharded embedding output would get positions 0..s/tp-1 on every rank.
            raise ValueError(
                "learned positions need the whole sequence at the embedding: keep tok_embeddings' output "
                "replicated under sequence parallelism and shard the sequence at the first block"
            )
        return self.pos_embeddings(torch.arange(seq, device=hidden.device))

    def forward(self, tokens_or_hidden: torch.Tensor) -> torch.Tensor:
        """Token ids [b, s] (or hidden states [b, s, h] on a later pipeline stage) -> logits (or hidden states)."""
        hidden = self.embed(tokens_or_hidden) if self.tok_embeddings is not None else tokens_or_hidden
        for layer in self.layers.values():
            hidden = layer(hidden)
        if self.norm is not None:
            hidden = self.norm(hidden)
        if self.output is not None:
            hidden = self.output(hidden)
        return hidden


def next_token_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy, in fp32 whatever the compute dtype: the training loss."""
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())


def _check_buildable(spec: ModelSpec) -> None:
    """What the spec allows but this model cannot run; the message names the field."""
    if spec.position_embedding == "rope" and spec.head_size % 2:
        raise ValueError(f"head_dim ({spec.head_size}) must be even for rotary position embeddings")


def build_model(
    spec: ModelSpec,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    seed: int | None = 0,
) -> Transformer:
    """The reference transformer for `spec`, initialised by `init_weights(model, seed)`.

    On the meta device nothing is initialised (there is no storage): materialise with `to_empty`, call
    `tie_weights()`, then `init_weights`. `seed=None` keeps torch's default initialisation.
    """
    _check_buildable(spec)
    model = Transformer(spec, device=device, dtype=dtype)
    if seed is not None:
        init_weights(model, seed)
    return model
