"""What every spec shares: the frozen base model and the bounded field types (DESIGN.md "The contract").

Units are in the names (`_s`, `_bytes`, `_GBps` = 10^9 B/s, `_tflops`); SI inside."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

Precision = Literal["bf16", "fp16", "fp32"]
Optimizer = Literal["adamw", "sgd"]
# The training stack that runs a plan (planner/cost/runtime.py holds what each one does).
Framework = Literal["megatron", "deepspeed", "fsdp", "paraplan"]
Recompute = Literal["none", "selective", "full"]
Schedule = Literal["gpipe", "1f1b", "interleaved_1f1b"]
PositiveInt = Annotated[int, Field(ge=1)]

# Upper bounds far above any model or cluster built so far (dense models have ~100-200 layers, clusters ~10^5
# GPUs). They keep what a request costs bounded: search time grows with the layer count and the degrees, and
# the executor's checks build per-stage lists.
Layers = Annotated[int, Field(ge=1, le=1024)]
Width = Annotated[int, Field(ge=1, le=2**20)]  # hidden, ffn, head sizes
Heads = Annotated[int, Field(ge=1, le=2**14)]
Vocab = Annotated[int, Field(ge=1, le=2**24)]
Experts = Annotated[int, Field(ge=1, le=2**14)]
Tokens = Annotated[int, Field(ge=1, le=2**24)]  # sequence lengths, batch sizes (sequences), positions
Degree = Annotated[int, Field(ge=1, le=2**17)]  # node counts and parallel degrees
MAX_GPUS = 2**17


class Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
