"""`paraplan train` and `paraplan launch-script`, run in-process through typer's CliRunner, on the paths that
start no process: every refusal, and the scripts launch-script prints. Also the pieces of api/commands/train.py that
turn a finished run into a summary and an exit code."""

from __future__ import annotations

import copy
import json
import shlex
import sys
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from api.cli import app
from api.commands.train import EXIT_RUN_FAILED, EXIT_STOPPED, Summary, exit_code, failure_text
from executor.config import RunDir
from executor.launch import FailedRank, RunResult
from tests.train_requests import TINY_REQUEST

MULTI_NODE = ["--nnodes", "2", "--nproc-per-node", "1", "--rdzv-endpoint", "node0:29500"]

runner = CliRunner()


def run(*args: Any) -> Any:
    return runner.invoke(app, [str(arg) for arg in args])


@pytest.fixture
def request_file(tmp_path: Path) -> Path:
    path = tmp_path / "request.json"
    path.write_text(json.dumps(TINY_REQUEST))
    return path


def write_request(tmp_path: Path, request: Any, name: str = "other.json") -> Path:
    path = tmp_path / name
    path.write_text(request if isinstance(request, str) else json.dumps(request))
    return path


def assert_refused(result: Any, *phrases: str) -> None:
    assert result.exit_code == 1, result.output
    assert result.stdout == ""
    for phrase in phrases:
        assert phrase in result.stderr, result.stderr
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)


# ================================================================================================= train


def test_train_refuses_a_process_count_the_plan_does_not_have(tmp_path, request_file):
    out = tmp_path / "out"
    result = run("train", request_file, "--steps", "3", "--out", out, "--nproc", "3")
    assert_refused(result, "cannot start this training run", "nproc: 3 processes asked", "= 2")
    assert not out.exists()


def test_train_refuses_a_missing_data_file(tmp_path, request_file):
    out = tmp_path / "out"
    result = run("train", request_file, "--steps", "3", "--out", out, "--data", tmp_path / "missing.txt")
    assert_refused(result, "cannot start this training run", "data: data file", "missing.txt", "does not exist")
    assert not out.exists()


def test_train_refuses_an_out_folder_that_holds_a_run(tmp_path, request_file):
    out = tmp_path / "out"
    first = run("launch-script", request_file, "--steps", "3", "--out", out)  # writes out/run.json, starts nothing
    assert first.exit_code == 0, first.output
    before = (out / "run.json").read_bytes()

    result = run("train", request_file, "--steps", "3", "--out", out)
    assert_refused(result, "out: ", "already holds a run", "--resume")
    assert (out / "run.json").read_bytes() == before
    assert sorted(path.name for path in out.iterdir()) == ["run.json"]  # no logs, no metrics


def test_train_names_a_missing_plan(tmp_path):
    request = {key: value for key, value in TINY_REQUEST.items() if key != "plan"}
    out = tmp_path / "out"
    result = run("train", write_request(tmp_path, request), "--steps", "3", "--out", out)
    assert_refused(result, "invalid request", "  - plan: Field required")
    assert not out.exists()


def test_train_names_a_malformed_request_file(tmp_path):
    path = write_request(tmp_path, '{"model": ')
    out = tmp_path / "out"
    result = run("train", path, "--steps", "3", "--out", out)
    assert_refused(result, str(path), "not valid JSON")
    assert not out.exists()


def test_train_names_a_missing_request_file(tmp_path):
    out = tmp_path / "out"
    result = run("train", tmp_path / "nope.json", "--steps", "3", "--out", out)
    assert_refused(result, "nope.json", "no such file")
    assert not out.exists()


def test_train_refuses_bad_hyperparameters(tmp_path, request_file):
    out = tmp_path / "out"
    assert_refused(run("train", request_file, "--steps", "0", "--out", out), "steps")
    assert_refused(run("train", request_file, "--steps", "3", "--warmup-steps", "5", "--out", out), "warmup_steps")
    assert_refused(run("train", request_file, "--steps", "3", "--device", "tpu", "--out", out), "device")
    assert not out.exists()


def test_train_reports_every_problem_at_once(tmp_path):
    request = copy.deepcopy(TINY_REQUEST)
    request["model"]["tie_embeddings"] = True
    request["plan"] = {"dp": 1, "pp": 2, "schedule": "1f1b", "micro_batch_size": 8}
    out = tmp_path / "out"
    result = run("train", write_request(tmp_path, request), "--steps", "3", "--out", out, "--nproc", "3",
                 "--data", tmp_path / "missing.txt")  # fmt: skip
    assert_refused(result, "  - model.tie_embeddings: ", "  - plan.micro_batch_size: ", "  - nproc: ", "  - data: ")
    assert not out.exists()


