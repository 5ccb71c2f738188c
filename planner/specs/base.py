"""What every spec shares: the frozen base model and the bounded field types (DESIGN.md "The contract").

Units are in the names (`_s`, `_bytes`, `_GBps` = 10^9 B/s, `_tflops`); SI inside."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, Strict

Precision = Literal["bf16", "fp16", "fp32"]
Optimizer = Literal["adamw", "sgd"]
# The training stack that runs a plan (planner/cost/runtime.py holds what each one does).
Framework = Literal["megatron", "deepspeed", "fsdp", "paraplan"]
Recompute = Literal["none", "selective", "full"]
Schedule = Literal["gpipe", "1f1b", "interleaved_1f1b"]
# What lives in host (CPU) memory instead of on the GPU: ZeRO-Offload (Ren et al. 2021) moves the optimizer's
# states, its step and the gradients; ZeRO-Infinity (Rajbhandari et al. 2021) the weights as well. DeepSpeed's
# `zero_optimization.offload_optimizer` / `offload_param` with `device: cpu` (planner/cost/offload.py).
Offload = Literal["none", "optimizer", "optimizer_and_params"]


def _text(value: str) -> str:
    """Text that can be stored and passed on: a lone surrogate ("\\ud800", which JSON can carry) cannot be encoded
    as UTF-8, so SQLite and every file write would fail on it; a NUL byte ends a C string (a path, a column)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("is not valid Unicode text (it holds a lone surrogate)") from None
    if "\x00" in value:
        raise ValueError("holds a NUL character")
    return value


# Strict: pydantic's lax mode would take `true` as 1, `8.0` or `"8"` as 8, and a JSON `Infinity` or `1e999` given
# for an integer would reach arithmetic before field validation (`int(inf)`: OverflowError, a 500), not be refused
# naming the field. JSON integers still pass, and so do Python ints (the CLI's flags, the search's int() values).
Int = Annotated[int, Strict()]
"""An integer of the contract: a JSON integer, never a boolean, a float (`8.0`, `Infinity`) or a string."""
# Strict takes ints and floats but no boolean or string; no quantity of the contract is infinite or NaN.
Real = Annotated[float, Strict(), Field(allow_inf_nan=False)]
"""A float of the contract: a finite JSON number (an integer is one), never a boolean or a string."""
Text = Annotated[str, AfterValidator(_text)]
"""Free text of the contract (names, labels, references): encodable as UTF-8, without NUL."""
PositiveInt = Annotated[Int, Field(ge=1)]

# Upper bounds far above any model or cluster built so far (dense models have ~100-200 layers, clusters ~10^5
# GPUs). They keep what a request costs bounded: search time grows with the layer count and the degrees, and
# the executor's checks build per-stage lists.
Layers = Annotated[Int, Field(ge=1, le=1024)]
Width = Annotated[Int, Field(ge=1, le=2**20)]  # hidden, ffn, head sizes
Heads = Annotated[Int, Field(ge=1, le=2**14)]
Vocab = Annotated[Int, Field(ge=1, le=2**24)]
Experts = Annotated[Int, Field(ge=1, le=2**14)]
Tokens = Annotated[Int, Field(ge=1, le=2**24)]  # sequence lengths, batch sizes (sequences), positions
Degree = Annotated[Int, Field(ge=1, le=2**17)]  # node counts and parallel degrees
ZeroStage = Annotated[Int, Field(ge=0, le=3)]  # ZeRO stage 0 (none) to 3 (parameters sharded)
MAX_GPUS = 2**17


class Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
