"""The training entry point under real torchrun with gloo: it learns, it resumes exactly, it stops and fails
cleanly.

Each run is a tiny Llama-style model on 2 processes (a few seconds). Killing is done the hard way (SIGKILL to
every process of the launch, or to one rank), and every test ends by checking that no process of its run is
left: a leftover rank is exactly the failure a user would notice last.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest

pytest.importorskip("torch")

from executor import launch  # noqa: E402
from executor.config import RunDir, TrainConfig, parse_step_line  # noqa: E402
from executor.data import SHIPPED_TEXT  # noqa: E402
from executor.prepare import prepare_run  # noqa: E402
from tests.train_requests import tiny_train_request  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
LAUNCH_TIMEOUT_S = 120


def spec_for(run_dir: RunDir, resume: bool = False) -> launch.LaunchSpec:
    args = ["--run-file", str(run_dir.run_file), *(["--resume"] if resume else [])]
    return launch.LaunchSpec(nproc_per_node=2, args=tuple(args), log_dir=run_dir.logs)


def run_to_end(run_dir: RunDir, resume: bool = False) -> launch.RunResult:
    result = launch.run(spec_for(run_dir, resume), timeout_s=LAUNCH_TIMEOUT_S)
    assert result.ok, _logs(result)
    return result


def _logs(result: launch.RunResult) -> str:
    log = result.log_dir / launch.LAUNCHER_LOG
    return log.read_text()[-6000:] if log.is_file() else "(no launcher log)"


def losses(run_dir: RunDir) -> list[float]:
    return [record["loss"] for record in run_dir.read_metrics()]


def processes_of(run_dir: RunDir) -> list[int]:
    """Live processes whose command line names this run's folder (torchrun and its workers)."""
    needle = str(run_dir.root).encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if needle in (entry / "cmdline").read_bytes() and launch.pid_alive(int(entry.name)):
                found.append(int(entry.name))
        except OSError:
            continue
    return found


def assert_nothing_left(run_dir: RunDir) -> None:
    deadline = time.monotonic() + 10
    while processes_of(run_dir) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert processes_of(run_dir) == []


def rank_pid(run_dir: RunDir, rank: int) -> int:
    """The pid of the worker with RANK=`rank` in this run."""
    for pid in processes_of(run_dir):
        try:
            environ = (Path("/proc") / str(pid) / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in environ:
            return pid
    raise AssertionError(f"no live worker with RANK={rank}")


def test_cli_trains_on_the_shipped_text_and_the_loss_falls(tmp_path):
    """`paraplan train` end to end (README's demo, smaller): metrics on every step, and the model learns."""
    request = tmp_path / "request.json"
    request.write_text(
        __import__("json").dumps(tiny_train_request({"dp": 2, "zero_stage": 1}, hidden=128, seq_len=128))
    )
    out = tmp_path / "run"
    command = [sys.executable, "-m", "api.cli", "train", str(request), "--steps", "30", "--out", str(out),
               "--data", str(SHIPPED_TEXT), "--lr", "3e-3"]  # fmt: skip
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT_S)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    assert "steps done" in done.stdout
    records = RunDir(out).read_metrics()
    assert [r["step"] for r in records] == list(range(1, 31))
    for record in records:
        assert record["tokens_per_s"] == pytest.approx(8 * 128 / record["step_time_s"])
        assert record["peak_memory_bytes"] > 50 * 2**20  # a resident set: torch alone is more than this
    first, last_five = records[0]["loss"], [r["loss"] for r in records[-5:]]
    assert first == pytest.approx(5.55, abs=0.3)  # ln 256: an untrained model guesses uniformly
    assert max(last_five) < first - 1.5, [r["loss"] for r in records]
    assert RunDir(out).latest_checkpoint()[0] == 30
    assert_nothing_left(RunDir(out))


RESUME_LAYOUTS = {
    "dp2-zero1": {"dp": 2, "zero_stage": 1},
    "pp2-interleaved": {
        "dp": 1,
        "pp": 2,
        "schedule": "interleaved_1f1b",
        "virtual_stages": 2,
        "micro_batch_size": 2,
    },  # fmt: skip
    "dp2-zero3-full-recompute": {"dp": 2, "zero_stage": 3, "recompute": "full"},
    # FSDP2 shards over the flattened dp x cp axis; the checkpoint holds each cp rank's shard
    "cp2-zero2": {"dp": 1, "cp": 2, "zero_stage": 2},
}


@pytest.mark.parametrize("plan", RESUME_LAYOUTS.values(), ids=RESUME_LAYOUTS.keys())
def test_a_run_killed_mid_way_resumes_with_the_losses_of_an_uninterrupted_one(tmp_path, plan):
    config = TrainConfig(steps=10, checkpoint_every=4, lr=3e-3)
    whole = RunDir(tmp_path / "whole")
    prepare_run(tiny_train_request(plan), config, whole.root, nproc=2)
    run_to_end(whole)

    broken = RunDir(tmp_path / "broken")
    prepare_run(tiny_train_request(plan), config, broken.root, nproc=2)
    process = launch.start(spec_for(broken))
    assert process.stdout is not None
    for line in process.stdout:  # SIGKILL everything, like a lost node, once step 5 is done
        record = parse_step_line(line)
        if record is not None and record["step"] == 5:
            break
    doomed = [process.pid, *launch.descendant_pids(process.pid)]
    for pid in doomed:
        os.kill(pid, signal.SIGKILL)
    process.wait()
    assert_nothing_left(broken)
    resumed_from, _ = broken.latest_checkpoint()
    assert resumed_from in (4, 8)  # 4 unless steps 6-8 and their save finished before the kill landed

    prepare_run(tiny_train_request(plan), config, broken.root, nproc=2, resume=True)
    run_to_end(broken, resume=True)
    assert [r["step"] for r in broken.read_metrics()] == list(range(1, 11))
    assert losses(broken) == pytest.approx(losses(whole), rel=0, abs=1e-6)
    assert_nothing_left(broken)


