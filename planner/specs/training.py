"""What one optimizer step processes (the contract's `training`)."""

from __future__ import annotations

from typing import Literal

from planner.specs.base import Framework, Frozen, Optimizer, Precision, Tokens


class TrainingSpec(Frozen):
    """What one optimizer step processes. `global_batch_size` counts sequences."""

    seq_len: Tokens
    global_batch_size: Tokens
    precision: Precision = "bf16"
    optimizer: Optimizer = "adamw"
    # "flash": fused attention that never stores the s x s score matrix (FlashAttention / SDPA);
    # "eager": softmax(QK^T)V written out as separate ops (Megatron-LM before 2023, Korthikanti et al. 2022).
    attention_kernel: Literal["flash", "eager"] = "flash"
    # The stack that runs the plan: "megatron" (Megatron-LM), "deepspeed", "fsdp" (PyTorch FSDP/FSDP2: torchtitan,
    # llm-foundry, Accelerate) or "paraplan" (this project's executor, what `paraplan train` runs). It decides how
    # model states are stored, which ZeRO stages exist and the host time per kernel (planner/cost/runtime.py).
    framework: Framework = "paraplan"

    @property
    def tokens_per_step(self) -> int:
        return self.seq_len * self.global_batch_size
