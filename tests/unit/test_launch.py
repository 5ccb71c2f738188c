"""executor.launch: command lines, Slurm scripts, and real torchrun launches (gloo, 2 CPU processes)."""

from __future__ import annotations

import io
import json
import shlex
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from executor.launch import (
    LAUNCHER_LOG,
    REPO_ROOT,
    TORCH_CACHE_FOLDER,
    FailedRank,
    FailureSummaryParser,
    LaunchError,
    LaunchSpec,
    RunResult,
    _new_run_dir,
    _pump,
    blame_past_stopped_ranks,
    failures_from_error_files,
    per_node_commands,
    pid_alive,
    run,
    sbatch_script,
    start,
    stop,
    submit_sbatch,
    torchrun_command,
)

FIXTURES = Path(__file__).parent / "fixtures" / "launch"
WORKER_ENV = {"PYTHONPATH": str(FIXTURES)}
RUN_LIMIT_S = 60.0
"""Upper bound on any single launch here; a 2-rank gloo start takes about 5 s on a 2-core machine."""


# ------------------------------------------------------------------------------------------------ helpers


def _worker_spec(mode: str, tmp_path: Path) -> LaunchSpec:
    """Two ranks of the fixture worker in ``mode``; its pid files go to tmp_path/pids."""
    pid_dir = tmp_path / "pids"
    pid_dir.mkdir(exist_ok=True)
    return LaunchSpec(nproc_per_node=2, module="launch_worker", args=(mode, str(pid_dir)), log_dir=tmp_path / "logs")


def _worker_pids(tmp_path: Path) -> list[int]:
    return [int(path.read_text()) for path in sorted((tmp_path / "pids").glob("rank*.pid"))]


def _processes_mentioning(marker: str) -> list[int]:
    """Live pids whose command line contains ``marker`` (a tmp path unique to one test)."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            text = cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        pid = int(cmdline.parent.name)
        if marker in text and pid_alive(pid):
            found.append(pid)
    return found


def _assert_nothing_left(tmp_path: Path) -> None:
    """No worker pid and no process naming this test's folder may outlive the launch."""
    assert not [pid for pid in _worker_pids(tmp_path) if pid_alive(pid)]
    assert _processes_mentioning(str(tmp_path)) == []


def _wait_for(condition, limit_s: float = RUN_LIMIT_S) -> None:
    deadline = time.monotonic() + limit_s
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting for the workers"
        time.sleep(0.1)


# ------------------------------------------------------------------------------------------ command lines


def test_single_node_command_is_standalone_with_per_rank_logs(tmp_path):
    spec = LaunchSpec(nproc_per_node=4, args=("--steps", "5"), log_dir=tmp_path)
    assert torchrun_command(spec, python="py") == [
        "py", "-m", "torch.distributed.run", "--standalone", "--nnodes=1", "--nproc-per-node=4", "--max-restarts=0",
        f"--log-dir={tmp_path}", "--tee=3", "-m", "executor.train", "--steps", "5",
    ]  # fmt: skip


def test_single_node_without_log_dir_has_no_log_flags():
    command = torchrun_command(LaunchSpec(nproc_per_node=1, max_restarts=2))
    assert command[0] == sys.executable
    assert "--max-restarts=2" in command
    assert not [flag for flag in command if flag.startswith(("--log-dir", "--tee", "--redirects"))]


def test_multi_node_command_uses_c10d_rendezvous():
    spec = LaunchSpec(nproc_per_node=8, nnodes=4, node_rank=2, rdzv_endpoint="node0:29500", rdzv_id="job7")
    command = torchrun_command(spec, python="py")
    assert command[3:9] == [
        "--nnodes=4", "--node-rank=2", "--rdzv-backend=c10d", "--rdzv-endpoint=node0:29500", "--rdzv-id=job7",
        "--nproc-per-node=8",
    ]  # fmt: skip
    assert "--standalone" not in command


def test_a_multi_node_command_needs_a_rendezvous_endpoint():
    spec = LaunchSpec(nproc_per_node=2, nnodes=2)
    with pytest.raises(LaunchError, match="rdzv_endpoint"):
        torchrun_command(spec)
    with pytest.raises(LaunchError, match="rdzv_endpoint"):
        per_node_commands(spec)


def test_per_node_commands_cover_every_node_and_quote_arguments():
    tricky = ("--name", "it's a run", "--glob", "*.pt")
    spec = LaunchSpec(nproc_per_node=2, nnodes=3, rdzv_endpoint="[::1]:29400", args=tricky)
    lines = per_node_commands(spec, python="/opt/py thon")
    assert len(lines) == 3
    for node_rank, line in enumerate(lines):
        argv = shlex.split(line)  # the shell sees exactly the argv torchrun_command builds
        assert argv[0] == "/opt/py thon"
        assert f"--node-rank={node_rank}" in argv
        assert tuple(argv[-4:]) == tricky