# ========================================================================================= launch-script


def test_launch_script_prints_one_torchrun_line_per_node(tmp_path, request_file):
    out = tmp_path / "out"
    result = run("launch-script", request_file, "--steps", "3", "--out", out, *MULTI_NODE)
    assert result.exit_code == 0, result.output
    commands = [line for line in result.stdout.splitlines() if line and not line.startswith("#")]
    assert len(commands) == 2
    run_file = str((out / "run.json").resolve())
    for rank, command in enumerate(commands):
        argv = shlex.split(command)
        assert f"--node-rank={rank}" in argv
        assert "--nnodes=2" in argv and "--nproc-per-node=1" in argv
        assert "--rdzv-endpoint=node0:29500" in argv
        module = argv.index("-m", argv.index("torch.distributed.run"))
        assert argv[module : module + 2] == ["-m", "executor.train"]
        assert argv[argv.index("--run-file") + 1] == run_file
        assert "--resume" not in argv
    run_ = RunDir(out).read_run()
    assert run_.config.steps == 3 and run_.config.device == "cuda"
    assert run_.request.plan.num_gpus == 2


def test_launch_script_writes_a_slurm_batch_script(tmp_path, request_file):
    out = tmp_path / "out"
    result = run("launch-script", request_file, "--steps", "3", "--out", out, *MULTI_NODE, "--sbatch",
                 "--job-name", "tiny", "--partition", "debug")  # fmt: skip
    assert result.exit_code == 0, result.output
    script = result.stdout
    assert script.startswith("#!/bin/bash\n")
    lines = script.splitlines()
    for directive in ("--nodes=2", "--job-name=tiny", "--partition=debug", "--gpus-per-node=1"):
        assert f"#SBATCH {directive}" in lines
    srun = [line for line in lines if line.startswith("srun ")]
    assert len(srun) == 1
    assert "-m executor.train" in srun[0] and str((out / "run.json").resolve()) in srun[0]
    assert (out / "run.json").is_file()


def test_launch_script_default_processes_per_node_come_from_the_cluster(tmp_path, request_file):
    out = tmp_path / "out"
    result = run("launch-script", request_file, "--steps", "3", "--out", out)
    assert result.exit_code == 0, result.output
    commands = [line for line in result.stdout.splitlines() if line and not line.startswith("#")]
    assert len(commands) == 1
    argv = shlex.split(commands[0])
    assert "--nproc-per-node=2" in argv and "--standalone" in argv


def test_launch_script_nodes_and_processes_come_from_the_cluster_and_run_this_python(tmp_path):
    """A 2 x 1 cluster without --nnodes or --nproc-per-node: a Slurm script for 2 nodes of 1 process, whose srun
    line runs torchrun as this interpreter's torch.distributed.run (not a bare `torchrun` from the node's PATH)."""
    two_nodes = {**TINY_REQUEST, "cluster": {**TINY_REQUEST["cluster"], "num_nodes": 2, "gpus_per_node": 1}}
    result = run("launch-script", write_request(tmp_path, two_nodes), "--steps", "3", "--out", tmp_path / "out",
                 "--sbatch")  # fmt: skip
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert "#SBATCH --nodes=2" in lines and "#SBATCH --gpus-per-node=1" in lines
    inner = shlex.split([line for line in lines if line.startswith("srun ")][0])[3]
    assert shlex.split(inner)[:4] == ["exec", sys.executable, "-m", "torch.distributed.run"]


def test_launch_script_resume_passes_resume_to_the_workers(tmp_path, request_file):
    out = tmp_path / "out"
    assert run("launch-script", request_file, "--steps", "3", "--out", out).exit_code == 0
    result = run("launch-script", request_file, "--steps", "6", "--out", out, "--resume")
    assert result.exit_code == 0, result.output
    command = next(line for line in result.stdout.splitlines() if line and not line.startswith("#"))
    assert shlex.split(command)[-1] == "--resume"
    assert RunDir(out).read_run().config.steps == 6


def test_launch_script_submit_needs_sbatch(tmp_path, request_file):
    out = tmp_path / "out"
    result = run("launch-script", request_file, "--steps", "3", "--out", out, "--submit")
    assert_refused(result, "--submit needs --sbatch")
    assert not out.exists()


