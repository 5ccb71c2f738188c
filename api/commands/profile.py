"""`profile compute|comm|all`: the options of each (typed records), their checks (no torch), and the measurement.

The compute profile runs in this process (it imports torch when it starts measuring); the collective sweep runs
under torchrun through `executor.launch`, one worker per rank, and is turned into a profile with its alpha-beta
fits here. Across several nodes this command cannot start the other nodes' workers: the CLI prints the torchrun
line for each node (`per_node_text`), and `from_sweep` turns the file rank 0 wrote into a profile afterwards.
Progress goes through `api.commands.progress.Progress`.

Each launch works in a folder of its own beside the profile it measures for (`launch_folder`), never in the system's
temporary folder: a profiling job's files stay in its job folder, inside the data folder.
"""

from __future__ import annotations

import re
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict

from api.commands.defaults import ALL_COLLECTIVES
from api.commands.flags import SWEEP_FLAGS, flag_name
from api.commands.progress import Progress, Update
from api.errors import InputError
from executor import launch
from planner.profiles import ProfileError
from planner.specs import HardwareProfile, LayerMeasurement, ModelSpec
from profiler import collectives, tp_layers
from profiler.compute import ComputeSweep
from profiler.fit import fit_all
from profiler.pool import pool_profiles


class ProfileRunError(RuntimeError):
    """A profiling run that failed (a rank died, the sweep wrote nothing): the message says which and why."""


class ProfileRunStopped(ProfileRunError):
    """A profiling run stopped before it finished (Ctrl-C, SIGTERM, SIGHUP, a job's cancel)."""


# ----------------------------------------------------------------------------------------------- options


