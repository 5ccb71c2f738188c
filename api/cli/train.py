"""`paraplan train` and `paraplan launch-script`: a run checked and written to its folder (executor.prepare), then
trained here under torchrun (api/commands/train.py) or printed as per-node torchrun lines or a Slurm script."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from api.cli.app import EXIT_BAD_INPUT, app, error_payload, print_error
from api.cli.app import console as _console
from api.commands.inputs import read_json_object
from api.errors import InputError
from planner.units import GiB

if TYPE_CHECKING:
    from api.commands.train import Summary
    from executor import launch
    from executor.config import RunDir

# Options `train` and `launch-script` share: what to run, where, and its hyperparameters.
StepsOption = Annotated[int, typer.Option("--steps", help="Optimizer steps to reach (a resumed run counts on).")]


OutOption = Annotated[Path, typer.Option("--out", help="The run's folder: run.json, metrics.jsonl, checkpoints, logs.")]


DataOption = Annotated[
    Path | None, typer.Option("--data", help="A text file, trained on as bytes (default: synthetic tokens).")
]


ResumeOption = Annotated[bool, typer.Option("--resume", help="Continue the run in --out from its newest checkpoint.")]


CheckpointEveryOption = Annotated[
    int, typer.Option("--checkpoint-every", help="Save every N steps (0: at the end and when stopped).")
]


LrOption = Annotated[float, typer.Option("--lr", help="Peak learning rate (warm-up, then cosine).")]


WarmupOption = Annotated[int | None, typer.Option("--warmup-steps", help="Warm-up steps (default 10% of --steps).")]


SeedOption = Annotated[int, typer.Option("--seed", help="Model initialisation and data order.")]


DeviceOption = Annotated[
    str, typer.Option("--device", help="cpu (gloo, fp32) or cuda (NCCL, at the request's precision).")
]


def _prepare(request: Path, options: Any) -> Any:
    """The checked run written to `options.out`, or None after printing why it cannot start."""
    from api.commands.train import prepare

    try:
        return prepare(read_json_object(request), options)
    except ValueError as exc:
        print_error(error_payload(exc), as_json=False)
        return None


@app.command()
def train(
    request: Annotated[Path, typer.Argument(help="A contract request with its `plan` (.json).")],
    steps: StepsOption,
    out: OutOption,
    nproc: Annotated[int | None, typer.Option("--nproc", help="Processes (default: the plan's GPU count).")] = None,
    data: DataOption = None,
    resume: ResumeOption = False,
    checkpoint_every: CheckpointEveryOption = 0,
    lr: LrOption = 3e-4,
    warmup_steps: WarmupOption = None,
    seed: SeedOption = 0,
    device: DeviceOption = "cpu",
) -> None:
    """Train the request's model under its plan on this machine (torchrun, one process per GPU or CPU rank).

    Exit 0 when every step ran, 1 on bad input (nothing started), 2 when another run holds --out (nothing
    started), 3 when a rank failed, 130 when stopped with Ctrl-C, SIGTERM or SIGHUP (after a checkpoint: continue
    with --resume)."""
    from api.cli.progress import RichProgress
    from api.cli.report import _header
    from api.commands.train import TrainOptions, exit_code, run_training
    from executor.config import RunDir

    options = TrainOptions(steps=steps, out=out, nproc=nproc, data=data, resume=resume,
                           checkpoint_every=checkpoint_every, lr=lr, warmup_steps=warmup_steps, seed=seed,
                           device=device)  # fmt: skip
    with _run_folder(out) as lock:  # before run.json is written: it may be a running run's
        run = _prepare(request, options)
        if run is None:
            raise typer.Exit(EXIT_BAD_INPUT)
        console = _console()
        console.print(_header(run.request), highlight=False)
        progress = RichProgress(console)
        result = run_training(run, RunDir(out), run.request.plan.num_gpus, resume, progress, pass_fds=(lock,))
    print_outcome(console, RunDir(out), result)
    raise typer.Exit(exit_code(result))


@contextmanager
def _run_folder(out: Path) -> Iterator[int]:
    """Hold the run folder's lock (executor/run_lock.py); exit 2, naming the holder's pid, if another run has it."""
    from api.commands.train import EXIT_FOLDER_IN_USE
    from executor import run_lock

    try:
        with run_lock.hold(out) as lock:
            yield lock
    except run_lock.RunFolderInUse as busy:
        print_error({"kind": "run_refused", "message": str(busy)}, as_json=False)
        raise typer.Exit(EXIT_FOLDER_IN_USE) from None


@app.command("launch-script")
def launch_script(
    request: Annotated[Path, typer.Argument(help="A contract request with its `plan` (.json).")],
    steps: StepsOption,
    out: Annotated[Path, typer.Option("--out", help="The run's folder, on a file system every node shares.")],
    nnodes: Annotated[
        int | None, typer.Option("--nnodes", help="Nodes (default: the request's cluster.num_nodes, else 1).")
    ] = None,
    nproc_per_node: Annotated[
        int | None, typer.Option("--nproc-per-node", help="Processes per node (default: cluster.gpus_per_node).")
    ] = None,
    rdzv_endpoint: Annotated[
        str | None, typer.Option("--rdzv-endpoint", help="host:port of the c10d rendezvous (on node 0).")
    ] = None,
    sbatch: Annotated[bool, typer.Option("--sbatch", help="Write a Slurm batch script instead.")] = False,
    submit: Annotated[bool, typer.Option("--submit", help="With --sbatch: submit it with sbatch.")] = False,
    job_name: Annotated[str, typer.Option("--job-name", help="Slurm job name.")] = "paraplan",
    time_limit: Annotated[str, typer.Option("--time", help="Slurm time limit.")] = "01:00:00",
    partition: Annotated[str | None, typer.Option("--partition", help="Slurm partition.")] = None,
    data: DataOption = None,
    resume: ResumeOption = False,
    checkpoint_every: CheckpointEveryOption = 0,
    lr: LrOption = 3e-4,
    warmup_steps: WarmupOption = None,
    seed: SeedOption = 0,
    device: DeviceOption = "cuda",
) -> None:
    """Write the run to --out and print the torchrun command for each node (or a Slurm batch script)."""
    from api.commands.train import EXIT_RUN_FAILED, TrainOptions, launch_script_text, worker_args
    from executor import launch
    from executor.config import RunDir

    per_node = nproc_per_node
    try:
        if submit and not sbatch:
            raise InputError("--submit needs --sbatch")
        if per_node is None:
            per_node = _gpus_per_node(request)
        if nnodes is None:
            nnodes = _num_nodes(request)
        spec = launch.LaunchSpec(nproc_per_node=per_node, nnodes=nnodes, rdzv_endpoint=rdzv_endpoint,
                                 args=worker_args(RunDir(out), resume))  # fmt: skip
    except ValueError as exc:
        print_error(error_payload(exc), as_json=False)
        raise typer.Exit(EXIT_BAD_INPUT) from None
    slurm = {"job_name": job_name, "time_limit": time_limit, "partition": partition} if sbatch else None
    try:  # everything that can be refused is checked before run.json is written
        text = launch_script_text(RunDir(out), spec, slurm)
        if submit and shutil.which("sbatch") is None:
            raise InputError("--submit: Slurm's sbatch is not on PATH; drop --submit to print the script")
    except ValueError as exc:
        print_error(error_payload(exc), as_json=False)
        raise typer.Exit(EXIT_BAD_INPUT) from None
    options = TrainOptions(steps=steps, out=out, nproc=nnodes * per_node, data=data, resume=resume,
                           checkpoint_every=checkpoint_every, lr=lr, warmup_steps=warmup_steps, seed=seed,
                           device=device)  # fmt: skip
    with _run_folder(out):  # run.json must not change under a running run
        if _prepare(request, options) is None:
            raise typer.Exit(EXIT_BAD_INPUT)
    if not submit:
        typer.echo(text, nl=False)
        return
    try:
        typer.echo(f"submitted batch job {launch.submit_sbatch(text, out)}")
    except ValueError as exc:
        print_error(error_payload(exc), as_json=False)
        raise typer.Exit(EXIT_RUN_FAILED) from None


def _gpus_per_node(request: Path) -> int:
    """The request's cluster.gpus_per_node: the default process count per node."""
    cluster = read_json_object(request).get("cluster")
    value = cluster.get("gpus_per_node") if isinstance(cluster, dict) else None
    if not isinstance(value, int) or isinstance(value, bool):
        raise InputError("give --nproc-per-node, or cluster.gpus_per_node in the request")
    return value


