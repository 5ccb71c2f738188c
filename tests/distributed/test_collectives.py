"""The collective sweep under real torchrun with gloo (2 processes, 1-64 KiB: a few seconds), its refusals, and the
timing statistics it reports."""

from __future__ import annotations

import math
import subprocess
import sys
import time
from pathlib import Path

import pytest

from executor import launch
from planner.cost.measured import busbw_factor
from planner.specs import TimingStats
from profiler import collectives
from profiler.collectives import OPS, message_elements, read_result, sweep_command_args
from profiler.timing import UNSTABLE_SPREAD, stats, time_repeats

REPO = Path(__file__).resolve().parents[2]
LAUNCH_TIMEOUT_S = 120
SIZES = [1024 * 2**k for k in range(7)]  # 1 KiB .. 64 KiB


def _logs(result: launch.RunResult) -> str:
    log = result.log_dir / launch.LAUNCHER_LOG
    return log.read_text()[-6000:] if log.is_file() else "(no launcher log)"


# ----------------------------------------------------------------------------------------------- timing (no torch)


def test_stats_median_and_spread_of_known_samples() -> None:
    # Linear interpolation: p10 = 1.4, median = 3, p90 = 4.6 -> spread = 3.2 / 3.
    timing = stats([5.0, 1.0, 4.0, 2.0, 3.0])
    assert timing.median_s == 3.0
    assert timing.spread == pytest.approx(3.2 / 3)
    assert timing.repeats == 5
    assert timing.unstable


def test_stats_tight_samples_are_stable() -> None:
    # p10 = 0.99, p90 = 1.01 around a median of 1.0.
    timing = stats([0.9] + [1.0] * 8 + [1.1])
    assert timing.median_s == 1.0
    assert timing.spread == pytest.approx(0.02)
    assert not timing.unstable


def test_stats_threshold_is_strictly_above() -> None:
    # [10, 20]: p10 = 11, median = 15, p90 = 19 -> spread 8/15 = 0.533.
    assert stats([10.0, 20.0]).unstable
    assert not stats([10.0, 20.0], unstable_spread=0.6).unstable
    assert not stats([10.0, 20.0], unstable_spread=8 / 15).unstable
    assert UNSTABLE_SPREAD == 0.25


def test_stats_edge_cases() -> None:
    assert stats([0.0, 0.0, 0.0]).spread == 0.0  # all below the clock's resolution
    below_resolution = stats([0.0, 0.0, 1e-6])  # median 0 but not all zero: spread relative to the largest sample
    assert below_resolution.spread == pytest.approx(0.8) and below_resolution.unstable
    assert TimingStats.model_validate_json(below_resolution.model_dump_json()) == below_resolution  # finite JSON
    assert stats([2.5]).model_dump() == {"median_s": 2.5, "spread": 0.0, "repeats": 1, "unstable": False}
    for bad in ([], [-1.0], [math.nan]):
        with pytest.raises(ValueError, match="sample"):
            stats(bad)


def test_time_repeats_on_cpu_runs_hook_and_times_each_call() -> None:
    calls: list[str] = []

    def work() -> None:
        calls.append("fn")
        time.sleep(0.002)

    samples = time_repeats(work, warmup=2, repeats=3, device="cpu", before_each=lambda: calls.append("before"))
    assert calls == ["before", "fn"] * 5
    assert len(samples) == 3 and all(s >= 0.002 for s in samples)
    with pytest.raises(ValueError, match="repeats"):
        time_repeats(lambda: None, warmup=0, repeats=0, device="cpu")


# ------------------------------------------------------------------------------------- sweep helpers (no torch)


def test_helpers_import_no_torch(tmp_path: Path) -> None:
    code = (
        "import sys\n"
        "from profiler import collectives, timing\n"
        f"args = collectives.sweep_command_args({str(tmp_path / 'x.json')!r}, 1024, 4096, ['all_reduce'])\n"
        "timing.stats([1.0, 2.0]); timing.time_repeats(lambda: None, warmup=1, repeats=2, device='cpu')\n"
        "assert 'torch' not in sys.modules, sorted(m for m in sys.modules if m.startswith('torch'))\n"
    )
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, timeout=60)


def test_sweep_command_args_round_trip() -> None:
    args = sweep_command_args("out.json", 1024, 4096, "all_gather, send_recv,all_gather", 1, 3, "gloo")
    assert args == (
        "--out", "out.json", "--min-bytes", "1024", "--max-bytes", "4096", "--ops", "all_gather,send_recv",
        "--warmup", "1", "--repeats", "3", "--backend", "gloo",
    )  # fmt: skip
    out, settings = collectives._parse_args(args)
    assert out == Path("out.json") and settings.ops == ("all_gather", "send_recv")
    assert settings.sizes_bytes == [1024, 2048, 4096]
    assert collectives.SweepSettings(min_bytes=1000, max_bytes=5000).sizes_bytes == [1000, 2000, 4000]