class _Output(BaseModel):
    """Where a profile goes: the file `out` and, with `store`, the database under `name`."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    out: Path
    store: bool = True
    name: str | None = None


class ComputeOptions(_Output):
    """`profile compute`: the layer shapes to time and how."""

    model: ModelSpec
    seq_len: tuple[int, ...]
    mbs: tuple[int, ...] = (1, 2, 4)
    tp: tuple[int, ...] = (1,)
    recompute: tuple[str, ...] = ("none", "selective", "full")
    device: str = "cpu"
    dtype: str = "fp32"
    optimizer: str = "adamw"
    warmup: int = 3
    repeats: int = 10
    threads: int | None = None
    passes: int = 1


class CommOptions(_Output):
    """`profile comm`: the collective sweep (or, with `from_sweep`, a finished multi-node sweep's file)."""

    nproc: int = 2
    nnodes: int = 1
    rdzv_endpoint: str | None = None
    min_bytes: int = 1024
    max_bytes: int = 256 * 2**20
    ops: tuple[str, ...] = ALL_COLLECTIVES
    warmup: int = 5
    repeats: int = 20
    backend: str | None = None
    from_sweep: Path | None = None


class AllOptions(ComputeOptions):
    """`profile all`: compute and collectives on this node; every collective from 1 KiB, with the compute's
    warm-up and repeats."""

    nproc: int = 2
    max_bytes: int = 256 * 2**20


OPTIONS: dict[str, type[_Output]] = {"compute": ComputeOptions, "comm": CommOptions, "all": AllOptions}


def compute_sweep(options: ComputeOptions) -> ComputeSweep:
    """The ComputeSweep the options describe, or ComputeSweepError naming the bad flag."""
    from profiler.compute import ComputeSweepError

    sweep = ComputeSweep(
        model=options.model, seq_lens=options.seq_len, micro_batch_sizes=options.mbs, tps=options.tp,
        recompute_modes=options.recompute, dtype=options.dtype, device=options.device,  # type: ignore[arg-type]
        optimizer=options.optimizer, warmup=options.warmup, repeats=options.repeats,  # type: ignore[arg-type]
        threads=options.threads, passes=options.passes,
    )  # fmt: skip
    problems = sweep.violations()
    if problems:
        flags = [SWEEP_FLAGS.get(field, flag_name(field)) for field, _ in problems]
        message = "; ".join(f"{flag}: {why}" for flag, (_, why) in zip(flags, problems, strict=True))
        raise ComputeSweepError(flags[0], message)
    return sweep


def comm_launch(options: CommOptions | AllOptions) -> CommLaunch:
    """The collective sweep the options describe, checked before anything starts (`profile all`: one node, every
    collective from 1 KiB, with the compute's warm-up and repeats)."""
    from profiler.collectives import sweep_command_args

    if isinstance(options, AllOptions):
        options = CommOptions(out=options.out, nproc=options.nproc, max_bytes=options.max_bytes,
                              warmup=options.warmup, repeats=options.repeats)  # fmt: skip
    nproc, nnodes = options.nproc, options.nnodes
    problems = comm_violations(nproc, nnodes)
    if problems:
        raise InputError("; ".join(problems), fields=[{"field": "--nproc", "message": p} for p in problems])
    if nnodes > 1 and options.rdzv_endpoint is None:
        raise InputError("--rdzv-endpoint host:port (node 0's address) is needed with --nnodes > 1")
    try:
        args = sweep_command_args(sweep_file(options.out), options.min_bytes, options.max_bytes, ",".join(options.ops),
                                  options.warmup, options.repeats, options.backend)  # fmt: skip
    except ValueError as exc:  # the sweep's own checks start with the flag (--ops, --min-bytes, ...)
        flag = re.match(r"--[a-z][a-z-]*", str(exc))
        raise InputError(str(exc), fields=[{"field": flag.group(0), "message": str(exc)}] if flag else None) from None
    comm = CommLaunch(nproc, nnodes, args, options.rdzv_endpoint)
    comm.spec()  # LaunchSpec's own checks (ranks, endpoint)
    return comm


def check(options: _Output) -> None:
    """Every check the measurement would make before starting (no torch): what a job runs before it is queued."""
    if isinstance(options, ComputeOptions):
        compute_sweep(options)
    if isinstance(options, (CommOptions, AllOptions)) and getattr(options, "from_sweep", None) is None:
        comm_launch(options)


def sweep_file(out: Path) -> Path:
    """Where rank 0 writes the raw sweep: next to the profile, so a multi-node sweep can be turned into one."""
    return out.with_name(out.stem + ".sweep.json")


# ------------------------------------------------------------------------------------------- operations


def measure(options: _Output, progress: Progress, cancel: threading.Event) -> HardwareProfile:
    """The profile the options ask for (a one-node sweep; a multi-node one's `from_sweep` file)."""
    if isinstance(options, AllOptions):
        sweep = sweep_for_ranks(compute_sweep(options), options.nproc)
        comm = comm_launch(options)
        compute = measure_node(sweep, options.nproc, progress, cancel, work_dir=options.out.parent)
        return merge(compute, run_comm(comm, sweep_file(options.out), progress, cancel))
    if isinstance(options, ComputeOptions):
        return run_compute(compute_sweep(options), progress, cancel)
    assert isinstance(options, CommOptions)
    if options.from_sweep is not None:
        return comm_profile(options.from_sweep)
    return run_comm(comm_launch(options), sweep_file(options.out), progress, cancel)


def run_compute(
    sweep: ComputeSweep,
    progress: Progress,
    cancel: threading.Event | None = None,
    after_pass: Callable[[int], None] | None = None,
) -> HardwareProfile:
    """Measure `sweep` here, with a progress bar (one tick per layer shape, one for the optimizer); `after_pass`
    as `profile_compute` takes it. ProfileRunError once `cancel` is set: the sweep runs in this process, so a stop
    is seen between one layer shape and the next (a shape takes seconds), not when the whole sweep is done."""
    from profiler.compute import profile_compute

    with progress.task("compute", total=sweep.passes * len(sweep.runs()) + 1, what="starting") as update:

        def on_progress(done: int, total: int, what: str) -> None:
            if cancel is not None and cancel.is_set():
                raise ProfileRunError("the compute sweep was stopped before it finished")
            update(done, total, what)

        return profile_compute(sweep, on_progress=on_progress, after_pass=after_pass)


def run_tp_layers(
    sweep: ComputeSweep, progress: Progress, cancel: threading.Event, work_dir: Path
) -> tp_layers.RanksResult:
    """Time the sweep's layers on tp ranks (profiler/tp_layers.py) for every tp degree > 1 it names: one torchrun
    launch of tp workers per degree, with a progress bar; each launch works in a folder in `work_dir`."""
    layers: list[LayerMeasurement] = []
    for tp in sorted(t for t in set(sweep.tps) if t > 1):
        layers += _run_on_ranks(sweep, tp, (), f"layers on {tp} tp ranks", progress, cancel, work_dir).layers
    return tp_layers.RanksResult(layers, [])


def run_loaded_layers(
    sweep: ComputeSweep, nproc: int, progress: Progress, cancel: threading.Event, work_dir: Path
) -> tp_layers.RanksResult:
    """Time the sweep's one-device layers and optimizer step on `nproc` ranks at once (profiler/tp_layers.py
    `--loaded`): what each rank takes while every rank of the node computes. The launch works in `work_dir`."""
    label = f"layers on {nproc} loaded ranks"
    return _run_on_ranks(sweep, nproc, ("--loaded",), label, progress, cancel, work_dir)


def with_layers_on_ranks(
    profile: HardwareProfile,
    sweep: ComputeSweep,
    nproc: int,
    progress: Progress,
    cancel: threading.Event,
    work_dir: Path,
) -> HardwareProfile:
    """`profile` (the sweep measured on one device) with what a node of `nproc` ranks adds: the layers on tp ranks
    for every tp degree of the sweep up to `nproc` (larger ones cannot run on the node; their shards' times and the
    fitted collectives cost them), and the one-device layers, optimizer step and meeting waits on `nproc` ranks
    busy at once. The sweep must hold tp 1 (`sweep_for_ranks`). One device: `profile` unchanged. The launches work
    in folders in `work_dir`."""
    if nproc < 2:
        return profile
    on_node = replace(sweep, tps=tuple(tp for tp in sweep.tps if tp <= nproc))
    on_ranks = (
        run_tp_layers(on_node, progress, cancel, work_dir),
        run_loaded_layers(sweep, nproc, progress, cancel, work_dir),
    )
    return with_rank_measurements(profile, *on_ranks)


def measure_node(
    sweep: ComputeSweep, nproc: int, progress: Progress, cancel: threading.Event, work_dir: Path
) -> HardwareProfile:
    """`sweep` measured on this node: alone and, with several ranks, on them (`with_layers_on_ranks`). With several
    ranks and passes, pass after pass of all three phases (alone, tp ranks, busy ranks), pooled (profiler/pool.py):
    a shared machine's speed drifts over the minutes between the phases, and measured one phase after another the
    drift lands on the ratios the cost model reads between them (a loaded layer's contention over its time alone,
    tp ranks against one device); pass by pass every phase samples the same stretch of time. The launches on ranks
    work in folders in `work_dir`."""
    if nproc < 2 or sweep.passes == 1:
        return with_layers_on_ranks(run_compute(sweep, progress, cancel), sweep, nproc, progress, cancel, work_dir)
    one_pass = replace(sweep, passes=1)
    passes = [
        with_layers_on_ranks(run_compute(one_pass, progress, cancel), one_pass, nproc, progress, cancel, work_dir)
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


@contextmanager
def launch_folder(work_dir: Path, what: str) -> Iterator[Path]:
    """A fresh folder in `work_dir` (beside the profile being measured) for one launch's files: its input, its
    result, torchrun's logs. Removed when the block ends, unless the launch failed: then its logs stay, and the
    error names them."""
    work_dir.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix=f"{what}-launch-", dir=work_dir))
    try:
        yield folder
    except ProfileRunStopped:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    except ProfileRunError:
        raise  # a rank failed: its logs are what says why
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    shutil.rmtree(folder, ignore_errors=True)