def test_launch_script_refuses_nodes_times_processes_other_than_the_plan(tmp_path, request_file):
    out = tmp_path / "out"
    result = run("launch-script", request_file, "--steps", "3", "--out", out, "--nnodes", "2",
                 "--rdzv-endpoint", "node0:29500")  # fmt: skip
    assert_refused(result, "nproc: 4 processes asked")  # 2 nodes x the cluster's 2 GPUs per node
    assert not out.exists()


def test_launch_script_multi_node_needs_a_rendezvous_endpoint(tmp_path, request_file):
    out = tmp_path / "out"
    result = run("launch-script", request_file, "--steps", "3", "--out", out, "--nnodes", "2", "--nproc-per-node", "1")
    assert_refused(result, "rdzv_endpoint (host:port) is required when nnodes=2")
    assert not out.exists()


def test_launch_script_needs_a_process_count(tmp_path):
    request = copy.deepcopy(TINY_REQUEST)
    del request["cluster"]["gpus_per_node"]
    out = tmp_path / "out"
    result = run("launch-script", write_request(tmp_path, request), "--steps", "3", "--out", out)
    assert_refused(result, "--nproc-per-node", "cluster.gpus_per_node")
    assert not out.exists()


def test_launch_script_with_a_bad_slurm_option_writes_nothing(tmp_path, request_file):
    out = tmp_path / "out"
    result = run("launch-script", request_file, "--steps", "3", "--out", out, "--sbatch", "--job-name", "a b")
    assert_refused(result, "job_name")
    assert not (out / "run.json").exists()


# ================================================================================================ summary


def record(step: int, loss: float, step_time_s: float, peak: int) -> dict[str, Any]:
    return {"step": step, "loss": loss, "step_time_s": step_time_s, "tokens_per_s": 256 / step_time_s,
            "peak_memory_bytes": peak}  # fmt: skip


def test_summary_leaves_the_first_step_out_of_the_medians():
    records = [record(1, 5.5, 10.0, 100), record(2, 5.0, 0.2, 300), record(3, 4.5, 0.4, 200), record(4, 4.0, 0.3, 250)]
    summary = Summary.of(records)
    assert summary.steps == 4
    assert summary.first_loss == 5.5 and summary.last_loss == 4.0
    assert summary.median_step_time_s == pytest.approx(0.3)
    assert summary.median_tokens_per_s == pytest.approx(256 / 0.3)
    assert summary.peak_memory_bytes == 300


def test_summary_counts_steps_of_a_resumed_run_by_number():
    summary = Summary.of([record(11, 3.0, 0.5, 10), record(12, 2.9, 0.1, 20)])
    assert summary.steps == 12
    assert summary.median_step_time_s == pytest.approx(0.1)


def test_summary_of_one_step_uses_that_step():
    summary = Summary.of([record(1, 5.5, 2.0, 123)])
    assert summary == Summary(1, 5.5, 5.5, 2.0, 128.0, 123)


def test_summary_of_no_steps():
    assert Summary.of([]) == Summary(0, None, None, None, None, None)


# ========================================================================================== exit and failure


def result(returncode: int = 0, failed: list[FailedRank] | None = None, cancelled: bool = False) -> RunResult:
    return RunResult(returncode, failed or [], Path("logs"), cancelled=cancelled)


def test_exit_codes():
    assert exit_code(result()) == 0
    assert exit_code(result(1, [FailedRank(0, 1, "boom", root_cause=True)])) == EXIT_RUN_FAILED == 3
    assert exit_code(result(1)) == 3  # torchrun failed without naming a rank
    assert exit_code(result(0, [FailedRank(1, 1, "boom")])) == 3  # a failed rank fails the run
    assert exit_code(result(-15, cancelled=True)) == EXIT_STOPPED == 130
    assert exit_code(result(0, cancelled=True)) == 130


def test_failure_text_names_the_root_cause_first():
    failed = [
        FailedRank(3, 1, "RuntimeError: CUDA out of memory", root_cause=True),
        FailedRank(0, -15, ""),
        FailedRank(1, -15, ""),
    ]
    text = failure_text(result(1, failed))
    first, *rest = text.splitlines()
    assert first == "training failed: rank 3 exited with 1: RuntimeError: CUDA out of memory"
    assert rest == ["also stopped or failed: ranks 0, 1"]


def test_failure_text_without_a_marked_root_cause_takes_the_first_failure():
    text = failure_text(result(1, [FailedRank(2, -9, "")]))
    assert text == "training failed: rank 2 exited with -9: (no message)"


def test_failure_text_without_failed_ranks_gives_torchruns_exit_status():
    text = failure_text(result(7))
    assert "torchrun exited with 7" in text and "logs" in text
