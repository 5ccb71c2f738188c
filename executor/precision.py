"""Mixed precision in the executor: autocast at the request's precision and, for fp16, dynamic loss scaling.

Parameters, gradients and optimizer state stay fp32 (the master weights of Micikevicius et al. 2018, sec. 3.1);
`torch.autocast` runs the matmuls in 16 bits. bf16 has fp32's exponent range and needs nothing more. fp16's
range is narrow: small activation gradients underflow to zero unless the loss is multiplied by a large scale
before backward (sec. 3.2), and the scale is dynamic: when any gradient overflows (inf or nan) the step is
skipped and the scale halved; after `growth_interval` clean steps it doubles (`torch.amp.GradScaler`).

Every rank must skip the same steps, or the replicas and stages drift apart (a ZeRO-1 owner that skips its share
while its peers step, a pipeline stage that updates while the next one does not), and so must every optimizer
of a rank (one per model chunk: two or more under interleaved 1F1B). After `unscale_` has checked each
optimizer's gradients, one all-reduce (MAX) over the whole world, every rank of dp, cp, tp and pp, gives every
optimizer of every rank the same found-inf flag (`_agree_on_overflow`). torch's `ShardedGradScaler` (FSDP's)
all-reduces per optimizer instead, which is not enough: under interleaved 1F1B an overflow in rank 1's first
chunk was seen by rank 0's first optimizer only, and rank 0's second chunk stepped (tests/distributed/
test_fp16.py found it). So the plain `torch.amp.GradScaler` is used, with that one collective per step.

On CPU, bf16 requests train in fp32 (planner/request.py `default_precision`), but fp16 runs in fp16
(`torch.autocast("cpu", dtype=torch.float16)`): loss scaling only does anything when the backward really is fp16.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any, cast

import torch

if TYPE_CHECKING:
    from torch.amp import GradScaler

_AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}

# Test hook: `PARAPLAN_TEST_OVERFLOW=STEP@RANK` makes rank RANK write inf into one of its gradients after the
# backward of step STEP, before the loss scaler looks at them. tests/distributed/test_fp16.py uses it to check
# that an overflow on one rank skips the step on every rank; nothing else sets it.
OVERFLOW_HOOK_ENV = "PARAPLAN_TEST_OVERFLOW"


def autocast_for(precision: str, device: torch.device) -> Callable[[], AbstractContextManager[Any]]:
    """A factory of the autocast context for `precision` on `device`: 16-bit compute over fp32 parameters. On CPU
    only fp16 autocasts (see the module docstring); bf16 and fp32 run in fp32 there."""
    dtype = _AUTOCAST_DTYPES.get(precision)
    if dtype is None or (device.type != "cuda" and precision != "fp16"):
        return nullcontext
    return lambda: torch.autocast(device_type=device.type, dtype=dtype)


def grad_scaler_for(precision: str, device: torch.device) -> GradScaler | None:
    """fp16's dynamic loss scaler; None for bf16 and fp32. torch's defaults: initial scale 2^16, halve on
    overflow, double after 2000 clean steps. `step_optimizers` agrees on overflow over every rank."""
    if precision != "fp16":
        return None
    scaler = _LayoutAwareGradScaler(device.type)
    # Make the scale now, on every rank: the scaler makes it on its first `scale(loss)`, which only the last
    # pipeline stage calls, and `unscale_` on the other stages would find none.
    scaler.scale(torch.zeros((), device=device))
    return scaler


class _LayoutAwareGradScaler(torch.amp.GradScaler):
    """torch's GradScaler, unscaling plain and DTensor gradients in separate foreach calls. GradScaler groups
    gradients by device and dtype only, and one `_amp_foreach_non_finite_check_and_unscale_` over a list mixing
    both fails ("got mixed torch.Tensor and DTensor"): that is every tensor-parallel plan without sequence
    parallelism on one dp rank, whose norm weights stay plain tensors beside the DTensor projections."""

    def _unscale_grads_(
        self, optimizer: torch.optim.Optimizer, inv_scale: torch.Tensor, found_inf: torch.Tensor, allow_fp16: bool
    ) -> dict[torch.device, torch.Tensor]:
        found: dict[torch.device, torch.Tensor] = {}
        for params in _params_by_grad_kind(optimizer):
            # `_unscale_grads_` reads only `param_groups`: a stand-in holding one kind of gradient is enough.
            one_kind = cast(torch.optim.Optimizer, SimpleNamespace(param_groups=[{"params": params}]))
            for device, flag in super()._unscale_grads_(one_kind, inv_scale, found_inf, allow_fp16).items():
                found[device] = torch.maximum(found[device], flag) if device in found else flag
        return found


def _params_by_grad_kind(optimizer: torch.optim.Optimizer) -> list[list[torch.Tensor]]:
    """The optimizer's parameters with gradients: those whose gradient is a DTensor, and the others."""
    from torch.distributed.tensor import DTensor

    kinds: dict[bool, list[torch.Tensor]] = {}
    for group in optimizer.param_groups:
        for param in group["params"]:
            if param.grad is not None:
                kinds.setdefault(isinstance(param.grad, DTensor), []).append(param)
    return list(kinds.values())