def _run_on_ranks(
    sweep: ComputeSweep,
    nproc: int,
    flags: tuple[str, ...],
    label: str,
    progress: Progress,
    cancel: threading.Event,
    work_dir: Path,
) -> tp_layers.RanksResult:
    """One torchrun launch of profiler/tp_layers.py on `nproc` ranks with `flags`, with a progress bar."""
    with launch_folder(work_dir, "layers-on-ranks") as folder:
        sweep_file, out = folder / "sweep.json", folder / "result.json"
        sweep_file.write_text(sweep.to_json())
        spec = launch.LaunchSpec(
            nproc_per_node=nproc,
            module="profiler.tp_layers",
            args=("--sweep", str(sweep_file), "--out", str(out), *flags),
            log_dir=folder / "logs",
        )
        env = {"OMP_NUM_THREADS": str(sweep.threads)} if sweep.threads is not None else None
        with progress.task(label, what="starting workers") as update:
            on_line = _line_handler(update, lambda record: record["what"])
            result = launch.run(spec, env=env, on_line=on_line, cancel=cancel)
        _require_finished(result, f"timing {label}", folder)
        return tp_layers.read_result(out)


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


def run_comm(comm: CommLaunch, sweep_file: Path, progress: Progress, cancel: threading.Event) -> HardwareProfile:
    """Run a one-node sweep under torchrun with a progress bar; the profile of what it measured, with fits. The
    launch works in a folder beside `sweep_file`."""
    with launch_folder(sweep_file.parent, "comm") as log_dir:
        with progress.task("collectives", what="starting workers") as update:
            on_line = _line_handler(update, lambda r: f"{r['tier']} {r['op']} {r['size_bytes']:,} B")
            result = launch.run(comm.spec(log_dir), on_line=on_line, cancel=cancel)
        _require_finished(result, "the collective sweep", log_dir)
    return comm_profile(sweep_file)


def _require_finished(result: launch.RunResult, what: str, log_dir: Path) -> None:
    """ProfileRunError unless the workers' launch finished and succeeded: stopped, or which rank failed and why."""
    if result.cancelled:
        raise ProfileRunStopped(f"{what} was stopped before it finished")
    if not result.ok:
        cause = result.root_cause
        why = f"rank {cause.rank} exited with {cause.exitcode}: {cause.message}" if cause else "see the logs"
        raise ProfileRunError(f"{what} failed: {why} (logs: {result.run_log_dir or log_dir})")


def _line_handler(update: Update, describe: Callable[[dict[str, Any]], str]) -> Callable[[str], None]:
    """Moves the progress bar on each of the workers' progress lines (profiler.collectives.progress_line)."""

    def on_line(line: str) -> None:
        record = collectives.parse_progress_line(line)
        if record is not None:
            update(record["done"], record["total"], describe(record))

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
