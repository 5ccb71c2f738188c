"""`paraplan profile compute|comm|all`: run the profilers, show their progress and results, save and store the profile.

The compute profile runs in this process (it imports torch when it starts measuring); the collective sweep runs
under torchrun through `executor.launch`, one worker per rank, and is turned into a profile with its alpha-beta
fits here. Across several nodes this command cannot start the other nodes' workers: it prints the torchrun line
for each node, and `--from-sweep` turns the file rank 0 wrote into a profile afterwards.
"""

from __future__ import annotations

import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from executor import launch
from planner.profiles import ProfileError
from planner.specs import HardwareProfile, LayerMeasurement, OptimizerMeasurement
from profiler import collectives, tp_layers
from profiler.compute import ComputeSweep
from profiler.fit import fit_all
from profiler.pool import pool_profiles


class ProfileRunError(RuntimeError):
    """A profiling run that failed (a rank died, the sweep wrote nothing): the message says which and why."""


def _progress(console: Console, label: str) -> Progress:
    return Progress(
        TextColumn(f"[bold]{label}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[what]}"),
        TimeElapsedColumn(),
        console=console,
    )


# ----------------------------------------------------------------------------------------------- compute


def run_compute(
    sweep: ComputeSweep, console: Console, after_pass: Callable[[int], None] | None = None
) -> HardwareProfile:
    """Measure `sweep` here, with a progress bar (one tick per layer shape, one for the optimizer); `after_pass`
    as `profile_compute` takes it."""
    from profiler.compute import profile_compute

    with _progress(console, "compute") as progress:
        task = progress.add_task("compute", total=sweep.passes * len(sweep.runs()) + 1, what="starting")

        def tick(done: int, total: int, what: str) -> None:
            progress.update(task, completed=done, total=total, what=what)

        return profile_compute(sweep, on_progress=tick, after_pass=after_pass)


def run_tp_layers(sweep: ComputeSweep, console: Console, cancel: threading.Event) -> tp_layers.RanksResult:
    """Time the sweep's layers on tp ranks (profiler/tp_layers.py) for every tp degree > 1 it names: one torchrun
    launch of tp workers per degree, with a progress bar."""
    layers: list[LayerMeasurement] = []
    for tp in sorted(t for t in set(sweep.tps) if t > 1):
        layers += _run_on_ranks(sweep, tp, (), f"layers on {tp} tp ranks", console, cancel).layers
    return tp_layers.RanksResult(layers, [])


def run_loaded_layers(
    sweep: ComputeSweep, nproc: int, console: Console, cancel: threading.Event
) -> tp_layers.RanksResult:
    """Time the sweep's one-device layers and optimizer step on `nproc` ranks at once (profiler/tp_layers.py
    `--loaded`): what each rank takes while every rank of the node computes."""
    return _run_on_ranks(sweep, nproc, ("--loaded",), f"layers on {nproc} loaded ranks", console, cancel)


def with_layers_on_ranks(
    profile: HardwareProfile, sweep: ComputeSweep, nproc: int, console: Console, cancel: threading.Event
) -> HardwareProfile:
    """`profile` (the sweep measured on one device) with what a node of `nproc` ranks adds: the layers on tp ranks
    for every tp degree of the sweep up to `nproc` (larger ones cannot run on the node; their shards' times and the
    fitted collectives cost them), and the one-device layers, optimizer step and meeting waits on `nproc` ranks
    busy at once. The sweep must hold tp 1 (`sweep_for_ranks`). One device: `profile` unchanged."""
    if nproc < 2:
        return profile
    on_node = replace(sweep, tps=tuple(tp for tp in sweep.tps if tp <= nproc))
    on_ranks = run_tp_layers(on_node, console, cancel), run_loaded_layers(sweep, nproc, console, cancel)
    return with_rank_measurements(profile, *on_ranks)


