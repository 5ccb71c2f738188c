"""The tiny training request the executor's tests share: a Llama-style model small enough to train in seconds
on two CPU ranks, with plain data parallelism and ZeRO-1 as its plan."""

from __future__ import annotations

import copy
from typing import Any

TINY_REQUEST: dict[str, Any] = {
    "model": {"num_layers": 4, "hidden_size": 64, "num_attention_heads": 4, "num_kv_heads": 2,
              "ffn_hidden_size": 176, "vocab_size": 256, "mlp": "swiglu", "norm": "rmsnorm"},
    "training": {"seq_len": 32, "global_batch_size": 8, "precision": "fp32", "optimizer": "adamw"},
    "cluster": {"gpu": "cpu", "num_nodes": 1, "gpus_per_node": 2},
    "plan": {"dp": 2, "zero_stage": 1},
}  # fmt: skip


def tiny_train_request(plan: dict[str, Any], hidden: int = 64, seq_len: int = 32) -> dict[str, Any]:
    """TINY_REQUEST with `plan`, and optionally a wider model (the ffn scaled with it) or longer sequences."""
    request = copy.deepcopy(TINY_REQUEST)
    request["plan"] = plan
    request["model"].update(hidden_size=hidden, ffn_hidden_size=176 * hidden // 64)
    request["training"]["seq_len"] = seq_len
    return request
