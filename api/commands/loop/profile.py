"""The profile a validation measures: the layer shapes its plans use, alone and on ranks, and the collectives."""

from __future__ import annotations

import math
import threading

from api.commands.loop.setup import ValidationSetup, profile_needs
from api.commands.progress import Progress
from api.errors import InputError
from planner.cost.params import model_params
from planner.specs import HardwareProfile, ModelSpec, ParallelPlan
from profiler.compute import ComputeSweep

# With one pass of runs, the profile is measured in three passes, each timing every layer shape alone, on tp ranks
# and on busy ranks (api/commands/profile.py `measure_node`), pooled by their median: a shared machine's speed drifts
# over minutes, and passes spread that drift over every shape and phase instead of on whichever ran during a slow spell,
# and with three a slow pass is outvoted. With several passes of runs, one profile pass comes before each
# (`_profile_and_run`).
PROFILE_PASSES = 3


def measure_profile(
    setup: ValidationSetup,
    plans: list[ParallelPlan],
    progress: Progress,
    cancel: threading.Event,
    passes: int = PROFILE_PASSES,
    collectives: bool = True,
) -> HardwareProfile:
    """A profile of this machine for the plans: their layer shapes (alone, on tp ranks, and on all `nproc` ranks
    at once), in `passes` passes of all three, and, with `collectives`, the collectives of `nproc` ranks."""
    from api.commands.profile import CommLaunch, measure_node, merge, run_comm
    from profiler.collectives import sweep_command_args

    sweep = layer_sweep(setup, plans, passes)
    problems = sweep.violations()
    if problems:
        raise InputError("; ".join(f"{field}: {why}" for field, why in problems))
    compute = measure_node(sweep, setup.nproc, progress, cancel, work_dir=setup.out)
    if setup.nproc < 2 or not collectives:
        return compute
    sweep_file = setup.out / "profile.sweep.json"
    comm = CommLaunch(setup.nproc, 1, sweep_command_args(sweep_file, max_bytes=largest_message_bytes(setup.model)))
    return merge(compute, run_comm(comm, sweep_file, progress, cancel))


def layer_sweep(setup: ValidationSetup, plans: list[ParallelPlan], passes: int = PROFILE_PASSES) -> ComputeSweep:
    """The layer shapes of `plans` for `setup`'s model and precision, as the profiler sweeps them on `nproc`
    ranks."""
    from api.commands.profile import sweep_for_ranks

    needs = profile_needs(plans)
    sweep = ComputeSweep(
        model=setup.model,
        seq_lens=(setup.seq_len,),
        micro_batch_sizes=tuple(needs["micro_batch_sizes"]),
        tps=tuple(needs["tps"]),
        recompute_modes=tuple(needs["recompute_modes"]),
        dtype=setup.training_precision,  # type: ignore[arg-type]
        device=setup.device,
        threads=setup.threads if setup.device == "cpu" else None,
        sequence_parallel=tuple(needs["sequence_parallel"]),
        passes=passes,
    )
    return sweep_for_ranks(sweep, setup.nproc)


def largest_message_bytes(model: ModelSpec) -> int:
    """The collective sweep's largest message: the power of two that holds the model's fp32 gradients (the
    largest buffer a plan reduces), between 4 MiB (below it gloo's times are latency and noise that the fit
    cannot split) and 256 MiB. Larger messages only lengthen the sweep (a gloo sweep to 256 MiB takes minutes);
    the alpha-beta fit carries the bandwidth to any size."""
    gradient_bytes = 4 * model_params(model)
    return int(min(2**28, max(2**22, 2 ** math.ceil(math.log2(gradient_bytes)))))
