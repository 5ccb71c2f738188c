"""Tensor-parallel layer times under torchrun: the executor's own tensor-parallel layers, timed on `tp` ranks.

The single-device compute sweep (profiler/compute.py) times the shard of a layer that one of `tp` ranks holds, and
the cost model adds tensor parallelism's collectives from the collective fits. A tensor-parallel rank runs more than
that: DTensor dispatches every op of the sharded layers in Python and redistributes activations around them, and
the collectives synchronise the ranks. On a CPU with gloo that overhead is larger than the shard's arithmetic, so
a layer measured as a shard, plus the fitted collectives, predicts a tensor-parallel step a good deal faster than
it runs. So the profiler also times the layers as the executor runs them: the model (``model_blocks`` blocks)
parallelised by executor/parallel/tensor.py on a mesh of every rank, under each recompute mode and
sequence-parallel setting, at the layer boundaries as profiler/layer_timing.py does. These measurements carry
``tp_collectives=True`` (planner/specs.py LayerMeasurement); the cost model then takes TP's collectives as part of
the layer times and does not add them again (planner/graph.py).

Run on every rank, with as many ranks as the tensor-parallel degree::

    torchrun --nproc-per-node TP -m profiler.tp_layers --sweep SWEEP.json --out FILE.json

SWEEP.json is a ComputeSweep (``ComputeSweep.to_json``). Rank 0 writes ``{"layers": [LayerMeasurement, ...]}``
(their saved bytes are those of one rank's shard, measured on rank 0 alone) and prints one progress line per run
(profiler.collectives.progress_line).
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from planner.specs import LayerMeasurement
from profiler.collectives import progress_line
from profiler.compute import ComputeSweep, measure_run, time_in_model
from profiler.layer_timing import LayerSamples
from profiler.worker import leave, run_recorded, write_json_atomically

if TYPE_CHECKING:
    import torch


def read_result(path: Path) -> list[LayerMeasurement]:
    """The measurements rank 0 wrote; ValueError naming the file if it is not such a result."""
    try:
        rows = json.loads(path.read_text())["layers"]
        return [LayerMeasurement.model_validate(row) for row in rows]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ValueError(f"{path} is not a tensor-parallel layer sweep result: {error}") from error


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


def _measure(sweep: ComputeSweep, device: torch.device) -> list[LayerMeasurement]:
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
    samples = {run: LayerSamples() for run in runs}
    total = sweep.passes * len(runs)
    for done, run in enumerate(runs * sweep.passes, start=1):
        samples[run].extend(time_in_model(sweep, run, device, tp_mesh=mesh))
        if dist.get_rank() == 0:
            print(progress_line({"done": done, "total": total, "what": run.describe()}), flush=True)
    if dist.get_rank() != 0:
        return []
    on_ranks = {"tp_collectives": True}
    return [
        measurement.model_copy(update=on_ranks | {"sequence_parallel": run.sequence_parallel})
        for run in runs
        for measurement in measure_run(sweep, run, samples[run], device)
    ]


def _run(argv: Sequence[str] | None) -> None:
    import torch.distributed as dist

    parser = argparse.ArgumentParser(prog="python -m profiler.tp_layers", description=__doc__.split("\n\n")[0])
    parser.add_argument("--sweep", type=Path, required=True, help="a ComputeSweep as JSON (ComputeSweep.to_json)")
    parser.add_argument("--out", type=Path, required=True, help="JSON file rank 0 writes")
    args = parser.parse_args(argv)
    sweep = ComputeSweep.from_json(args.sweep.read_text())
    device = _init(sweep)
    layers = _measure(sweep, device)
    if dist.get_rank() == 0:
        write_json_atomically(args.out, {"layers": [m.model_dump(mode="json") for m in layers]})
    leave()


def main(argv: Sequence[str] | None = None) -> None:
    """The worker entry point (profiler/worker.py `run_recorded`)."""
    run_recorded(_run, argv)


if __name__ == "__main__":
    main()