@pytest.mark.parametrize(
    ("fields", "named"),
    [
        ({"nproc_per_node": 0}, "nproc_per_node"),
        ({"nproc_per_node": 2, "nnodes": 0}, "nnodes"),
        ({"nproc_per_node": 2, "nnodes": 2, "rdzv_endpoint": "node0"}, "rdzv_endpoint"),
        ({"nproc_per_node": 2, "nnodes": 2, "rdzv_endpoint": "node0:http"}, "rdzv_endpoint"),
        ({"nproc_per_node": 2, "nnodes": 2, "rdzv_endpoint": "n:1", "node_rank": 2}, "node_rank"),
        ({"nproc_per_node": 2, "node_rank": -1}, "node_rank"),
        ({"nproc_per_node": 2, "max_restarts": -1}, "max_restarts"),
        ({"nproc_per_node": 2, "rdzv_id": ""}, "rdzv_id"),
        ({"nproc_per_node": 2, "module": "two words"}, "module"),
    ],
)
def test_bad_specs_are_rejected_naming_the_field(fields, named):
    with pytest.raises(LaunchError, match=named) as caught:
        LaunchSpec(**fields)
    assert isinstance(caught.value, ValueError)


# ------------------------------------------------------------------------------------------------- Slurm


def test_sbatch_script_runs_one_torchrun_per_node(tmp_path):
    spec = LaunchSpec(nproc_per_node=8, nnodes=4, args=("--plan", "my plan.json"))  # Slurm finds the endpoint
    script = sbatch_script(spec, "llama", time_limit="02:00:00", partition="gpu", extra_sbatch=("--exclusive",),
                           python="/opt/venv/bin/python")  # fmt: skip
    lines = script.splitlines()
    assert lines[0] == "#!/bin/bash"
    for directive in ("--job-name=llama", "--nodes=4", "--ntasks-per-node=1", "--gpus-per-node=8",
                      "--time=02:00:00", "--partition=gpu", "--exclusive"):  # fmt: skip
        assert f"#SBATCH {directive}" in lines
    assert 'head_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)' in lines
    assert "rdzv_port=$(( 29500 + SLURM_JOB_ID % 1000 ))" in lines  # jobs sharing a node each have their own
    srun = lines[-1]
    assert srun.startswith("srun bash -c ")
    inner = shlex.split(srun)[3]  # what each node's shell runs, with Slurm's variables still unexpanded
    # torchrun of paraplan's own environment, not whichever `torchrun` the node's PATH finds
    assert shlex.split(inner)[:4] == ["exec", "/opt/venv/bin/python", "-m", "torch.distributed.run"]
    for fragment in ('--nnodes="$SLURM_NNODES"', '--node-rank="$SLURM_NODEID"', "--rdzv-backend=c10d",
                     '--rdzv-endpoint="$head_node:$rdzv_port"', "--nproc-per-node=8", "-m executor.train"):  # fmt: skip
        assert fragment in inner
    assert shlex.split(inner)[-2:] == ["--plan", "my plan.json"]
    script_path = tmp_path / "job.sbatch"
    script_path.write_text(script)
    assert subprocess.run(["bash", "-n", str(script_path)]).returncode == 0


@pytest.mark.parametrize(
    ("options", "named"),
    [
        ({"job_name": "two words"}, "job_name"),
        ({"job_name": "j", "partition": "gpu\nrm -rf /"}, "partition"),
        ({"job_name": "j", "extra_sbatch": ("--exclusive\necho hi",)}, "extra_sbatch"),
    ],
)
def test_sbatch_script_rejects_values_that_would_break_the_script(options, named):
    with pytest.raises(LaunchError, match=named):
        sbatch_script(LaunchSpec(nproc_per_node=1), **options)