@dataclass(frozen=True)
class OptimizerStep:
    """What one optimizer step did: the gradient norm before clipping (None without clipping or when the
    gradients overflowed), the loss scale the step's backward used (None without loss scaling), and whether
    the step was skipped for an overflow."""

    grad_norm: float | None
    loss_scale: float | None
    skipped: bool


def step_optimizers(
    optimizers: list[torch.optim.Optimizer],
    scaler: GradScaler | None,
    clip: Callable[[], float] | None,
) -> OptimizerStep:
    """Unscale (fp16), clip, step and update the scale. Clipping sees the true gradients: `unscale_` divides
    them by the scale first (torch.amp docs, "Working with Unscaled Gradients"). The ranks then agree on
    overflow, so `scaler.step` skips every optimizer of every rank or none."""
    if scaler is None:
        grad_norm = clip() if clip is not None else None
        for optimizer in optimizers:
            optimizer.step()
        return OptimizerStep(grad_norm, None, skipped=False)
    loss_scale = scaler.get_scale()
    for optimizer in optimizers:
        scaler.unscale_(optimizer)
    _agree_on_overflow(scaler, optimizers)
    grad_norm = clip() if clip is not None else None
    for optimizer in optimizers:
        scaler.step(optimizer)
    scaler.update()
    # The scale falls (backoff_factor < 1) exactly when some rank found an inf or nan: the step was skipped.
    skipped = scaler.get_scale() < loss_scale
    finite_norm = None if grad_norm is None or skipped or not math.isfinite(grad_norm) else grad_norm
    return OptimizerStep(finite_norm, loss_scale, skipped)


def _agree_on_overflow(scaler: GradScaler, optimizers: list[torch.optim.Optimizer]) -> None:
    """Give every found-inf flag of every optimizer on every rank the maximum over all of them: one all-reduce
    over the world. The flags are the tensors `unscale_` left in the scaler, which `scaler.step` and
    `scaler.update` read; GradScaler has no public accessor for them, so this uses its `_found_inf_per_device`
    (present in torch 2.11 and 2.13)."""
    import torch.distributed as dist

    flags = [flag for optimizer in optimizers for flag in scaler._found_inf_per_device(optimizer).values()]
    assert flags, "unscale_ found no gradients on this rank"  # every rank holds parameters of the model
    agreed = torch.stack([flag.reshape(()) for flag in flags]).amax()
    dist.all_reduce(agreed, op=dist.ReduceOp.MAX)
    for flag in flags:
        flag.copy_(agreed)


def scaler_state(scaler: GradScaler) -> dict[str, torch.Tensor]:
    """The scaler's dynamic state as tensors, for torch.distributed.checkpoint: the same on every rank, so DCP
    writes it once. (The growth and backoff factors and the interval are constants of the run.)"""
    state = scaler.state_dict()
    return {
        "scale": torch.tensor(state["scale"], dtype=torch.float64),
        "growth_tracker": torch.tensor(state["_growth_tracker"], dtype=torch.int64),
    }


def load_scaler_state(scaler: GradScaler, saved: dict[str, torch.Tensor]) -> None:
    """Give `scaler` the scale and growth count of `saved` (from `scaler_state`)."""
    state = scaler.state_dict()
    state["scale"] = float(saved["scale"].item())
    state["_growth_tracker"] = int(saved["growth_tracker"].item())
    scaler.load_state_dict(state)


def overflow_hook_step(rank: int) -> int | None:
    """The step at which this rank injects an overflow (`OVERFLOW_HOOK_ENV`), if asked."""
    value = os.environ.get(OVERFLOW_HOOK_ENV)
    if not value:
        return None
    step, _, target_rank = value.partition("@")
    return int(step) if int(target_rank) == rank else None


def inject_overflow(params: Iterable[torch.nn.Parameter]) -> None:
    """Write inf into the first element this rank holds of the first gradient (the local shard of a DTensor)."""
    from torch.distributed.tensor import DTensor

    for param in params:
        grad = param.grad
        if grad is None:
            continue
        local = grad.to_local() if isinstance(grad, DTensor) else grad
        if local.numel():
            with torch.no_grad():
                local.view(-1)[0] = math.inf
            return
