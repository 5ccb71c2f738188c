"""Save and restore a run's model and optimizer with torch.distributed.checkpoint (DCP).

Every rank saves only what it holds: its pipeline chunks' parameters (DTensor shards under TP and FSDP2) and
its optimizers' state, keyed by the parameter names of the full model (`get_model_state_dict`,
`get_optimizer_state_dict(flatten_optimizer_state_dict=True)`, as torchtitan does for pipeline model parts).
Those names do not depend on the split, so every rank's keys are disjoint or, for replicated tensors,
identical (DCP writes those once).

Under expert parallelism each rank holds only its experts, under their names in the whole model
(`layers.<i>.feed_forward.experts.<e>...`, executor/parallel/expert.py): the ep ranks save disjoint keys, and the
edp ranks holding the same experts identical ones (or, under FSDP2, their shards of them).

Under ZeRO-1 the ZeroRedundancyOptimizer keeps each parameter's state on one dp rank, in a local optimizer
over that rank's share: that local optimizer is what is saved, so each state key exists on exactly one rank.

Under fp16 the loss scaler's scale and growth count are saved too (`grad_scaler`, the same on every rank, so
written once): a resumed run goes on with the scale the interrupted one had reached, not torch's initial 2^16.

Nothing else needs saving: the data is a function of (seed, step) and the learning rate a function of the step.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from executor.config import COMPLETE_MARKER
from executor.precision import load_scaler_state, scaler_state

if TYPE_CHECKING:
    import torch
    from torch import nn
    from torch.amp import GradScaler

_FLAT = StateDictOptions(flatten_optimizer_state_dict=True)


def _local_optimizer(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """The optimizer that holds state for this rank's parameters: ZeroRedundancyOptimizer's local one."""
    return getattr(optimizer, "optim", optimizer)


def _state_dicts(
    chunks: list[nn.Module], optimizers: list[torch.optim.Optimizer], scaler: GradScaler | None
) -> dict[str, Any]:
    model: dict[str, Any] = {}
    optim: dict[str, Any] = {}
    for chunk, optimizer in zip(chunks, optimizers, strict=True):
        model.update(get_model_state_dict(chunk))
        optim.update(get_optimizer_state_dict(chunk, _local_optimizer(optimizer), options=_FLAT))
    state = {"model": model, "optimizer": optim}
    if scaler is not None:
        state["grad_scaler"] = scaler_state(scaler)
    return state


def save(
    folder: Path,
    step: int,
    chunks: list[nn.Module],
    optimizers: list[torch.optim.Optimizer],
    scaler: GradScaler | None = None,
) -> None:
    """Write this rank's share into `folder`; once all ranks are done, rank 0 marks it complete."""
    dcp.save(_state_dicts(chunks, optimizers, scaler), checkpoint_id=str(folder))
    dist.barrier()  # every rank's files are written before the folder is declared usable
    if dist.get_rank() == 0:
        (folder / COMPLETE_MARKER).write_text(json.dumps({"step": step}) + "\n")


def load(
    folder: Path,
    chunks: list[nn.Module],
    optimizers: list[torch.optim.Optimizer],
    scaler: GradScaler | None = None,
) -> None:
    """Restore `chunks`, `optimizers` and the loss `scaler` in place from `folder` (the layout they were saved
    with or another)."""
    state = _state_dicts(chunks, optimizers, scaler)  # templates: DCP loads into tensors of these shapes
    dcp.load(state, checkpoint_id=str(folder))
    if scaler is not None:
        load_scaler_state(scaler, state["grad_scaler"])
    for chunk, optimizer in zip(chunks, optimizers, strict=True):
        set_model_state_dict(chunk, state["model"], options=StateDictOptions(strict=False))
        set_optimizer_state_dict(chunk, _local_optimizer(optimizer), state["optimizer"], options=_FLAT)