def measure_node(sweep: ComputeSweep, nproc: int, console: Console, cancel: threading.Event) -> HardwareProfile:
    """`sweep` measured on this node: alone and, with several ranks, on them (`with_layers_on_ranks`). With several
    ranks and passes, pass after pass of all three phases (alone, tp ranks, busy ranks), pooled (profiler/pool.py):
    a shared machine's speed drifts over the minutes between the phases, and measured one phase after another the
    drift lands on the ratios the cost model reads between them (a loaded layer's contention over its time alone,
    tp ranks against one device); pass by pass every phase samples the same stretch of time."""
    if nproc < 2 or sweep.passes == 1:
        return with_layers_on_ranks(run_compute(sweep, console), sweep, nproc, console, cancel)
    one_pass = replace(sweep, passes=1)
    passes = [
        with_layers_on_ranks(run_compute(one_pass, console), one_pass, nproc, console, cancel)
        for _ in range(sweep.passes)
    ]
    pooled = pool_profiles(passes)
    return pooled.model_copy(update={"settings": {**pooled.settings, "passes": sweep.passes}})


def sweep_for_ranks(sweep: ComputeSweep, nproc: int) -> ComputeSweep:
    """`sweep` with tp 1 added when there are several ranks: the loaded run times the one-device layers, which
    every plan's optimizer step and meeting waits are measured with."""
    if nproc < 2 or 1 in sweep.tps:
        return sweep
    return replace(sweep, tps=(1, *sweep.tps))


def with_rank_measurements(profile: HardwareProfile, *results: tp_layers.RanksResult) -> HardwareProfile:
    """`profile` with the layers, optimizer steps and meeting waits timed on several ranks added."""
    added = {
        name: [*getattr(profile, name), *(m for result in results for m in getattr(result, name))]
        for name in ("layers", "optimizer", "meeting_waits")
    }
    return profile.model_copy(update=added)


def _run_on_ranks(
    sweep: ComputeSweep, nproc: int, flags: tuple[str, ...], label: str, console: Console, cancel: threading.Event
) -> tp_layers.RanksResult:
    """One torchrun launch of profiler/tp_layers.py on `nproc` ranks with `flags`, with a progress bar."""
    folder = Path(tempfile.mkdtemp(prefix="paraplan-layers-on-ranks-"))
    sweep_file, out = folder / "sweep.json", folder / "result.json"
    sweep_file.write_text(sweep.to_json())
    spec = launch.LaunchSpec(
        nproc_per_node=nproc,
        module="profiler.tp_layers",
        args=("--sweep", str(sweep_file), "--out", str(out), *flags),
        log_dir=folder / "logs",
    )
    env = {"OMP_NUM_THREADS": str(sweep.threads)} if sweep.threads is not None else None
    with _progress(console, label) as progress:
        task = progress.add_task("ranks", total=None, what="starting workers")
        on_line = _line_handler(progress, task, lambda record: record["what"])
        result = launch.run(spec, env=env, on_line=on_line, cancel=cancel)
    _require_finished(result, f"timing {label}", folder)
    return tp_layers.read_result(out)


# ------------------------------------------------------------------------------------------- collectives


@dataclass(frozen=True)
class CommLaunch:
    """A collective sweep to launch: `nproc` workers per node on `nnodes` nodes, with the sweep's worker args."""

    nproc: int
    nnodes: int
    sweep_args: tuple[str, ...]
    rdzv_endpoint: str | None = None

    def spec(self, log_dir: Path | None = None) -> launch.LaunchSpec:
        return launch.LaunchSpec(
            nproc_per_node=self.nproc,
            nnodes=self.nnodes,
            rdzv_endpoint=self.rdzv_endpoint,
            module="profiler.collectives",
            args=self.sweep_args,
            log_dir=log_dir,
        )


def comm_violations(nproc: int, nnodes: int) -> list[str]:
    """Why `nproc` x `nnodes` ranks cannot form the groups a sweep measures: every group needs two ranks."""
    if nproc < 1 or nnodes < 1:
        return [f"--nproc and --nnodes must be >= 1, got {nproc} and {nnodes}"]
    if nproc * nnodes < 2:
        return [f"a collective needs a group of at least 2 ranks; --nproc {nproc} on {nnodes} node(s) gives 1"]
    return []