def test_submit_without_sbatch_raises(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(LaunchError, match="sbatch is not on PATH"):
        submit_sbatch("#!/bin/bash\n", tmp_path)


def test_submit_returns_the_job_id(tmp_path, monkeypatch):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "sbatch"
    fake.write_text('#!/bin/sh\ntest -f "$1" && echo "Submitted batch job 4242"\n')
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", str(bin_dir))
    assert submit_sbatch("#!/bin/bash\n", tmp_path / "work") == "4242"
    assert (tmp_path / "work" / "paraplan.sbatch").read_text() == "#!/bin/bash\n"


# ------------------------------------------------------------------------------------- failure reports

# The shape torch 2.13's ChildFailedError prints (errors/__init__.py, _MSG_FORMAT_TEMPLATE), worker lines mixed in.
CHILD_FAILED_REPORT = """\
[default0]:  rank      : 7 (local_rank: 7)
============================================================
launch_worker FAILED
------------------------------------------------------------
Failures:
[1]:
  time      : 2026-11-22_05:03:49
  host      : localhost
  rank      : 4 (local_rank: 0)
  exitcode  : -9 (pid: 3246)  (SIGKILL)
  error_file: <N/A>
  traceback : Signal 9 (SIGKILL) received by PID 3246
------------------------------------------------------------
Root Cause (first observed failure):
[0]:
  time      : 2026-11-22_05:03:48
  host      : localhost
  rank      : 5 (local_rank: 1)
  exitcode  : 3 (pid: 3247)
  error_file: {error_file}
  traceback : Traceback (most recent call last):
    File "w.py", line 10, in main
  ValueError: bad shard
============================================================
"""


def _write_error_file(path: Path, message: str, timestamp: int) -> Path:
    """An error.json as torch's ErrorHandler.record_exception writes it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    extra = {"py_callstack": "Traceback ...", "timestamp": str(timestamp)}
    path.write_text(json.dumps({"message": {"message": message, "extraInfo": extra}}))
    return path


def _parsed(report: str) -> list[FailedRank]:
    """The failures a FailureSummaryParser reads from `report`."""
    parser = FailureSummaryParser()
    for line in report.splitlines():
        parser.feed(line)
    return parser.failures()


def test_child_failed_report_is_parsed_with_messages_from_error_files(tmp_path):
    error_file = _write_error_file(tmp_path / "attempt_0" / "1" / "error.json", "ValueError: bad shard", 1)
    root, killed = _parsed(CHILD_FAILED_REPORT.format(error_file=error_file))
    assert (root.rank, root.exitcode, root.message, root.error_file, root.root_cause) == (
        5, 3, "ValueError: bad shard", error_file, True,
    )  # fmt: skip
    assert (killed.rank, killed.exitcode, killed.message, killed.error_file, killed.root_cause) == (
        4, -9, "Signal 9 (SIGKILL) received by PID 3246", None, False,
    )  # fmt: skip


# A peer of a SIGKILLed rank recorded the broken collective before torchrun noticed the kill, so torchrun named the
# peer, which it then stopped with SIGTERM (seen under load in tests/distributed/test_train.py).
PEER_NAMED_FIRST_REPORT = """\
Failures:
[1]:
  rank      : 1 (local_rank: 1)
  exitcode  : -9 (pid: 3247)
  error_file: <N/A>
  traceback : Signal 9 (SIGKILL) received by PID 3247
------------------------------------------------------------
Root Cause (first observed failure):
[0]:
  rank      : 0 (local_rank: 0)
  exitcode  : -15 (pid: 3246)
  error_file: {error_file}
  traceback : Traceback (most recent call last):
============================================================
"""


def test_a_rank_killed_outright_is_the_root_cause_rather_than_the_peer_torchrun_stopped(tmp_path):
    error_file = _write_error_file(tmp_path / "0" / "error.json", "RuntimeError: Connection closed by peer", 1)
    failures = _parsed(PEER_NAMED_FIRST_REPORT.format(error_file=error_file))
    assert [(f.rank, f.root_cause) for f in failures] == [(0, True), (1, False)]  # torchrun's own naming
    blamed = blame_past_stopped_ranks(failures)
    assert [(f.rank, f.exitcode, f.root_cause) for f in blamed] == [(1, -9, True), (0, -15, False)]
    assert RunResult(1, blamed, tmp_path).root_cause == blamed[0]


def test_torchrun_s_root_cause_stands_unless_it_ended_by_sigterm_and_another_rank_by_another_signal(tmp_path):
    error_file = _write_error_file(tmp_path / "1" / "error.json", "ValueError: bad shard", 1)
    failures = _parsed(CHILD_FAILED_REPORT.format(error_file=error_file))  # root: exit 3; the other: SIGKILL
    assert blame_past_stopped_ranks(failures) == failures
    stopped_alone = _parsed(PEER_NAMED_FIRST_REPORT.format(error_file=error_file).replace("-9 (pid", "1 (pid"))
    assert blame_past_stopped_ranks(stopped_alone) == stopped_alone  # the other rank raised: no signal to blame
    assert blame_past_stopped_ranks([]) == []


def test_error_files_alone_name_the_failed_ranks_earliest_first(tmp_path):
    _write_error_file(tmp_path / "attempt_0" / "0" / "error.json", "stale: an earlier attempt", 1)
    _write_error_file(tmp_path / "attempt_1" / "0" / "error.json", "RuntimeError: peer gone", 20)
    _write_error_file(tmp_path / "attempt_1" / "1" / "error.json", "RuntimeError: first", 10)
    failures = failures_from_error_files(tmp_path, first_global_rank=8)
    assert [(f.rank, f.message, f.root_cause) for f in failures] == [
        (9, "RuntimeError: first", True),
        (8, "RuntimeError: peer gone", False),
    ]
    assert failures_from_error_files(None) == []


def test_a_broken_line_callback_does_not_stop_the_output_from_being_drained(tmp_path):
    seen: list[str] = []

    def explode_on_second_line(line: str) -> None:
        seen.append(line)
        if len(seen) == 2:
            raise RuntimeError("callback bug")

    _pump(io.StringIO("one\ntwo\nthree\n"), tmp_path / LAUNCHER_LOG, explode_on_second_line, FailureSummaryParser())
    assert seen == ["one", "two"]
    log = (tmp_path / LAUNCHER_LOG).read_text()
    assert log.startswith("one\ntwo\n") and "callback bug" in log and log.endswith("three\n")


# --------------------------------------------------------------------------------------------- real runs


def test_import_does_not_import_torch():
    probe = "import sys, executor.launch; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", probe], cwd=REPO_ROOT, timeout=60).returncode == 0


@pytest.mark.slow
def test_two_rank_gloo_run_succeeds_with_per_rank_logs(tmp_path):
    lines: list[str] = []
    result = run(_worker_spec("ok", tmp_path), env=WORKER_ENV, timeout_s=RUN_LIMIT_S, on_line=lines.append)
    assert result.ok, lines
    assert (result.returncode, result.failed_ranks, result.timed_out) == (0, [], False)
    for rank in (0, 1):
        assert f"rank {rank} all_reduce ok" in result.rank_log(rank).read_text()
        assert any(f"rank {rank} all_reduce ok" in line for line in lines)  # --tee also streams it
    assert "all_reduce ok" in (result.log_dir / LAUNCHER_LOG).read_text()
    _assert_nothing_left(tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["fail", "fail_peer_sleeps"])
def test_a_failing_rank_is_reported_and_its_peers_are_stopped(tmp_path, mode):
    """Rank 1 raises after init; rank 0 waits in an all_reduce, or sleeps so that only torchrun can end it."""
    started = time.monotonic()
    result = run(_worker_spec(mode, tmp_path), env=WORKER_ENV, timeout_s=RUN_LIMIT_S)
    assert time.monotonic() - started < RUN_LIMIT_S and not result.timed_out  # rank 0 did not hang
    assert result.returncode != 0
    root = result.root_cause
    assert root is not None
    assert (root.rank, root.exitcode, root.message) == (1, 1, "RuntimeError: rank 1 failed on purpose")
    assert root.error_file is not None and root.error_file.parent.name == "1"
    if mode == "fail_peer_sleeps":
        peer = next(failure for failure in result.failed_ranks if failure.rank == 0)
        assert peer.exitcode == -15  # torchrun SIGTERMed the sleeping survivor
    _assert_nothing_left(tmp_path)


@pytest.mark.slow
def test_stop_ends_a_sleeping_launch(tmp_path):
    process = start(_worker_spec("sleep", tmp_path), env=WORKER_ENV)
    try:
        _wait_for(lambda: len(_worker_pids(tmp_path)) == 2)
    finally:
        stop(process, grace_s=RUN_LIMIT_S / 2)
    assert process.returncode is not None
    _assert_nothing_left(tmp_path)


@pytest.mark.slow
def test_cancel_kills_workers_that_ignore_sigterm(tmp_path):
    cancel = threading.Event()
    ready_lines: set[str] = set()

    def cancel_once_both_ranks_are_ready(line: str) -> None:
        if " of 2 ready" in line:
            ready_lines.add(line)
        if len(ready_lines) == 2:
            cancel.set()

    started = time.monotonic()
    result = run(
        _worker_spec("stubborn", tmp_path),
        env=WORKER_ENV,
        timeout_s=RUN_LIMIT_S,
        on_line=cancel_once_both_ranks_are_ready,
        cancel=cancel,
        grace_s=2.0,
    )
    assert result.cancelled and not result.timed_out
    assert time.monotonic() - started < RUN_LIMIT_S
    assert len(_worker_pids(tmp_path)) == 2
    _assert_nothing_left(tmp_path)


@pytest.mark.slow
def test_timeout_stops_the_launch(tmp_path):
    started = time.monotonic()
    result: RunResult = run(_worker_spec("sleep", tmp_path), env=WORKER_ENV, timeout_s=2.0, grace_s=5.0)
    assert result.timed_out and result.returncode != 0
    assert time.monotonic() - started < 2.0 + 5.0 + 5.0
    _assert_nothing_left(tmp_path)


def test_torch_compiler_cache_is_not_taken_for_torchruns_run_folder(tmp_path):
    before = set(tmp_path.iterdir())
    run_folder = tmp_path / "paraplan-run_abc123"
    run_folder.mkdir()
    time.sleep(0.01)
    (tmp_path / TORCH_CACHE_FOLDER).mkdir()  # created later, as a failing rank's import of torch._dynamo does
    assert _new_run_dir(tmp_path, before) == run_folder