def _num_nodes(request: Path) -> int:
    """The request's cluster.num_nodes (the contract's default, 1, when it has none): the default node count."""
    cluster = read_json_object(request).get("cluster")
    value = cluster.get("num_nodes", 1) if isinstance(cluster, dict) else 1
    if not isinstance(value, int) or isinstance(value, bool):
        raise InputError.at("cluster.num_nodes", f"expected a whole number of nodes, got {value!r}")
    return value


def print_outcome(console: Console, run_dir: RunDir, result: launch.RunResult) -> None:
    from api.commands.train import Summary, failure_text

    summary = Summary.of(run_dir.read_metrics())
    console.print(summary_table(summary))
    if result.cancelled:
        latest = run_dir.latest_checkpoint()
        where = f"checkpoint at step {latest[0]}" if latest else "no checkpoint"
        console.print(f"stopped ({where}); continue with the same command and --resume")
    elif not result.ok:
        console.print(failure_text(result), style="red", markup=False, highlight=False)
    console.print(f"metrics: {run_dir.metrics_file}   logs: {result.run_log_dir or run_dir.logs}")


def summary_table(summary: Summary) -> Table:
    table = Table(title="training run", show_header=False)
    table.add_column("what")
    table.add_column("value", justify="right")
    table.add_row("steps done", str(summary.steps))
    table.add_row("loss first -> last", f"{_fmt(summary.first_loss, '.4f')} -> {_fmt(summary.last_loss, '.4f')}")
    table.add_row("median step time", _fmt(summary.median_step_time_s, ".4f", " s"))
    table.add_row("median tokens/s", _fmt(summary.median_tokens_per_s, ",.0f"))
    peak = None if summary.peak_memory_bytes is None else summary.peak_memory_bytes / GiB
    table.add_row("peak memory (max over ranks)", _fmt(peak, ".2f", " GiB"))
    return table


def _fmt(value: float | None, spec: str, unit: str = "") -> str:
    return "-" if value is None else f"{value:{spec}}{unit}"
