"""Exact parameter counts per layer, split into what tensor parallelism shards and what it replicates.

Sharding follows Megatron-LM's tensor parallelism (Shoeybi et al. 2019, sec. 3): the QKV and first MLP
projections are column-parallel (weights and biases sharded), the attention output and second MLP
projections are row-parallel (weights sharded, biases replicated), the word embedding and LM head are
vocabulary-parallel; norms, learned position embeddings and MoE routers are replicated on every TP rank.
"""

from __future__ import annotations

from dataclasses import dataclass

from planner.specs import ModelSpec


@dataclass(frozen=True)
class ParamCount:
    sharded: int  # split evenly over tp ranks
    replicated: int  # held whole by every tp rank

    @property
    def total(self) -> int:
        return self.sharded + self.replicated

    def per_gpu(self, tp: int) -> float:
        return self.sharded / tp + self.replicated

    def __add__(self, other: ParamCount) -> ParamCount:
        return ParamCount(self.sharded + other.sharded, self.replicated + other.replicated)


def norm_params(model: ModelSpec) -> int:
    """LayerNorm has a weight and a bias per channel (Ba et al. 2016); RMSNorm only a weight (Zhang & Sennrich 2019)."""
    return 2 * model.hidden_size if model.norm == "layernorm" else model.hidden_size


def attention_params(model: ModelSpec) -> ParamCount:
    """Q, K, V projections (K and V at kv_size under GQA, Ainslie et al. 2023) and the output projection."""
    h, qkv_width = model.hidden_size, model.q_size + 2 * model.kv_size
    qkv = h * qkv_width + (qkv_width if model.qkv_bias else 0)
    out_weight, out_bias = model.q_size * h, (h if model.linear_bias else 0)
    return ParamCount(sharded=qkv + out_weight, replicated=out_bias)


def expert_mlp_params(model: ModelSpec) -> ParamCount:
    """One MLP: GELU has two matrices h x f (Vaswani et al. 2017); SwiGLU three (Shazeer 2020)."""
    h, f = model.hidden_size, model.ffn_size
    matrices = 3 if model.mlp == "swiglu" else 2
    column_bias = (matrices - 1) * f if model.linear_bias else 0
    row_bias = h if model.linear_bias else 0
    return ParamCount(sharded=matrices * h * f + column_bias, replicated=row_bias)


def experts_params(model: ModelSpec) -> ParamCount:
    """All experts' MLPs of one block, without the router: what expert parallelism splits over ep ranks
    (Lepikhin et al. 2020, GShard sec. 3.2). 0 for a dense model, whose one MLP every rank holds."""
    if model.num_experts == 1:
        return ParamCount(0, 0)
    one = expert_mlp_params(model)
    return ParamCount(one.sharded * model.num_experts, one.replicated * model.num_experts)


def mlp_params(model: ModelSpec) -> ParamCount:
    """All experts' MLPs plus the router (h x num_experts, replicated) when the model is a mixture of experts."""
    if model.num_experts == 1:
        return expert_mlp_params(model)
    return experts_params(model) + ParamCount(0, model.hidden_size * model.num_experts)


def block_params(model: ModelSpec) -> ParamCount:
    """One transformer block: two norms (pre-attention, pre-MLP), attention and MLP."""
    return attention_params(model) + mlp_params(model) + ParamCount(0, 2 * norm_params(model))


def block_tensors(model: ModelSpec) -> int:
    """Parameter tensors of one block as Megatron-LM lays them out (megatron/core/transformer): QKV one fused
    matrix, the attention output one, each MLP two (SwiGLU's gate and up projections fused into the first), a bias
    beside each matrix that has one, each norm's weight and bias apart, and the router. GPT-3: 12."""
    norms = 2 * (2 if model.norm == "layernorm" else 1)
    attention = 2 + int(bool(model.qkv_bias)) + int(bool(model.linear_bias))
    mlp = 2 + 2 * int(bool(model.linear_bias))
    router = 1 if model.num_experts > 1 else 0
    return norms + attention + mlp * model.num_experts + router


def embedding_tensors(model: ModelSpec) -> int:
    """The word embedding and, with learned positions, their table (`embedding_params`)."""
    return 1 + int(model.position_embedding == "learned" and bool(model.max_position_embeddings))


def head_tensors(model: ModelSpec) -> int:
    """The final norm's weight (and bias) and an untied LM head (`head_params`)."""
    return (2 if model.norm == "layernorm" else 1) + int(not model.tie_embeddings)


def embedding_params(model: ModelSpec) -> ParamCount:
    """Word embedding (vocab-parallel) and, for GPT-style models, the learned position table (replicated)."""
    positions = model.hidden_size * (model.max_position_embeddings or 0)
    if model.position_embedding != "learned":
        positions = 0
    return ParamCount(sharded=model.vocab_size * model.hidden_size, replicated=positions)


def head_params(model: ModelSpec) -> ParamCount:
    """Final norm and the LM head; a tied head reuses the word embedding and adds no parameters."""
    head = 0 if model.tie_embeddings else model.vocab_size * model.hidden_size
    return ParamCount(sharded=head, replicated=norm_params(model))


def model_params(model: ModelSpec) -> int:
    """Total parameters of the model, counted once (tied weights once)."""
    blocks = block_params(model).total * model.num_layers
    return blocks + embedding_params(model).total + head_params(model).total


def active_params_per_token(model: ModelSpec) -> int:
    """Parameters a token's forward pass touches: only `experts_per_token` of the experts (Fedus et al. 2021)."""
    one = expert_mlp_params(model).total
    inactive = one * (model.num_experts - model.experts_per_token)
    return model_params(model) - inactive * model.num_layers
