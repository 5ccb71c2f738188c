"""What one training run is, and where it keeps its files. No torch: the CLI and the REST service validate a run
and read its progress without importing it.

A run lives in one output folder::

    OUT/run.json                     the request (model, training, cluster, plan) and the TrainConfig
    OUT/metrics.jsonl                one line per step, written by rank 0
    OUT/checkpoints/step_000010/     torch.distributed.checkpoint files; `paraplan.json` marks it complete
    OUT/logs/                        torchrun's per-rank stdout / stderr / error files

Rank 0 also prints each step's metrics as one stdout line after STEP_MARKER, which is how a supervisor shows
progress without polling files (`parse_step_line`).
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from planner.request import EstimateRequest

STEP_MARKER = "paraplan.step "
COMPLETE_MARKER = "paraplan.json"
"""Written into a checkpoint folder by rank 0 once every rank has saved: a folder without it is incomplete
(the run died while saving) and is never resumed from."""


class TrainConfig(BaseModel):
    """Hyperparameters and bookkeeping of a run; the model, batch and plan come from the request."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    steps: int = Field(ge=1, description="optimizer steps to reach (counted from step 0, resumed runs included)")
    lr: float = Field(3e-4, gt=0, description="peak learning rate")
    warmup_steps: int | None = Field(None, ge=0, description="linear warm-up steps; default 10% of `steps`")
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="the cosine decays to lr x min_lr_ratio")
    weight_decay: float = Field(0.1, ge=0)
    max_grad_norm: float | None = Field(1.0, gt=0, description="clip the global gradient norm; null: no clipping")
    seed: int = Field(0, ge=0, description="model initialisation and data order")
    data: Path | None = Field(None, description="a text file, read as bytes; null: the synthetic token stream")
    checkpoint_every: int = Field(0, ge=0, description="save every N steps; 0: only at the end and on SIGTERM")
    keep_checkpoints: int = Field(2, ge=1, description="complete checkpoints kept; older ones are deleted")
    checkpoints: bool = Field(
        True, description="false: save none, not even at the end or on SIGTERM (a run that only measures)"
    )
    device: Literal["cpu", "cuda"] = "cpu"

    @field_validator("warmup_steps")
    @classmethod
    def _warmup_within_run(cls, warmup_steps: int | None, info: ValidationInfo) -> int | None:
        steps = info.data.get("steps")  # absent when `steps` itself failed validation
        if warmup_steps is not None and steps is not None and warmup_steps > steps:
            raise ValueError(f"warmup_steps ({warmup_steps}) must not exceed steps ({steps})")
        return warmup_steps

    @property
    def warmup(self) -> int:
        return self.warmup_steps if self.warmup_steps is not None else self.steps // 10

    def learning_rate(self, step: int) -> float:
        """The rate for optimizer step `step` (1 to `steps`): a linear warm-up reaching `lr` at step `warmup`
        (Goyal et al. 2017, "Accurate, Large Minibatch SGD", sec. 2.2), then one cosine cycle down to
        `lr * min_lr_ratio` at the last step (Loshchilov & Hutter, SGDR, ICLR 2017, eq. 5). A pure function of
        the step, so a resumed run continues on the same curve with no scheduler state to restore."""
        if step <= self.warmup:
            return self.lr * (step / self.warmup)  # exactly lr at step == warmup
        progress = min(1.0, (step - self.warmup) / max(1, self.steps - self.warmup))
        floor = self.lr * self.min_lr_ratio
        return floor + (self.lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


class TrainRun(BaseModel):
    """`run.json`: everything a worker needs, written by the launcher before any process starts."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    request: EstimateRequest
    config: TrainConfig

    def same_training_as(self, other: TrainRun) -> list[str]:
        """What differs between two runs in ways that make resuming one from the other wrong (empty: none).
        `steps` may grow, and checkpointing settings may change."""
        mine, theirs = self.request.model_dump(), other.request.model_dump()
        differences = [f"request.{key}" for key in mine if mine[key] != theirs[key]]
        free = {"steps", "checkpoint_every", "keep_checkpoints", "warmup_steps"}
        config, other_config = self.config.model_dump(exclude=free), other.config.model_dump(exclude=free)
        differences += [f"config.{key}" for key in config if config[key] != other_config[key]]
        if self.config.warmup != other.config.warmup:
            differences.append("config.warmup_steps")
        return differences


class RunDir:
    """The files of one run under `root`."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    @property
    def run_file(self) -> Path:
        return self.root / "run.json"

    @property
    def metrics_file(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    def write_run(self, run: TrainRun) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self.run_file.write_text(run.model_dump_json(indent=2) + "\n")

    def read_run(self) -> TrainRun:
        return TrainRun.model_validate_json(self.run_file.read_text())

    def checkpoint_dir(self, step: int) -> Path:
        return self.checkpoints / f"step_{step:06d}"

    def complete_checkpoints(self) -> list[tuple[int, Path]]:
        """(step, folder) of every checkpoint that finished saving, oldest first."""
        if not self.checkpoints.is_dir():
            return []
        found = [
            (int(path.name.removeprefix("step_")), path)
            for path in self.checkpoints.glob("step_*")
            if path.name.removeprefix("step_").isdigit() and (path / COMPLETE_MARKER).is_file()
        ]
        return sorted(found)

    def latest_checkpoint(self) -> tuple[int, Path] | None:
        checkpoints = self.complete_checkpoints()
        return checkpoints[-1] if checkpoints else None

    def prune_checkpoints(self, keep: int) -> None:
        """Delete all but the newest `keep` complete checkpoints, and incomplete ones older than those kept."""
        complete = self.complete_checkpoints()
        kept = {path for _, path in complete[-keep:]}
        oldest_kept = min((step for step, path in complete if path in kept), default=None)
        for path in self.checkpoints.glob("step_*"):
            step = path.name.removeprefix("step_")
            if path in kept or not step.isdigit():
                continue
            if (path / COMPLETE_MARKER).is_file() or (oldest_kept is not None and int(step) < oldest_kept):
                shutil.rmtree(path, ignore_errors=True)

    def read_metrics(self) -> list[dict[str, Any]]:
        """The metrics lines written so far (a torn last line, from a run killed mid-write, is skipped)."""
        if not self.metrics_file.is_file():
            return []
        records = []
        for line in self.metrics_file.read_text().splitlines():
            try:
                records.append(json.loads(line))
            except ValueError:
                continue
        return records

    def truncate_metrics(self, last_step: int) -> None:
        """Keep the metrics of steps <= `last_step`: a resumed run recomputes the steps after its checkpoint."""
        kept = [record for record in self.read_metrics() if record.get("step", 0) <= last_step]
        self.metrics_file.write_text("".join(json.dumps(record) + "\n" for record in kept))


def step_line(record: dict[str, Any]) -> str:
    return STEP_MARKER + json.dumps(record)


def parse_marked_line(line: str, marker: str) -> dict[str, Any] | None:
    """The JSON object after `marker` in a worker's output line (torchrun may prefix it with `[default0]:`),
    else None. Workers report progress this way: training steps here, profiling progress in profiler/."""
    _, found, payload = line.partition(marker)
    if not found:
        return None
    try:
        record = json.loads(payload)
    except ValueError:
        return None
    return record if isinstance(record, dict) else None


def parse_step_line(line: str) -> dict[str, Any] | None:
    """The metrics record of a step line (`step_line`), else None."""
    return parse_marked_line(line, STEP_MARKER)
