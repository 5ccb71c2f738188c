"""executor.models: parameter counts equal the planner's, and the tiny models run, stay causal and prune cleanly."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

from executor.models import (
    Attention,
    MoEFeedForward,
    Transformer,
    apply_rotary,
    build_model,
    init_weights,
    rotary_cos_sin,
)
from planner.cost.params import block_params, model_params
from planner.presets import MODEL_PRESETS
from planner.specs import ModelSpec

BATCH, SEQ, VOCAB = 2, 16, 128

TINY_LLAMA = ModelSpec(
    name="tiny-llama",
    num_layers=2,
    hidden_size=64,
    num_attention_heads=4,
    num_kv_heads=2,
    ffn_hidden_size=96,
    vocab_size=VOCAB,
    mlp="swiglu",
    norm="rmsnorm",
)
TINY_GPT = ModelSpec(
    name="tiny-gpt",
    num_layers=2,
    hidden_size=64,
    num_attention_heads=4,
    vocab_size=VOCAB,
    max_position_embeddings=32,
    tie_embeddings=True,
)
TINY_MOE = TINY_LLAMA.model_copy(update={"name": "tiny-moe", "num_experts": 4, "experts_per_token": 2})
TINY_SPECS = [TINY_LLAMA, TINY_GPT, TINY_MOE]

# Shapes no preset has, each exercising a different counting rule of planner/cost/params.py.
EXTRA_COUNT_SPECS = {
    "moe": TINY_MOE,
    "gelu-rope-untied (GPT-NeoX)": ModelSpec(
        num_layers=3, hidden_size=96, num_attention_heads=6, vocab_size=300, position_embedding="rope"
    ),
    "qkv-bias-only (Qwen2)": TINY_LLAMA.model_copy(update={"qkv_bias": True}),
    "head_dim != hidden/heads": ModelSpec(
        num_layers=2, hidden_size=64, num_attention_heads=4, num_kv_heads=1, head_dim=24, vocab_size=VOCAB, mlp="swiglu"
    ),
    "swiglu-with-biases, tied": TINY_LLAMA.model_copy(update={"linear_bias": True, "tie_embeddings": True}),
}


def _count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())  # parameters() yields a tied weight once


def _first_attention(spec: ModelSpec) -> Attention:
    attention = build_model(spec).layers["0"].attention
    assert isinstance(attention, Attention)
    return attention


def _first_moe(spec: ModelSpec) -> MoEFeedForward:
    moe = build_model(spec).layers["0"].feed_forward
    assert isinstance(moe, MoEFeedForward)
    return moe


def _tokens(seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------------ parameter counts


@pytest.mark.parametrize("spec", [*MODEL_PRESETS.values(), *EXTRA_COUNT_SPECS.values()], ids=lambda s: s.name)
def test_parameter_count_equals_planner(spec: ModelSpec) -> None:
    model = build_model(spec, device=torch.device("meta"))
    assert _count(model) == model_params(spec)
    assert _count(model.layers["0"]) == block_params(spec).total
    assert len(model.layers) == spec.num_layers


# ---------------------------------------------------------------------------------------------- forward


@pytest.mark.parametrize("spec", TINY_SPECS, ids=lambda s: s.name)
def test_forward_gives_logits(spec: ModelSpec) -> None:
    logits = build_model(spec)(_tokens())
    assert logits.shape == (BATCH, SEQ, VOCAB)
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("spec", TINY_SPECS, ids=lambda s: s.name)
def test_causal(spec: ModelSpec) -> None:
    model = build_model(spec).eval()
    tokens = _tokens()
    changed = tokens.clone()
    t = SEQ // 2
    changed[:, t] = (changed[:, t] + 1) % VOCAB
    before, after = model(tokens), model(changed)
    torch.testing.assert_close(before[:, :t], after[:, :t], rtol=0, atol=0)
    assert not torch.allclose(before[:, t:], after[:, t:])


@pytest.mark.parametrize("spec", TINY_SPECS, ids=lambda s: s.name)
def test_backward_reaches_every_parameter(spec: ModelSpec) -> None:
    model = build_model(spec)
    tokens = _tokens()
    logits = model(tokens)
    loss = nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten())
    loss.backward()
    assert loss.item() == pytest.approx(torch.log(torch.tensor(VOCAB)).item(), rel=0.05)  # std-0.02 init ~ uniform
    for name, param in model.named_parameters():
        assert param.grad is not None and torch.isfinite(param.grad).all(), name
        assert param.grad.abs().sum() > 0, name


def test_bf16_forward() -> None:
    model = build_model(TINY_LLAMA, dtype=torch.bfloat16)
    logits = model(_tokens())
    assert logits.dtype == torch.bfloat16 and logits.shape == (BATCH, SEQ, VOCAB)


def test_sequence_longer_than_position_table_is_rejected() -> None:
    model = build_model(TINY_GPT)
    assert model.pos_embeddings is not None
    too_long = model.pos_embeddings.num_embeddings + 1
    with pytest.raises(ValueError, match="max_position_embeddings"):
        model(torch.zeros(1, too_long, dtype=torch.long))


def test_odd_head_dim_with_rope_is_rejected() -> None:
    spec = ModelSpec(num_layers=1, hidden_size=12, num_attention_heads=4, vocab_size=VOCAB, mlp="swiglu")
    with pytest.raises(ValueError, match="head_dim"):
        build_model(spec)


# ------------------------------------------------------------------------------------------- layer pieces


def test_rotary_scores_depend_only_on_relative_position() -> None:
    """Su et al. 2021, eq. 16: <R_m q, R_n k> is a function of m - n."""
    head_dim = 8
    q, k = torch.randn(head_dim), torch.randn(head_dim)
    seq = 12
    cos, sin = rotary_cos_sin(seq, head_dim, torch.device("cpu"))
    rotated_q = apply_rotary(q.expand(1, seq, 1, head_dim), cos, sin)[0, :, 0]
    rotated_k = apply_rotary(k.expand(1, seq, 1, head_dim), cos, sin)[0, :, 0]
    scores = rotated_q @ rotated_k.T
    for offset in (0, 1, 5):
        diagonal = torch.diagonal(scores, offset=offset)
        torch.testing.assert_close(diagonal, diagonal[0].expand_as(diagonal), rtol=1e-5, atol=1e-5)


def _column_shard(linear: nn.Linear, rows: slice) -> nn.Linear:
    shard = nn.Linear(linear.in_features, rows.stop - rows.start, bias=False)
    shard.weight = nn.Parameter(linear.weight[rows].detach().clone())
    return shard


def _row_shard(linear: nn.Linear, cols: slice) -> nn.Linear:
    shard = nn.Linear(cols.stop - cols.start, linear.out_features, bias=False)
    shard.weight = nn.Parameter(linear.weight[:, cols].detach().clone())
    return shard


def test_attention_runs_on_tensor_parallel_shards() -> None:
    """Megatron's split (Shoeybi et al. 2019): heads split over 2 ranks; the shards' outputs sum to the whole."""
    spec = TINY_LLAMA
    full = _first_attention(spec)
    x = torch.randn(BATCH, SEQ, spec.hidden_size)
    tp = 2
    q_width, kv_width = spec.q_size // tp, spec.kv_size // tp
    total = torch.zeros_like(x)
    for rank in range(tp):
        shard = copy.deepcopy(full)
        q_rows, kv_rows = slice(rank * q_width, (rank + 1) * q_width), slice(rank * kv_width, (rank + 1) * kv_width)
        shard.wq, shard.wk, shard.wv = (
            _column_shard(full.wq, q_rows),
            _column_shard(full.wk, kv_rows),
            _column_shard(full.wv, kv_rows),
        )
        shard.wo = _row_shard(full.wo, q_rows)
        total = total + shard(x)
    torch.testing.assert_close(total, full(x), rtol=1e-5, atol=1e-6)


def test_moe_gates_pick_top_k_and_sum_to_one() -> None:
    moe = _first_moe(TINY_MOE)
    assert len(moe.experts) == TINY_MOE.num_experts
    gates = moe.gates(torch.randn(BATCH, SEQ, TINY_MOE.hidden_size))
    assert ((gates > 0).sum(-1) == TINY_MOE.experts_per_token).all()
    torch.testing.assert_close(gates.sum(-1), torch.ones(BATCH, SEQ))


def test_moe_with_one_expert_per_token_is_that_expert() -> None:
    spec = TINY_MOE.model_copy(update={"experts_per_token": 1})
    moe = _first_moe(spec)
    x = torch.randn(1, 3, spec.hidden_size)
    chosen = moe.gates(x).argmax(-1)[0]
    expected = torch.stack([moe.experts[str(int(e))](x[0, i]) for i, e in enumerate(chosen)])
    torch.testing.assert_close(moe(x)[0], expected)


def test_dropout_only_where_the_spec_asks() -> None:
    assert not any(isinstance(m, nn.Dropout) for m in build_model(TINY_LLAMA).modules())
    gpt = build_model(TINY_GPT.model_copy(update={"dropout": 0.1}))
    assert sum(isinstance(m, nn.Dropout) for m in gpt.modules()) == 1 + 2 * TINY_GPT.num_layers
    tokens = _tokens()
    assert not torch.equal(gpt.train()(tokens), gpt(tokens))
    torch.testing.assert_close(gpt.eval()(tokens), gpt(tokens), rtol=0, atol=0)


# ------------------------------------------------------------------------------------------ initialisation


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: param.detach().clone() for name, param in model.named_parameters()}


@pytest.mark.parametrize("spec", TINY_SPECS, ids=lambda s: s.name)
def test_same_seed_same_weights(spec: ModelSpec) -> None:
    first, again, other = (
        _state(build_model(spec, seed=3)),
        _state(build_model(spec, seed=3)),
        _state(build_model(spec)),
    )
    assert first.keys() == again.keys()
    for name in first:
        assert torch.equal(first[name], again[name]), name
    assert not torch.equal(first["layers.0.attention.wq.weight"], other["layers.0.attention.wq.weight"])


def test_init_values() -> None:
    model = build_model(TINY_GPT)
    for name, param in model.named_parameters():
        if ".attention_norm." in name or ".ffn_norm." in name or name.startswith("norm."):
            expected = 1.0 if name.endswith("weight") else 0.0
            assert torch.equal(param, torch.full_like(param, expected)), name
        elif name.endswith("bias"):
            assert torch.equal(param, torch.zeros_like(param)), name
        else:
            assert param.std().item() == pytest.approx(0.02, rel=0.1), name


def test_meta_then_materialise_equals_direct_build() -> None:
    model = build_model(TINY_GPT, device="meta")
    model.to_empty(device="cpu")
    model.tie_weights()
    init_weights(model, seed=0)
    direct = _state(build_model(TINY_GPT))
    assert _state(model).keys() == direct.keys()
    for name, value in _state(model).items():
        assert torch.equal(value, direct[name]), name


def test_bf16_weights_are_the_fp32_weights_rounded() -> None:
    low, full = _state(build_model(TINY_LLAMA, dtype=torch.bfloat16)), _state(build_model(TINY_LLAMA))
    for name in full:
        assert torch.equal(low[name], full[name].to(torch.bfloat16)), name


# ---------------------------------------------------------------------------------------- pipeline pruning


def _stage(full: Transformer, keep_layers: set[str], first: bool, last: bool) -> Transformer:
    stage = copy.deepcopy(full)
    for key in list(stage.layers):
        if key not in keep_layers:
            del stage.layers[key]
    if not first:
        stage.tok_embeddings = stage.pos_embeddings = None
    if not last:
        stage.norm = stage.output = None
    return stage


def _whole_model_name(spec: ModelSpec, name: str) -> str:
    """A last stage's tied head is the whole model's word embedding (parameters() lists it under that name)."""
    return "tok_embeddings.weight" if spec.tie_embeddings and name == "output.weight" else name


@pytest.mark.parametrize("spec", [TINY_LLAMA, TINY_GPT], ids=lambda s: s.name)
def test_pruned_stages_compose_to_the_whole_model(spec: ModelSpec) -> None:
    full = build_model(spec).eval()
    first, last = _stage(full, {"0"}, True, False), _stage(full, {"1"}, False, True)
    tokens = _tokens()
    hidden = first(tokens)
    assert hidden.shape == (BATCH, SEQ, spec.hidden_size)
    torch.testing.assert_close(last(hidden), full(tokens), rtol=0, atol=0)


@pytest.mark.parametrize("spec", [TINY_LLAMA, TINY_GPT], ids=lambda s: s.name)
def test_pruning_keeps_fqns(spec: ModelSpec) -> None:
    full = _state(build_model(spec))
    last = _stage(build_model(spec), {"1"}, False, True)
    remaining = dict(last.named_parameters())
    assert set(remaining) <= set(full) | {"output.weight"}
    assert "layers.1.attention.wq.weight" in remaining and not any(n.startswith("layers.0.") for n in remaining)
    for name, param in remaining.items():
        assert torch.equal(param, full[_whole_model_name(spec, name)]), name


@pytest.mark.parametrize("spec", [TINY_LLAMA, TINY_GPT], ids=lambda s: s.name)
def test_init_of_a_pruned_stage_matches_the_whole_model(spec: ModelSpec) -> None:
    """Per-FQN seeds: a stage built and initialised on its own gets the whole model's values."""
    full = _state(build_model(spec))
    stage = _stage(build_model(spec, seed=None), {"1"}, False, True)
    init_weights(stage, seed=0)
    for name, param in stage.named_parameters():
        assert torch.equal(param, full[_whole_model_name(spec, name)]), name


def test_checkpoint_wrapper_keeps_init() -> None:
    wrapped = build_model(TINY_LLAMA, seed=None)
    for key in list(wrapped.layers):
        wrapped.layers[key] = checkpoint_wrapper(wrapped.layers[key])
    init_weights(wrapped, seed=0)
    plain = build_model(TINY_LLAMA)
    tokens = _tokens()
    torch.testing.assert_close(wrapped(tokens), plain(tokens), rtol=0, atol=0)


# ------------------------------------------------------------------------------------------ tied embeddings


def test_tied_head_shares_the_embedding() -> None:
    gpt = build_model(TINY_GPT)
    assert gpt.output is not None and gpt.tok_embeddings is not None
    assert gpt.output.weight is gpt.tok_embeddings.weight
    llama = build_model(TINY_LLAMA)
    assert llama.output is not None and llama.tok_embeddings is not None
    assert llama.output.weight is not llama.tok_embeddings.weight


def test_layers_are_a_module_dict_with_string_keys() -> None:
    model = build_model(TINY_LLAMA)
    assert isinstance(model.layers, nn.ModuleDict)
    assert list(model.layers) == [str(i) for i in range(TINY_LLAMA.num_layers)]
    assert isinstance(model.layers["0"].attention, Attention)
