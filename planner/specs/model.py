"""The model a request is about: a decoder-only transformer (the contract's `model`)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field, model_validator

from planner.specs.base import Experts, Frozen, Heads, Layers, Real, Text, Tokens, Vocab, Width


class ModelSpec(Frozen):
    """A decoder-only transformer, described by the fields every planner and config format agree on.

    Defaults follow the two families: GELU models (GPT-2/3, Megatron GPT) default to learned positions and
    biases on every linear layer; SwiGLU models (Llama, Mistral) to RoPE and no biases. Hybrids (GPT-NeoX:
    GELU + RoPE; Qwen2: SwiGLU + QKV bias) set the fields explicitly.
    """

    name: Text | None = None
    num_layers: Layers
    hidden_size: Width
    num_attention_heads: Heads
    num_kv_heads: Heads | None = None  # None: = num_attention_heads (multi-head attention)
    head_dim: Width | None = None  # None: hidden_size // num_attention_heads
    ffn_hidden_size: Width | None = None  # None: 4 * hidden_size (GELU) or Llama's 2/3 * 4h rounded
    vocab_size: Vocab
    mlp: Literal["gelu", "swiglu"] = "gelu"
    norm: Literal["layernorm", "rmsnorm"] = "layernorm"
    tie_embeddings: bool = False
    num_experts: Experts = 1
    experts_per_token: Experts = 1
    position_embedding: Literal["learned", "rope"] | None = None
    max_position_embeddings: Tokens | None = None  # rows of a learned position table
    qkv_bias: bool | None = None
    linear_bias: bool | None = None  # attention output projection and MLP
    dropout: Annotated[Real, Field(ge=0.0, lt=1.0)] = 0.0  # hidden and attention dropout probability

    @model_validator(mode="after")
    def _fill_family_defaults(self) -> ModelSpec:
        gelu = self.mlp == "gelu"
        defaults: dict[str, Any] = {
            "num_kv_heads": self.num_attention_heads,
            "head_dim": self.hidden_size // self.num_attention_heads,
            "ffn_hidden_size": 4 * self.hidden_size if gelu else _llama_ffn(self.hidden_size),
            "position_embedding": "learned" if gelu else "rope",
            "qkv_bias": gelu,
            "linear_bias": gelu,
        }
        for field, value in defaults.items():
            if getattr(self, field) is None:
                object.__setattr__(self, field, value)
        if self.position_embedding == "learned" and self.max_position_embeddings is None:
            object.__setattr__(self, "max_position_embeddings", 2048)  # GPT-3's context (Brown et al. 2020)
        _check_model(self)
        return self

    @property
    def kv_heads(self) -> int:
        assert self.num_kv_heads is not None
        return self.num_kv_heads

    @property
    def head_size(self) -> int:
        assert self.head_dim is not None
        return self.head_dim

    @property
    def ffn_size(self) -> int:
        assert self.ffn_hidden_size is not None
        return self.ffn_hidden_size

    @property
    def q_size(self) -> int:
        """Width of the query projection (= hidden_size unless head_dim is set independently)."""
        return self.num_attention_heads * self.head_size

    @property
    def kv_size(self) -> int:
        """Width of one of the key / value projections (smaller than q_size under GQA/MQA)."""
        return self.kv_heads * self.head_size


def _llama_ffn(hidden: int, multiple_of: int = 256) -> int:
    """Llama's default SwiGLU width: 2/3 of 4h, rounded up to a multiple of 256 (Touvron et al. 2023, code)."""
    ffn = int(2 * 4 * hidden / 3)
    return multiple_of * ((ffn + multiple_of - 1) // multiple_of)


def _check_model(model: ModelSpec) -> None:
    problems = []
    if model.hidden_size % model.num_attention_heads and "head_dim" not in model.model_fields_set:
        problems.append(
            f"hidden_size ({model.hidden_size}) is not divisible by num_attention_heads "
            f"({model.num_attention_heads}); set head_dim explicitly"
        )
    if model.num_attention_heads % model.kv_heads:
        problems.append(
            f"num_kv_heads ({model.kv_heads}) must divide num_attention_heads ({model.num_attention_heads})"
        )
    if model.experts_per_token > model.num_experts:
        problems.append(f"experts_per_token ({model.experts_per_token}) exceeds num_experts ({model.num_experts})")
    if problems:
        raise ValueError("; ".join(problems))
