"""Layer times on several ranks under torchrun: the executor's own tensor-parallel layers, timed on `tp` ranks; and
with ``--loaded``, the one-device layers timed on every rank of the node at once.

The single-device compute sweep (profiler/compute.py) times the shard of a layer that one of `tp` ranks holds, and
the cost model adds tensor parallelism's collectives from the collective fits. A tensor-parallel rank runs more than
that: DTensor dispatches every op of the sharded layers in Python and redistributes activations around them, and
the collectives synchronise the ranks. On a CPU with gloo that overhead is larger than the shard's arithmetic, so
a layer measured as a shard, plus the fitted collectives, predicts a tensor-parallel step a good deal faster than
it runs. So the profiler also times the layers as the executor runs them: the model (``model_blocks`` blocks)
parallelised by executor/parallel/tensor.py on a mesh of every rank, under each recompute mode and
sequence-parallel setting, at the layer boundaries as profiler/layer_timing.py does. These measurements carry
``tp_collectives=True`` (planner/specs/profile.py LayerMeasurement); the cost model then takes TP's collectives as
part of the layer times and does not add them again (planner/cost/layers.py).

Loaded (``--loaded``): a data-parallel or pipelined step keeps every rank of a node computing at the same time, and
ranks that share cores, caches and memory bandwidth (CPU ranks, above all) each run slower than one rank alone,
which is how the single-device sweep times them. So every rank times its own copy of the sweep's one-device
(tp = 1) runs and of the optimizer step at once, lined up by a barrier before each, and rank 0's times are
recorded with ``concurrent_ranks`` = the world size (planner/specs/profile.py LayerMeasurement); the cost model uses
them for plans that keep that many ranks of a node busy. The optimizer step is also timed on the model sharded over
every rank by FSDP2 (``sharded``): the parameters of FSDP2 and tensor-parallel plans are DTensors, and DTensor's
dispatch of every optimizer op costs more than the arithmetic on a small model's shards.

Run on every rank, with as many ranks as the tensor-parallel degree (or, loaded, as the node has)::

    torchrun --nproc-per-node TP -m profiler.tp_layers --sweep SWEEP.json --out FILE.json [--loaded]

SWEEP.json is a ComputeSweep (``ComputeSweep.to_json``). Rank 0 writes ``{"layers": [LayerMeasurement, ...],
"optimizer": [OptimizerMeasurement, ...], "meeting_waits": [MeetingWait, ...]}`` (saved bytes are those of one
rank's shard, measured on rank 0 alone; the optimizer and, at each micro-batch size, the wait per meeting of the
ranks (profiler/meeting_wait.py) only when loaded) and prints one progress line per run and per wait
(profiler.collectives.progress_line).
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from planner.specs import LayerMeasurement, MeetingWait, OptimizerMeasurement
from profiler.collectives import progress_line
from profiler.compute import ComputeSweep, ModelRun, measure_optimizer, measure_run, time_in_model
from profiler.layer_timing import LayerSamples
from profiler.meeting_wait import measure_meeting_wait
from profiler.worker import leave, run_recorded, write_json_atomically

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class RanksResult:
    """What rank 0 wrote: layer measurements and (loaded) the optimizer step."""

    layers: list[LayerMeasurement]
    optimizer: list[OptimizerMeasurement]
    meeting_waits: list[MeetingWait] = field(default_factory=list)


def read_result(path: Path) -> RanksResult:
    """The measurements rank 0 wrote; ValueError naming the file if it is not such a result."""
    try:
        data = json.loads(path.read_text())
        return RanksResult(
            layers=[LayerMeasurement.model_validate(row) for row in data["layers"]],
            optimizer=[OptimizerMeasurement.model_validate(row) for row in data.get("optimizer", [])],
            meeting_waits=[MeetingWait.model_validate(row) for row in data.get("meeting_waits", [])],
        )
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ValueError(f"{path} is not a layer sweep result of several ranks: {error}") from error


def _init(sweep: ComputeSweep) -> torch.device:
    """The process group (nccl on this rank's GPU, gloo on the CPU) and the device to time on."""
    import torch
    import torch.distributed as dist

    if sweep.device == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
        return device
    if sweep.threads is not None:
        torch.set_num_threads(sweep.threads)
    dist.init_process_group("gloo")
    return torch.device("cpu")


def _measure_tp(sweep: ComputeSweep, device: torch.device) -> list[LayerMeasurement]:
    """Every run of the sweep at this world's tp degree, pooled over `sweep.passes`; rank 0's result."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    tp = dist.get_world_size()
    mesh = init_device_mesh(device.type, (tp,), mesh_dim_names=("tp",))
    runs = sweep.tp_runs(tp)
    if not runs:
        raise ValueError(f"the sweep has no tensor-parallel degree {tp} (tps: {list(sweep.tps)}); launch with one")
    # One untimed run first: the first DTensor collectives of a process set up gloo's pairs and DTensor's caches,
    # which the first run's few warm-ups do not all absorb.
    time_in_model(sweep, runs[0], device, tp_mesh=mesh)
    samples = _time_runs(sweep, runs, lambda run: time_in_model(sweep, run, device, tp_mesh=mesh))
    if dist.get_rank() != 0:
        return []
    on_ranks = {"tp_collectives": True, "concurrent_ranks": tp}
    return [
        measurement.model_copy(update=on_ranks | {"sequence_parallel": run.sequence_parallel})
        for run in runs
        for measurement in measure_run(sweep, run, samples[run], device)
    ]


def _measure_loaded(sweep: ComputeSweep, device: torch.device) -> RanksResult:
    """The sweep's one-device runs and its optimizer step, timed on every rank at once, the optimizer on plain
    parameters and on DTensor shards over every rank (profiler.compute.measure_optimizer); rank 0's result."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    runs = [run for run in sweep.runs() if run.tp == 1]
    if not runs:
        raise ValueError(f"the sweep has no tp degree 1 (tps: {list(sweep.tps)}): nothing runs on one device")
    wait_runs = list({run.micro_batch_size: run for run in reversed(runs)}.values())[::-1]  # first mode per size
    progress = _Progress(total=sweep.passes * len(runs) + len(wait_runs))
    samples = _time_runs(sweep, runs, lambda run: time_in_model(sweep, run, device), progress)
    dist.barrier()
    optimizer = measure_optimizer(sweep, device)
    dist.barrier()
    sharded = measure_optimizer(sweep, device, shard_mesh=init_device_mesh(device.type, (dist.get_world_size(),)))
    waits = _measure_waits(sweep, wait_runs, device, progress)
    if dist.get_rank() != 0:
        return RanksResult([], [])
    loaded = {"concurrent_ranks": dist.get_world_size()}
    layers = [m.model_copy(update=loaded) for run in runs for m in measure_run(sweep, run, samples[run], device)]
    return RanksResult(layers, [optimizer.model_copy(update=loaded), sharded.model_copy(update=loaded)], waits)


def _measure_waits(
    sweep: ComputeSweep, runs: list[ModelRun], device: torch.device, progress: _Progress
) -> list[MeetingWait]:
    """The wait per meeting (profiler/meeting_wait.py) at the shape of each of `runs`."""
    waits = []
    for run in runs:
        waits.append(measure_meeting_wait(sweep, run, device))
        progress.tick(f"meeting wait mbs={run.micro_batch_size} seq={run.seq_len}")
    return waits


@dataclass
class _Progress:
    """Rank 0's progress lines (profiler.collectives.progress_line), counting to `total`."""

    total: int
    done: int = 0

    def tick(self, what: str) -> None:
        import torch.distributed as dist

        self.done += 1
        if dist.get_rank() == 0:
            print(progress_line({"done": self.done, "total": self.total, "what": what}), flush=True)


def _time_runs(
    sweep: ComputeSweep,
    runs: list[ModelRun],
    time_run: Callable[[ModelRun], LayerSamples],
    progress: _Progress | None = None,
) -> dict[ModelRun, LayerSamples]:
    """`time_run` of every run, `sweep.passes` times over, pooled; every rank starts each run together (a
    barrier), and a progress line follows each (`progress`: counting on from it, else to these runs)."""
    import torch.distributed as dist

    progress = progress or _Progress(total=sweep.passes * len(runs))
    samples = {run: LayerSamples() for run in runs}
    for run in runs * sweep.passes:
        dist.barrier()
        samples[run].extend(time_run(run))
        progress.tick(run.describe())
    return samples


def _run(argv: Sequence[str] | None) -> None:
    import torch.distributed as dist

    parser = argparse.ArgumentParser(prog="python -m profiler.tp_layers", description=__doc__.split("\n\n")[0])
    parser.add_argument("--sweep", type=Path, required=True, help="a ComputeSweep as JSON (ComputeSweep.to_json)")
    parser.add_argument("--out", type=Path, required=True, help="JSON file rank 0 writes")
    parser.add_argument("--loaded", action="store_true", help="time the one-device runs on every rank at once")
    args = parser.parse_args(argv)
    sweep = ComputeSweep.from_json(args.sweep.read_text())
    device = _init(sweep)
    result = _measure_loaded(sweep, device) if args.loaded else RanksResult(_measure_tp(sweep, device), [])
    if dist.get_rank() == 0:
        write_json_atomically(args.out, {
            "layers": [m.model_dump(mode="json") for m in result.layers],
            "optimizer": [m.model_dump(mode="json") for m in result.optimizer],
            "meeting_waits": [m.model_dump(mode="json") for m in result.meeting_waits],
        })  # fmt: skip
    leave()


def main(argv: Sequence[str] | None = None) -> None:
    """The worker entry point (profiler/worker.py `run_recorded`)."""
    run_recorded(_run, argv)


if __name__ == "__main__":
    main()
