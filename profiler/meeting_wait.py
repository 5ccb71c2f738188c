"""How long a rank waits for its peers each time the ranks of a plan meet, measured inside the executor's model.

A training step meets its peers at every collective that every rank must reach: each FSDP unit's all-gather and
reduce-scatter, each DDP bucket, each pipeline hand-off, the loss and gradient-norm reductions. A rank's compute
between two meetings varies from one time to the next (on a CPU the OS takes a core for a moment and the ranks share
caches and memory bandwidth; on a GPU clocks and kernel timings vary), so at each meeting the earlier ranks wait for
the latest, and a meeting costs the slowest rank's segment, not the mean one: for two ranks whose segments vary
independently with standard deviation sigma, 0.56 sigma more (the expected maximum of n normal draws; David &
Nagaraja, *Order Statistics*, 2003, table of E[max]). The collective profile cannot see this (its ranks are lined
up by a barrier before every call), nor can layers timed on their own.

So every rank runs the run's model (profiler/compute.py `model_for_run`) forward and backward, alternately free and
with a one-element all_reduce at every block boundary (a forward pre-hook on each block, a gradient hook on each
block's input), each pass after a barrier, as a training step starts after the trainer's per-step reduction:

    wait per meeting = (median synced pass - median free pass) / meetings per pass - one all_reduce's own time

averaged over the ranks, never below 0. The cost model charges it once per meeting of a plan's step
(planner/cost/step.py `dp_meetings`, `pp_meetings`).
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from planner.specs import MeetingWait
from profiler.compute import ComputeSweep, ModelRun, autocast_for, model_for_run, no_gc_pauses
from profiler.timing import Timer, stats, time_repeats

if TYPE_CHECKING:
    import torch


def measure_meeting_wait(sweep: ComputeSweep, run: ModelRun, device: torch.device) -> MeetingWait:
    """The wait per meeting of every rank of the default process group, at the run's layer shape (module
    docstring); every rank calls this, and every rank gets the same result."""
    import torch
    import torch.distributed as dist

    from executor.models import next_token_loss

    under_test = model_for_run(sweep, run, device)
    one = torch.zeros(1, device=device)
    meetings = 0

    def meet() -> None:
        nonlocal meetings
        meetings += 1
        dist.all_reduce(one)

    autocast = autocast_for(sweep.dtype, device)

    def one_pass() -> None:
        under_test.model.zero_grad(set_to_none=True)
        with autocast():
            loss = next_token_loss(under_test.model(under_test.tokens), under_test.targets)
        loss.backward()

    def synced_pass() -> None:
        handles = _meet_at_block_boundaries(under_test.model, meet)
        try:
            one_pass()
        finally:
            for handle in handles:
                handle.remove()

    collective_s = statistics.median(time_repeats(meet, warmup=3, repeats=20, device=device, before_each=dist.barrier))
    free: list[float] = []
    synced: list[float] = []
    with no_gc_pauses():
        for attempt in range(sweep.warmup + sweep.repeats * sweep.passes):
            meetings = 0
            for kind, samples in ((one_pass, free), (synced_pass, synced)):  # alternating: drift weighs on both
                dist.barrier()
                seconds = _timed(kind, device)
                if attempt >= sweep.warmup:
                    samples.append(seconds)
    free_stats, synced_stats = stats(free), stats(synced)
    wait_s = (synced_stats.median_s - free_stats.median_s) / meetings - collective_s
    return MeetingWait(
        micro_batch_size=run.micro_batch_size,
        seq_len=run.seq_len,
        recompute=run.recompute,
        concurrent_ranks=dist.get_world_size(),
        meetings_per_pass=meetings,
        free=free_stats,
        synced=synced_stats,
        collective_s=_mean_over_ranks(collective_s, device),
        wait_s=max(0.0, _mean_over_ranks(wait_s, device)),
    )


def _meet_at_block_boundaries(model: Any, meet: Callable[[], None]) -> list[Any]:
    """Hooks that meet before each block's forward and when each block's input gradient is complete (the block's
    backward is done); their handles."""
    handles = []

    def before_block(module: Any, inputs: tuple[Any, ...]) -> None:
        meet()
        if getattr(inputs[0], "requires_grad", False):
            inputs[0].register_hook(lambda grad: meet())

    for block in model.layers.values():
        handles.append(block.register_forward_pre_hook(before_block))
    return handles


def _timed(call: Callable[[], object], device: torch.device) -> float:
    timer = Timer(device)
    with timer:
        call()
    return timer.elapsed_s()


def _mean_over_ranks(value: float, device: torch.device) -> float:
    import torch
    import torch.distributed as dist

    total = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(total)
    return float(total.item()) / dist.get_world_size()