def test_sigterm_stops_after_the_step_in_flight_and_saves_a_checkpoint(tmp_path):
    run_dir = RunDir(tmp_path / "run")
    prepare_run(tiny_train_request({"dp": 2, "zero_stage": 2}), TrainConfig(steps=500), run_dir.root, nproc=2)
    cancel = threading.Event()

    def stop_at_step_3(line: str) -> None:
        record = parse_step_line(line)
        if record is not None and record["step"] == 3:
            cancel.set()

    result = launch.run(spec_for(run_dir), on_line=stop_at_step_3, cancel=cancel, timeout_s=LAUNCH_TIMEOUT_S)
    assert result.cancelled and not result.timed_out
    assert result.failed_ranks == []  # stopped, not failed: every rank exited 0
    steps_done = [r["step"] for r in run_dir.read_metrics()]
    assert 3 <= steps_done[-1] < 500
    assert run_dir.latest_checkpoint()[0] == steps_done[-1]
    assert "stopped by SIGTERM after step" in (run_dir.logs / launch.LAUNCHER_LOG).read_text()
    assert_nothing_left(run_dir)


@pytest.mark.parametrize("stopped", [False, True], ids=["to-the-end", "stopped-by-sigterm"])
def test_a_run_that_only_measures_saves_no_checkpoint(tmp_path, stopped):
    """`checkpoints=False` (paraplan validate's runs): nothing saved at the end, nor when stopped."""
    run_dir = RunDir(tmp_path / "run")
    config = TrainConfig(steps=500 if stopped else 3, checkpoints=False)
    prepare_run(tiny_train_request({"dp": 2, "zero_stage": 0}), config, run_dir.root, nproc=2)
    cancel = threading.Event()

    def stop_at_step_2(line: str) -> None:
        record = parse_step_line(line)
        if stopped and record is not None and record["step"] == 2:
            cancel.set()

    result = launch.run(spec_for(run_dir), on_line=stop_at_step_2, cancel=cancel, timeout_s=LAUNCH_TIMEOUT_S)
    assert result.ok or (stopped and result.cancelled and result.failed_ranks == []), _logs(result)
    assert len(run_dir.read_metrics()) >= (2 if stopped else 3)
    assert run_dir.latest_checkpoint() is None
    assert not any(run_dir.root.glob("checkpoints/*"))


def test_a_rank_killed_mid_run_is_reported_as_that_rank_and_its_peer_is_stopped(tmp_path):
    run_dir = RunDir(tmp_path / "run")
    prepare_run(tiny_train_request({"dp": 2, "zero_stage": 0}), TrainConfig(steps=500), run_dir.root, nproc=2)
    killed: list[int] = []

    def kill_rank_1_at_step_3(line: str) -> None:
        record = parse_step_line(line)
        if record is not None and record["step"] == 3 and not killed:
            killed.append(rank_pid(run_dir, 1))
            os.kill(killed[0], signal.SIGKILL)

    started = time.monotonic()
    result = launch.run(spec_for(run_dir), on_line=kill_rank_1_at_step_3, timeout_s=LAUNCH_TIMEOUT_S)
    assert killed, _logs(result)
    assert not result.ok and not result.timed_out
    assert result.root_cause is not None
    assert (result.root_cause.rank, result.root_cause.exitcode) == (1, -signal.SIGKILL), result.failed_ranks
    assert time.monotonic() - started < 60  # the surviving rank is stopped, not left waiting in a collective
    assert_nothing_left(run_dir)


@pytest.mark.gpu
def test_one_gpu_trains_in_bf16_and_reports_cuda_memory(tmp_path):
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    request = tiny_train_request({"dp": 1}, hidden=128, seq_len=128)
    request["training"]["precision"] = "bf16"
    request["cluster"]["gpus_per_node"] = 1
    run_dir = RunDir(tmp_path / "run")
    prepare_run(request, TrainConfig(steps=20, lr=3e-3, device="cuda"), run_dir.root, nproc=1)
    result = launch.run(replace(spec_for(run_dir), nproc_per_node=1), timeout_s=LAUNCH_TIMEOUT_S)
    assert result.ok, _logs(result)
    records = run_dir.read_metrics()
    assert len(records) == 20
    assert records[-1]["loss"] < records[0]["loss"]
    # CUDA max allocated: the fp32 weights, grads and AdamW state of 1.4M parameters and the activations,
    # far below a process's resident set.
    assert 10 * 2**20 < records[-1]["peak_memory_bytes"] < 2 * 2**30