def per_node_text(comm: CommLaunch) -> str:
    """The torchrun line to start on each node of a multi-node sweep."""
    commands = launch.per_node_commands(comm.spec())
    return "".join(f"# node {rank} of {comm.nnodes}:\n{command}\n" for rank, command in enumerate(commands))


def run_comm(comm: CommLaunch, sweep_file: Path, console: Console, cancel: threading.Event) -> HardwareProfile:
    """Run a one-node sweep under torchrun with a progress bar; the profile of what it measured, with fits."""
    log_dir = Path(tempfile.mkdtemp(prefix="paraplan-comm-"))
    with _progress(console, "collectives") as progress:
        task = progress.add_task("collectives", total=None, what="starting workers")
        on_line = _line_handler(progress, task, lambda r: f"{r['tier']} {r['op']} {r['size_bytes']:,} B")
        result = launch.run(comm.spec(log_dir), on_line=on_line, cancel=cancel)
    _require_finished(result, "the collective sweep", log_dir)
    return comm_profile(sweep_file)


def _require_finished(result: launch.RunResult, what: str, log_dir: Path) -> None:
    """ProfileRunError unless the workers' launch finished and succeeded: stopped, or which rank failed and why."""
    if result.cancelled:
        raise ProfileRunError(f"{what} was stopped before it finished")
    if not result.ok:
        cause = result.root_cause
        why = f"rank {cause.rank} exited with {cause.exitcode}: {cause.message}" if cause else "see the logs"
        raise ProfileRunError(f"{what} failed: {why} (logs: {result.run_log_dir or log_dir})")


def _line_handler(progress: Progress, task: Any, describe: Callable[[dict[str, Any]], str]) -> Callable[[str], None]:
    """Moves the progress bar on each of the workers' progress lines (profiler.collectives.progress_line)."""

    def on_line(line: str) -> None:
        record = collectives.parse_progress_line(line)
        if record is not None:
            progress.update(task, completed=record["done"], total=record["total"], what=describe(record))

    return on_line


def comm_profile(sweep_file: Path) -> HardwareProfile:
    """The profile of a finished sweep's result file (rank 0's), with one alpha-beta fit per op, tier and size.
    ProfileError for a file that is not a sweep result, or whose timings cannot be fitted."""
    try:
        meta, measurements = collectives.read_result(sweep_file)
    except ValueError as error:
        raise ProfileError(str(error), field="--from-sweep") from None
    try:
        fits = fit_all(measurements)
    except ValueError as error:  # e.g. times that do not grow with size: latency and noise only
        raise ProfileError(f"cannot fit the sweep in {sweep_file}: {error}", field="collectives") from None
    fields = ("device_kind", "device_name", "hosts", "torch_version", "cuda_version", "nccl_version", "created")
    return HardwareProfile(
        device_count=meta["world_size"],
        settings=meta["settings"] | {"kind": "collectives", "nnodes": meta["nnodes"], "backend": meta["backend"]},
        collectives=measurements,
        collective_fits=fits,
        comm_compute_overlap=meta.get("overlap", {}).get("fraction"),
        **{name: meta[name] for name in fields},
    )


# ------------------------------------------------------------------------------------------------ both


def merge(compute: HardwareProfile, comm: HardwareProfile) -> HardwareProfile:
    """One profile of one machine type: the compute measurements with the collectives' added."""
    if compute.device_kind != comm.device_kind:
        raise ProfileRunError(
            f"the compute profile ran on {compute.device_kind}, the collectives on {comm.device_kind}: "
            "profile both on the same device"
        )
    return compute.model_copy(
        update={
            "device_count": comm.device_count,
            "hosts": sorted(set(compute.hosts) | set(comm.hosts)),
            "nccl_version": comm.nccl_version,
            "settings": {"compute": compute.settings, "collectives": comm.settings},
            "collectives": comm.collectives,
            "collective_fits": comm.collective_fits,
            "comm_compute_overlap": comm.comm_compute_overlap,
        }
    )


def save(profile: HardwareProfile, out: Path, store: bool, name: str | None) -> str | None:
    """Write the profile to `out` and, with `store`, add it to the database; the stored id, if any."""
    from profiler.store import ProfileStore, save_profile_json

    save_profile_json(profile, out)
    if not store:
        return None
    with ProfileStore() as database:
        return database.add(profile, name=name)


