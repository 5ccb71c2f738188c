"""The training entry point, run on every rank by torchrun: `python -m executor.train --run-file OUT/run.json`.

Each rank builds the same full model from the request's ModelSpec (same seed), takes its share of the plan
(`executor.apply.apply_plan`), and trains for `config.steps` optimizer steps on global batches that are the same
whatever the plan (`executor.data`). Rank 0 appends one JSON line per step to `OUT/metrics.jsonl` and prints it
after `STEP_MARKER`. Checkpoints go to `OUT/checkpoints/` (`executor.train_state`); `--resume` continues from
the newest complete one and reproduces the losses an uninterrupted run would have had.

SIGTERM (from torchrun, Slurm preemption or `paraplan train` on Ctrl-C) stops the run cleanly: the ranks agree
to stop after the step in flight, save a checkpoint, and exit 0. SIGHUP (torchrun passes on the one it got) does
the same, and so does the death of torchrun's agent (`executor.lifeline`): a rank never trains on as an orphan.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import signal
import sys
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.elastic.multiprocessing.errors import record

from executor import lifeline, precision, train_state
from executor.apply import AppliedPlan, apply_plan
from executor.config import RunDir, TrainConfig, TrainRun, step_line
from executor.data import batches
from executor.mesh import build_mesh
from executor.models import build_model, next_token_loss


class StopRequest:
    """Set by SIGTERM or SIGHUP; the ranks act on it together (see `Trainer._agree`), never inside the handler."""

    def __init__(self) -> None:
        self.requested = False
        for sig in (signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: object) -> None:
        self.requested = True


@dataclass
class Trainer:
    run: TrainRun
    run_dir: RunDir
    applied: AppliedPlan
    optimizers: list[torch.optim.Optimizer]
    device: torch.device
    autocast: Callable[[], AbstractContextManager[Any]]
    stop: StopRequest
    scaler: Any = None  # fp16's GradScaler (executor/precision.py); None for bf16 and fp32

    @property
    def config(self) -> TrainConfig:
        return self.run.config

    @property
    def is_rank0(self) -> bool:
        return dist.get_rank() == 0

    def train(self, first_step: int) -> int:
        """Steps first_step + 1 .. config.steps; returns the last step done (earlier on SIGTERM)."""
        training = self.run.request.training
        data = batches(
            vocab_size=self.run.request.model.vocab_size,
            seq_len=training.seq_len,
            global_batch=training.global_batch_size,
            seed=self.config.seed,
            data=self.config.data,
            first_step=first_step,
        )
        step = first_step
        for step in range(first_step + 1, self.config.steps + 1):
            batch = next(data)
            started = time.perf_counter()
            loss, outcome = self._step(step, torch.from_numpy(batch.tokens), torch.from_numpy(batch.targets))
            step_time_s = time.perf_counter() - started
            stop, peak_bytes = self._agree()
            self._record(step, loss, outcome, step_time_s, peak_bytes, self.applied.aux_loss())
            if self._checkpoint_due(step) or (stop and self.config.checkpoints):
                self.save(step)
            if stop:
                break
        return step

    def _step(self, step: int, tokens: torch.Tensor, targets: torch.Tensor) -> tuple[float, precision.OptimizerStep]:
        lr = self.config.learning_rate(step)
        for optimizer in self.optimizers:
            optimizer.zero_grad(set_to_none=True)
            for group in optimizer.param_groups:
                group["lr"] = lr
        scale_loss = self.scaler.scale if self.scaler is not None else None
        with self.autocast():
            loss = self.applied.step(tokens, targets, scale_loss=scale_loss)
        if precision.overflow_hook_step(dist.get_rank()) == step:
            precision.inject_overflow(self.applied.parameters())
        max_norm = self.config.max_grad_norm
        clip = (lambda: self.applied.clip_grad_norm_(max_norm)) if max_norm is not None else None
        outcome = precision.step_optimizers(self.optimizers, self.scaler, clip)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return loss, outcome

    def _agree(self) -> tuple[bool, int]:
        """One small all-reduce per step: did any rank get SIGTERM, and the peak memory over all ranks."""
        flags = torch.tensor([int(self.stop.requested), peak_memory_bytes(self.device)], device=self.device)
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        return bool(flags[0].item()), int(flags[1].item())

    def _record(
        self,
        step: int,
        loss: float,
        outcome: precision.OptimizerStep,
        step_time_s: float,
        peak_bytes: int,
        aux_loss: float | None,
    ) -> None:
        """Rank 0 logs the step. `loss` is the language-model cross-entropy; a mixture of experts also trains on
        ROUTER_AUX_LOSS_COEF x `aux_loss` (executor/models/routing.py), logged apart as Megatron-LM logs its
        load_balancing_loss (1.0 when the routing is balanced)."""
        if not self.is_rank0:
            return
        training = self.run.request.training
        metrics = {
            "step": step,
            "loss": loss,
            "step_time_s": step_time_s,
            "tokens_per_s": training.global_batch_size * training.seq_len / step_time_s,
            "peak_memory_bytes": peak_bytes,
            "lr": self.config.learning_rate(step),
            "grad_norm": outcome.grad_norm,
            "loss_scale": outcome.loss_scale,
            "skipped": outcome.skipped,
        }
        if aux_loss is not None:
            metrics["aux_loss"] = aux_loss
        with self.run_dir.metrics_file.open("a") as file:
            file.write(json.dumps(metrics) + "\n")
        print(step_line(metrics), flush=True)

    def _checkpoint_due(self, step: int) -> bool:
        if not self.config.checkpoints:
            return False
        every = self.config.checkpoint_every
        return step == self.config.steps or (every > 0 and step % every == 0)

    def save(self, step: int) -> None:
        train_state.save(self.run_dir.checkpoint_dir(step), step, self.applied.chunks, self.optimizers, self.scaler)
        if self.is_rank0:
            self.run_dir.prune_checkpoints(self.config.keep_checkpoints)
            print(f"paraplan: checkpoint saved at step {step}", flush=True)

    def resume(self) -> int:
        """Load the newest complete checkpoint; the step it was taken at (0 when there is none)."""
        latest = self.run_dir.latest_checkpoint()
        step = 0
        if latest is not None:
            step, folder = latest
            train_state.load(folder, self.applied.chunks, self.optimizers, self.scaler)
        dist.barrier()  # rank 0 rewrites the metrics file only once every rank has found the same checkpoint
        if self.is_rank0:
            self.run_dir.truncate_metrics(step)  # the steps after it are trained again
            print(f"paraplan: resuming after step {step}", flush=True)
        return step


def peak_memory_bytes(device: torch.device) -> int:
    """CUDA: the caching allocator's peak allocated bytes. CPU: the process's peak resident set (Linux reports
    ru_maxrss in KiB), which includes the Python interpreter and torch itself."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _device(config: TrainConfig) -> torch.device:
    if config.device == "cpu":
        return torch.device("cpu")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if not torch.cuda.is_available() or local_rank >= torch.cuda.device_count():
        raise RuntimeError(f"--device cuda: local rank {local_rank} has no GPU ({torch.cuda.device_count()} visible)")
    torch.cuda.set_device(local_rank)
    return torch.device("cuda", local_rank)


