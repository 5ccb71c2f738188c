"""Shared fixtures: small, real specs built from presets."""

from __future__ import annotations

import pytest

from planner.presets import model_preset
from planner.specs import ModelSpec


def gpt_block_model(hidden: int = 512, heads: int = 8, dropout: float = 0.1, layers: int = 4) -> ModelSpec:
    return ModelSpec(
        num_layers=layers, hidden_size=hidden, num_attention_heads=heads, vocab_size=51200, dropout=dropout
    )


@pytest.fixture
def gpt175b() -> ModelSpec:
    return model_preset("gpt3-175b")


@pytest.fixture
def gpt3_request() -> dict:
    """The README's example: GPT-3 175B on 1,024 A100-80GB, TP8 PP8 DP16."""
    return {
        "model": {"name": "gpt3-175b"},
        "training": {"seq_len": 2048, "global_batch_size": 1536, "precision": "bf16"},
        "cluster": {"gpu": "a100-80gb", "num_nodes": 128, "gpus_per_node": 8},
        "plan": {
            "dp": 16,
            "tp": 8,
            "pp": 8,
            "zero_stage": 1,
            "micro_batch_size": 1,
            "sequence_parallel": True,
            "recompute": "selective",
            "schedule": "interleaved_1f1b",
            "virtual_stages": 3,
        },
    }