# ----------------------------------------------------------------------------------------------- tables


def layer_table(profile: HardwareProfile) -> Table:
    """Per-layer forward / backward medians (ms), saved activations (MiB) and the repeats' spread."""
    table = Table(title=f"layer times on {profile.device_name}", title_justify="left")
    columns = ("layer", "recompute", "timed on", "tp", "mbs", "seq", "fwd ms", "bwd ms", "saved MiB", "spread")
    for column in columns:
        table.add_column(column, justify="left" if column in ("layer", "recompute", "timed on") else "right")
    for m in profile.layers:
        spread = max(m.forward.spread, m.backward.spread)
        flag = " [yellow]unstable[/yellow]" if m.forward.unstable or m.backward.unstable else ""
        table.add_row(
            m.layer, m.recompute if m.layer == "block" else "-", _timed_on(m), str(m.tp), str(m.micro_batch_size),
            str(m.seq_len), f"{m.forward.median_s * 1e3:.3f}", f"{m.backward.median_s * 1e3:.3f}",
            f"{m.saved_bytes / 2**20:.2f}", f"{spread:.0%}{flag}",
        )  # fmt: skip
    lines = [_optimizer_line(o) for o in profile.optimizer]
    lines += [
        f"wait per meeting of {w.concurrent_ranks} ranks at mbs {w.micro_batch_size}: {w.wait_s * 1e3:.3f} ms"
        for w in profile.meeting_waits
    ]
    table.caption = "\n".join(lines) or None
    return table


def _timed_on(m: LayerMeasurement) -> str:
    """Where a layer was timed: one device alone (a tp shard there), tp ranks with their collectives, or every
    rank of the node busy at once."""
    if m.tp_collectives:
        return f"{m.tp} tp ranks" + (" (sp)" if m.sequence_parallel else "")
    if m.concurrent_ranks > 1:
        return f"{m.concurrent_ranks} ranks busy"
    return "alone"


def _optimizer_line(o: OptimizerMeasurement) -> str:
    per_param_ns = o.time.median_s / o.num_params * 1e9
    how = f", {o.concurrent_ranks} ranks busy" if o.concurrent_ranks > 1 else ""
    how += ", DTensor shards" if o.sharded else ""
    return f"{o.optimizer} step: {per_param_ns:.2f} ns per parameter ({o.num_params:,} parameters{how})"


def collective_table(profile: HardwareProfile) -> Table:
    """Bus bandwidth (GB/s) of each op at each measured size, one column per op and tier, and the fits below."""
    series = sorted({(m.tier, m.op, m.group_size) for m in profile.collectives})
    sizes = sorted({m.size_bytes for m in profile.collectives})
    busbw = {(m.tier, m.op, m.group_size, m.size_bytes): m for m in profile.collectives}
    table = Table(title="bus bandwidth, GB/s (nccl-tests convention)", title_justify="left")
    table.add_column("size", justify="right")
    for tier, op, n in series:
        table.add_column(f"{op}\n{tier} n={n}", justify="right")
    for size in sizes:
        cells = [_busbw_cell(busbw.get((tier, op, n, size))) for tier, op, n in series]
        table.add_row(_size_text(size), *cells)
    fits = [
        f"{f.op} {f.tier} n={f.group_size}: latency {f.latency_s * 1e6:.1f} us, busbw {f.bandwidth_GBps:.2f} GB/s, "
        f"log-R2 {f.r2:.3f}, max error {f.max_rel_error:.0%}"
        for f in profile.collective_fits
    ]
    table.caption = "\n".join(fits)
    return table


def _busbw_cell(measurement: Any) -> str:
    if measurement is None:
        return "-"
    mark = "*" if measurement.time.unstable else ""
    return f"{measurement.busbw_GBps:.3f}{mark}"


def _size_text(size_bytes: int) -> str:
    for unit, scale in (("MiB", 2**20), ("KiB", 2**10)):
        if size_bytes >= scale:
            return f"{size_bytes / scale:g} {unit}"
    return f"{size_bytes} B"
