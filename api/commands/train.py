"""`train` and `launch-script`: check a run, launch it under torchrun, report its progress, sum up what it measured.

No torch here: the run is checked by `executor.prepare` and launched by `executor.launch`; the workers import
torch. Progress comes from the metrics line rank 0 prints after each step (`executor.config.parse_step_line`)
and goes through `api.commands.progress.Progress`.
"""

from __future__ import annotations

import statistics
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict

from api.commands.cancel import stop_on_interrupt
from api.commands.progress import Progress, Update
from executor import launch
from executor.config import RunDir, TrainConfig, TrainRun, parse_step_line

if TYPE_CHECKING:
    from planner.request import EstimateRequest

EXIT_RUN_FAILED = 3  # a rank failed; the run's logs say why


EXIT_STOPPED = 130  # stopped by Ctrl-C / SIGTERM / SIGHUP after a checkpoint (the shell's code for an interrupt)


EXIT_FOLDER_IN_USE = 2  # another run holds the run folder (executor/run_lock.py): nothing started


GRACE_S = 60.0
"""How long a stopping run may take to finish its step and save a checkpoint before it is killed."""


class TrainOptions(BaseModel):
    """A run's own options, beside the contract request it trains (which the CLI reads from a file and a training
    job takes from its body): how long, with what data and hyperparameters, where, on how many processes."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    steps: int
    out: Path
    nproc: int | None = None  # default: the plan's GPU count
    data: Path | None = None  # a text file, trained on as bytes; None: synthetic tokens
    resume: bool = False
    checkpoint_every: int = 0
    lr: float = 3e-4
    warmup_steps: int | None = None
    seed: int = 0
    device: str = "cpu"

    def config(self) -> TrainConfig:
        """The executor's TrainConfig (its own checks name the field at fault)."""
        fields = ("steps", "data", "checkpoint_every", "lr", "warmup_steps", "seed", "device")
        return TrainConfig(**{name: getattr(self, name) for name in fields if getattr(self, name) is not None})


def prepare(request: dict[str, Any] | EstimateRequest, options: TrainOptions) -> TrainRun:
    """The run checked and written to `options.out` (run.json), ready to launch; ValueError naming the field at
    fault otherwise."""
    from executor.prepare import prepare_run

    return prepare_run(request, options.config(), options.out, nproc=options.nproc, resume=options.resume)


def worker_args(run_dir: RunDir, resume: bool) -> tuple[str, ...]:
    return ("--run-file", str(run_dir.run_file.resolve()), *(("--resume",) if resume else ()))


def local_spec(run_dir: RunDir, nproc: int, resume: bool) -> launch.LaunchSpec:
    return launch.LaunchSpec(nproc_per_node=nproc, args=worker_args(run_dir, resume), log_dir=run_dir.logs)


@dataclass(frozen=True)
class Summary:
    """What a finished (or stopped) run measured, from its metrics file."""

    steps: int
    first_loss: float | None
    last_loss: float | None
    median_step_time_s: float | None
    median_tokens_per_s: float | None
    peak_memory_bytes: int | None

    @classmethod
    def of(cls, records: list[dict[str, Any]]) -> Summary:
        if not records:
            return cls(0, None, None, None, None, None)
        # The first step pays for lazy initialisation (allocator warm-up, optimizer state): leave it out of the
        # steady-state figures when there is anything else to go on.
        steady = records[1:] or records
        return cls(
            steps=records[-1]["step"],
            first_loss=records[0]["loss"],
            last_loss=records[-1]["loss"],
            median_step_time_s=statistics.median(r["step_time_s"] for r in steady),
            median_tokens_per_s=statistics.median(r["tokens_per_s"] for r in steady),
            peak_memory_bytes=max(r["peak_memory_bytes"] for r in records),
        )


def _line_handler(update: Update, progress: Progress) -> Callable[[str], None]:
    def on_line(line: str) -> None:
        record = parse_step_line(line)
        if record is not None:
            aux = f" aux {record['aux_loss']:.3f}" if "aux_loss" in record else ""  # a mixture of experts'
            update(record["step"], what=f"loss {record['loss']:.4f}{aux} {record['tokens_per_s']:,.0f} tok/s")
        elif "paraplan: " in line:  # checkpoints, resume and stop notices from rank 0
            progress.note(line.partition("paraplan: ")[2], style="dim")

    return on_line


def run_training(
    run: TrainRun, run_dir: RunDir, nproc: int, resume: bool, progress: Progress, pass_fds: tuple[int, ...] = ()
) -> launch.RunResult:
    """Launch the run locally and report its progress until it ends (or is stopped with Ctrl-C, SIGTERM or SIGHUP).
    `pass_fds`: the run folder's lock (executor/run_lock.py), held by torchrun until its workers are gone."""
    latest = run_dir.latest_checkpoint() if resume else None
    first_step = latest[0] if latest else 0
    cancel = threading.Event()
    task = progress.task("train", total=run.config.steps, done=first_step, what="loss - - tok/s")
    with task as update, stop_on_interrupt(cancel):
        spec = local_spec(run_dir, nproc, resume)
        on_line = _line_handler(update, progress)
        return launch.run(spec, on_line=on_line, cancel=cancel, grace_s=GRACE_S, pass_fds=pass_fds)


def exit_code(result: launch.RunResult) -> int:
    if result.cancelled:
        return EXIT_STOPPED
    return 0 if result.ok else EXIT_RUN_FAILED


def failure_text(result: launch.RunResult) -> str:
    """Which rank failed first and why, with the tail of its error output."""
    cause = result.root_cause
    if cause is None:
        return f"training failed: torchrun exited with {result.returncode}; see the logs"
    lines = [f"training failed: rank {cause.rank} exited with {cause.exitcode}: {cause.message or '(no message)'}"]
    others = [failed.rank for failed in result.failed_ranks if failed is not cause]
    if others:
        lines.append(f"also stopped or failed: ranks {', '.join(map(str, others))}")
    return "\n".join(lines)


def launch_script_text(run_dir: RunDir, spec: launch.LaunchSpec, sbatch: dict[str, Any] | None) -> str:
    """The per-node torchrun lines, or a Slurm batch script, for a run already written to `run_dir`."""
    if sbatch is not None:
        return launch.sbatch_script(spec, **sbatch)
    commands = launch.per_node_commands(spec)
    return "".join(f"# node {rank} of {spec.nnodes}:\n{command}\n" for rank, command in enumerate(commands))