@pytest.mark.parametrize(
    ("kwargs", "flag"),
    [
        ({"ops": ["all_reduce", "all_redux"]}, "--ops: unknown op(s) 'all_redux'"),
        ({"ops": ""}, "--ops must name"),
        ({"min_bytes": 2}, "--min-bytes must be an integer >= 4"),
        ({"min_bytes": 8192, "max_bytes": 4096}, "--min-bytes (8192) must not exceed --max-bytes (4096)"),
        ({"repeats": 0}, "--repeats"),
        ({"warmup": -1}, "--warmup"),
        ({"backend": "mpi"}, "--backend"),
    ],
)
def test_sweep_command_args_refuses_bad_input(kwargs: dict, flag: str) -> None:
    with pytest.raises(ValueError) as refused:
        sweep_command_args("out.json", **kwargs)
    assert flag in str(refused.value)


def test_busbw_factors_and_chunked_sizes() -> None:
    assert [busbw_factor(op, 4) for op in OPS] == [1.5, 0.75, 0.75, 0.75, 1.0, 0.75, 0.75]
    # 1 KiB = 256 float32; split ops need a multiple of the group size (nccl-tests rounds the same way).
    assert message_elements("all_reduce", 1024, 3) == 256
    assert message_elements("all_gather", 1024, 3) == 255
    assert message_elements("send_recv", 1026, 3) == 256
    assert message_elements("reduce_scatter", 8, 3) == 0  # left out of a sweep
    assert message_elements("fsdp_all_gather", 1024, 3) == 255  # FSDP2 shards the unit into equal chunks


def test_worker_refuses_a_single_process(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("torch")
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(ValueError, match="at least 2 ranks"):
        collectives.main(["--out", str(tmp_path / "x.json")])
    assert not (tmp_path / "x.json").exists()


# ------------------------------------------------------------------------------------------ sweeps under torchrun


@pytest.fixture(scope="module")
def sweep(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, launch.RunResult, list[dict]]:
    pytest.importorskip("torch")
    root = tmp_path_factory.mktemp("sweep")
    out = root / "collectives.json"
    args = sweep_command_args(out, min_bytes=SIZES[0], max_bytes=SIZES[-1], warmup=1, repeats=3)
    spec = launch.LaunchSpec(nproc_per_node=2, module="profiler.collectives", args=args, log_dir=root / "logs")
    progress: list[dict] = []

    def on_line(line: str) -> None:
        record = collectives.parse_progress_line(line)
        if record is not None:
            progress.append(record)

    result = launch.run(spec, timeout_s=LAUNCH_TIMEOUT_S, on_line=on_line)
    assert result.ok, _logs(result)
    return out, result, progress


def test_sweep_measures_every_op_and_size(sweep: tuple[Path, launch.RunResult, list[dict]]) -> None:
    out, _, _ = sweep
    meta, measurements = read_result(out)
    assert sorted((m.op, m.size_bytes) for m in measurements) == sorted((op, s) for op in OPS for s in SIZES)
    for m in measurements:
        assert (m.tier, m.group_size, m.time.repeats) == ("intra_node", 2, 3)
        assert m.time.median_s > 0 and m.algbw_GBps > 0
        assert m.algbw_GBps == pytest.approx(m.size_bytes / m.time.median_s / 1e9)
        assert m.busbw_GBps == pytest.approx(m.algbw_GBps * {"all_reduce": 1.0, "send_recv": 1.0}.get(m.op, 0.5))
    assert (meta["world_size"], meta["nnodes"], meta["backend"], meta["device_kind"]) == (2, 1, "gloo", "cpu")
    assert len(meta["hosts"]) == 2 and meta["torch_version"] and meta["nccl_version"] is None
    assert meta["settings"]["repeats"] == 3 and meta["settings"]["ops"] == list(OPS)


def test_sweep_measures_how_much_communication_hides_behind_compute(sweep) -> None:
    meta, _ = read_result(sweep[0])
    overlap = meta["overlap"]
    assert overlap["tier"] == "intra_node" and overlap["size_bytes"] == max(SIZES)  # below the 8 MiB default
    comm, compute, both = overlap["comm_s"], overlap["compute_s"], overlap["both_s"]
    assert min(comm, compute, both) > 0
    hidden = (comm + compute - both) / min(comm, compute)
    assert overlap["fraction"] == pytest.approx(min(1.0, max(0.0, hidden)))


def test_sweep_reports_progress_from_rank_0(sweep: tuple[Path, launch.RunResult, list[dict]]) -> None:
    _, _, progress = sweep
    total = len(OPS) * len(SIZES)
    assert [p["done"] for p in progress] == list(range(1, total + 1))
    assert {p["total"] for p in progress} == {total}
    assert progress[0] == {"done": 1, "total": total, "tier": "intra_node", "op": OPS[0], "size_bytes": SIZES[0]}


def test_bad_op_fails_the_launch_with_the_message(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    # Raw arguments, as a hand-written launch would pass them (sweep_command_args would refuse before launch).
    args = ("--out", str(tmp_path / "x.json"), "--ops", "all_reduce,bogus")
    spec = launch.LaunchSpec(nproc_per_node=2, module="profiler.collectives", args=args, log_dir=tmp_path / "logs")
    result = launch.run(spec, timeout_s=LAUNCH_TIMEOUT_S)
    assert not result.ok
    assert result.root_cause is not None, _logs(result)
    assert "ValueError: --ops: unknown op(s) 'bogus'" in result.root_cause.message
    assert not (tmp_path / "x.json").exists()