def _optimizers(run: TrainRun, applied: AppliedPlan) -> list[torch.optim.Optimizer]:
    config = run.config
    if run.request.training.optimizer == "sgd":
        return applied.make_optimizers(torch.optim.SGD, lr=config.lr, momentum=0.9, weight_decay=config.weight_decay)
    return applied.make_optimizers(torch.optim.AdamW, lr=config.lr, weight_decay=config.weight_decay)


def build_trainer(run: TrainRun, run_dir: RunDir, stop: StopRequest) -> Trainer:
    device = _device(run.config)
    plan = run.request.plan
    mesh = build_mesh(plan, device.type)
    model = build_model(run.request.model, device=device, seed=run.config.seed)
    applied = apply_plan(model, plan, mesh, training=run.request.training, loss_fn=next_token_loss, device=device)
    precision_name = run.request.training.precision
    autocast = precision.autocast_for(precision_name, device)
    scaler = precision.grad_scaler_for(precision_name, device)
    return Trainer(run, run_dir, applied, _optimizers(run, applied), device, autocast, stop, scaler)


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m executor.train", description=__doc__)
    parser.add_argument("--run-file", type=Path, required=True, help="run.json written by `paraplan train`")
    parser.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint")
    return parser.parse_args(argv)


@record
def main(argv: list[str] | None = None) -> None:
    args = _parse_args(argv)
    stop = StopRequest()  # before the process group: a SIGTERM during start-up must not kill the rank mid-way
    lifeline.watch_parent()  # torchrun's agent killed: SIGTERM to this rank, as if the agent had sent it
    run_dir = RunDir(args.run_file.parent)
    run = run_dir.read_run()
    device_type = run.config.device
    dist.init_process_group("nccl" if device_type == "cuda" else "gloo")
    trainer = build_trainer(run, run_dir, stop)
    first_step = trainer.resume() if args.resume else 0
    last_step = trainer.train(first_step)
    if trainer.is_rank0 and stop.requested:
        print(f"paraplan: stopped by SIGTERM after step {last_step}", flush=True)
    dist.barrier()
    dist.destroy_process_group()
    # Leave without interpreter finalization: with torch 2.13 + gloo a gloo worker thread can still be releasing
    # a finished collective's tensors when Python finalizes, and the rank then aborts (SIGABRT) after all its
    # work is done (tests/distributed/parity_worker.py has the details). Everything is written and flushed.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
