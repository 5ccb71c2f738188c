"""Hugging Face config.json -> ModelSpec, on real published configs.

Fixtures in fixtures/hf_configs/ are the config.json files as published on the Hugging Face Hub:
  llama3-8b.json     https://huggingface.co/meta-llama/Meta-Llama-3-8B/blob/main/config.json
  mistral-7b.json    https://huggingface.co/mistralai/Mistral-7B-v0.1/blob/main/config.json
  qwen2.5-7b.json    https://huggingface.co/Qwen/Qwen2.5-7B/blob/main/config.json
  gpt2.json          https://huggingface.co/openai-community/gpt2/blob/main/config.json
  pythia-160m.json   https://huggingface.co/EleutherAI/pythia-160m/blob/main/config.json
  mixtral-8x7b.json  https://huggingface.co/mistralai/Mixtral-8x7B-v0.1/blob/main/config.json
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from planner.cost.params import active_params_per_token, model_params
from planner.presets import model_from_hf_config, model_preset

FIXTURES = Path(__file__).parent / "fixtures" / "hf_configs"


def load(name: str) -> dict[str, Any]:
    return json.loads((FIXTURES / f"{name}.json").read_text())


# Published totals, each to the precision its source gives.
PUBLISHED_TOTALS = {
    "llama3-8b": 8.03e9,  # Hub safetensors count 8,030,261,248
    "mistral-7b": 7.24e9,  # Hub safetensors count 7,241,732,096
    "qwen2.5-7b": 7.61e9,  # model card: "Number of Parameters: 7.61B"
    "gpt2": 124.4e6,  # Hub safetensors count 124,439,808 (LM head tied to wte)
    # EleutherAI/pythia-160m checkpoint: 162,322,944 parameters; Biderman et al. 2023 (Pythia), Table 1, gives
    # its non-embedding part, 85,056,000.
    "pythia-160m": 162.3e6,
    # Mistral AI, "Mixtral of experts" blog and model card: 46.7B total (Jiang et al. 2024 abstract: 47B).
    "mixtral-8x7b": 46.7e9,
}


@pytest.mark.parametrize("name", sorted(PUBLISHED_TOTALS))
def test_total_matches_published(name: str) -> None:
    total = model_params(model_from_hf_config(load(name)))
    assert abs(total - PUBLISHED_TOTALS[name]) / PUBLISHED_TOTALS[name] < 0.005, f"{name}: {total:,}"


def test_exact_counts_where_published_exactly() -> None:
    assert model_params(model_from_hf_config(load("gpt2"))) == 124_439_808
    pythia = model_from_hf_config(load("pythia-160m"))
    assert model_params(pythia) == 162_322_944
    assert model_params(pythia) - 2 * 50304 * 768 == 85_056_000  # Pythia Table 1, non-embedding
    assert model_params(model_from_hf_config(load("llama3-8b"))) == 8_030_261_248


def test_llama3_8b_fields() -> None:
    spec = model_from_hf_config(load("llama3-8b"))
    assert (spec.num_layers, spec.hidden_size, spec.num_attention_heads) == (32, 4096, 32)
    assert spec.num_kv_heads == 8
    assert (spec.head_dim, spec.ffn_hidden_size, spec.vocab_size) == (128, 14336, 128256)
    assert (spec.mlp, spec.norm, spec.position_embedding) == ("swiglu", "rmsnorm", "rope")
    assert not spec.tie_embeddings and not spec.qkv_bias and not spec.linear_bias
    assert spec == model_preset("llama3-8b").model_copy(update={"name": None})


def test_mistral_matches_its_preset() -> None:
    spec = model_from_hf_config(load("mistral-7b"))
    assert spec == model_preset("mistral-7b").model_copy(update={"name": None})


def test_qwen2_has_qkv_bias_only() -> None:
    spec = model_from_hf_config(load("qwen2.5-7b"))
    assert spec.qkv_bias and not spec.linear_bias
    assert (spec.num_kv_heads, spec.kv_size) == (4, 512)


def test_gpt2_fields() -> None:
    spec = model_from_hf_config(load("gpt2"))
    assert (spec.num_layers, spec.hidden_size, spec.num_attention_heads) == (12, 768, 12)
    assert spec.ffn_hidden_size == 3072  # n_inner absent: 4h
    assert (spec.position_embedding, spec.max_position_embeddings) == ("learned", 1024)
    assert spec.tie_embeddings  # GPT-2 ties its LM head; the config does not say so
    assert spec.qkv_bias and spec.linear_bias and spec.dropout == 0.1


def test_gpt2_n_inner_and_untied() -> None:
    spec = model_from_hf_config({**load("gpt2"), "n_inner": 1024, "tie_word_embeddings": False})
    assert spec.ffn_hidden_size == 1024 and not spec.tie_embeddings


def test_pythia_is_gelu_with_rope_and_untied_head() -> None:
    spec = model_from_hf_config(load("pythia-160m"))
    assert (spec.mlp, spec.norm, spec.position_embedding) == ("gelu", "layernorm", "rope")
    assert spec.qkv_bias and spec.linear_bias and not spec.tie_embeddings
    assert spec.ffn_hidden_size == 3072 and spec.vocab_size == 50304


def test_mixtral_total_and_active() -> None:
    spec = model_from_hf_config(load("mixtral-8x7b"))
    assert (spec.num_experts, spec.experts_per_token) == (8, 2)
    # Mistral AI blog / model card: 46.7B total, 12.9B used per token (paper abstract: 47B / 13B).
    assert model_params(spec) == 46_702_792_704
    assert abs(active_params_per_token(spec) - 12.9e9) / 12.9e9 < 0.005


def test_missing_kv_heads_means_multi_head() -> None:
    config = load("llama3-8b")
    del config["num_key_value_heads"]
    assert model_from_hf_config(config).num_kv_heads == 32


def test_head_dim_is_honoured() -> None:
    # Mistral-Nemo-style: head_dim 128 with 32 heads on a 5120-wide model (q_size 4096 != hidden_size).
    config = {**load("mistral-7b"), "hidden_size": 5120, "head_dim": 128}
    spec = model_from_hf_config(config)
    assert spec.head_dim == 128 and spec.q_size == 4096


def test_tie_word_embeddings_is_honoured() -> None:
    tied = model_from_hf_config({**load("qwen2.5-7b"), "tie_word_embeddings": True})
    untied = model_from_hf_config(load("qwen2.5-7b"))
    assert model_params(untied) - model_params(tied) == 152064 * 3584


def test_name_comes_from_name_or_path() -> None:
    assert model_from_hf_config(load("gpt2")).name is None
    named = model_from_hf_config({**load("gpt2"), "_name_or_path": "openai-community/gpt2"})
    assert named.name == "openai-community/gpt2"


def test_architectures_is_the_fallback_for_model_type() -> None:
    config = load("pythia-160m")
    del config["model_type"]
    assert model_from_hf_config(config) == model_from_hf_config(load("pythia-160m"))


def test_unknown_model_type_is_named() -> None:
    supported = "supported: gpt2, gpt_neox, llama, mistral, mixtral, qwen2"
    with pytest.raises(ValueError, match=f"'bert'.*{supported}"):
        model_from_hf_config({"model_type": "bert", "hidden_size": 768})


def test_config_without_model_type_or_architectures() -> None:
    with pytest.raises(ValueError, match="neither a model_type nor architectures"):
        model_from_hf_config({"hidden_size": 768})


def test_null_fields_take_the_architecture_default() -> None:
    spec = model_from_hf_config({**load("gpt2"), "n_inner": None, "tie_word_embeddings": None})
    assert spec.ffn_hidden_size == 3072 and spec.tie_embeddings


def test_unknown_architecture_is_named() -> None:
    with pytest.raises(ValueError, match="'T5ForConditionalGeneration'"):
        model_from_hf_config({"architectures": ["T5ForConditionalGeneration"]})


@pytest.mark.parametrize(
    ("fixture", "field"),
    [("llama3-8b", "intermediate_size"), ("gpt2", "n_embd"), ("mixtral-8x7b", "num_local_experts")],
)
def test_missing_field_is_named(fixture: str, field: str) -> None:
    config = load(fixture)
    del config[field]
    with pytest.raises(ValueError, match=f"lacks required field '{field}'"):
        model_from_hf_config(config)
