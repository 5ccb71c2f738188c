"""`paraplan validate` end to end, as a real process: a profile of this CPU, real training runs under torchrun with
gloo (2 ranks), the report and plot, the calibrated profile, and the measured runs in a real SQLite database.

A tiny model and three plans keep it to about a minute on a 2-core box; the figures of a real validation (90 plans)
are in benchmarks/results/2026-12-04-cpu-closed-loop-s16.md.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("torch")

from api.store import ApiStore  # noqa: E402
from executor.launch import descendant_pids  # noqa: E402
from planner.cost.step import estimate_step  # noqa: E402
from planner.profiles import load_profile_json  # noqa: E402
from planner.request import parse_estimate_request, profile_costs  # noqa: E402
from planner.specs import HardwareProfile  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
# A profile of the default model (`paraplan validate`'s), and a small space of it that runs in seconds a plan.
FIXTURE_PROFILE = REPO / "tests" / "unit" / "fixtures" / "validation" / "cpu-profile.json"
FIXTURE_SPACE = ["--mbs", "4", "--recompute", "none", "--zero", "0", "--schedule", "1f1b", "--steps", "3",
                 "--warm-steps", "1"]  # fmt: skip
TINY_MODEL = {"name": "llama3-8b", "num_layers": 2, "hidden_size": 64, "num_attention_heads": 4, "num_kv_heads": 2,
              "ffn_hidden_size": 128, "vocab_size": 256}  # fmt: skip
# Four plans (dp2, tp2 with and without sequence parallelism, pp2 1f1b) at micro-batch 2; three are run.
SMALL_SPACE = ["--model", json.dumps(TINY_MODEL), "--seq-len", "32", "--global-batch", "4", "--mbs", "2",
               "--recompute", "none", "--zero", "0", "--schedule", "1f1b", "--max-plans", "3"]  # fmt: skip
# A profile of TINY_MODEL in SMALL_SPACE's shapes (the first validation of its test, measured on this 2-core box).
TINY_PROFILE = REPO / "tests" / "unit" / "fixtures" / "validation" / "tiny-cpu-profile.json"


def paraplan(*args: str, data_dir: Path, timeout_s: float = 300) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PARAPLAN_DATA_DIR": str(data_dir)}
    env.pop("PARAPLAN_DATABASE_URL", None)
    return subprocess.run([sys.executable, "-m", "api.cli", *args], capture_output=True, text=True, env=env,
                          cwd=REPO, timeout=timeout_s)  # fmt: skip


def test_validate_profiles_runs_compares_and_calibrates(tmp_path: Path):
    out, data_dir = tmp_path / "validation", tmp_path / "data"
    done = paraplan("validate", "--nproc", "2", *SMALL_SPACE, "--steps", "4", "--warm-steps", "1", "--passes", "2",
                    "--confirm", "1", "--out", str(out), "--json", data_dir=data_dir)  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    assert figures["plans"] == figures["measured"] == 3 and figures["failed"] == [] and not figures["paired"]
    # Every plan ran twice, its time pooling both runs' 3 steady steps; then the finalists (the plans predicted and
    # measured fastest) once more, until the fastest was one of them.
    records = json.loads((out / "runs.json").read_text())
    finalists = [i for i, run in enumerate(records) if run["confirm_runs"]]
    assert 1 <= len(finalists) <= 3 and all(records[i]["confirm_runs"] == 1 for i in finalists)
    swept = [f"00{i}-pass{k}" for i in range(3) for k in (1, 2)]
    assert sorted(p.name for p in (out / "runs").iterdir()) == sorted(swept + [f"00{i}-confirm1" for i in finalists])
    assert [len(run["step_times_s"]) for run in records] == [9 if i in finalists else 6 for i in range(3)]
    ran = [run for run in records if run["measured_s"]]
    assert min(ran, key=lambda run: run["estimate"]["step_time_s"])["confirm_runs"] == 1
    assert min(ran, key=lambda run: run["measured_s"])["confirm_runs"] == 1
    for name in ("mape", "kendall_tau", "regret"):
        assert isinstance(figures[name], float) and isinstance(figures["calibrated"][name], float)
    assert figures["mape"] >= 0 and figures["regret"] >= 0 and -1 <= figures["kendall_tau"] <= 1

    report = (out / "report.md").read_text()
    assert "| step-time MAPE |" in report and report.count("| dp") + report.count("| tp") >= 1
    assert "| step spread |" in report and "Step spread:" in report
    assert "each plan trained 4 steps 2 times (in alternating order)" in report
    assert "Finalists (the plans predicted and measured fastest) ran again after the sweep" in report
    assert "s with 1 run more" in report
    assert "Layers timed on all 2 ranks at once took" in report
    assert "Each meeting of the ranks (a collective all must reach) cost a wait" in report
    assert (out / "validation.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    measured = load_profile_json(out / "profile.json")
    assert measured.calibration is None and measured.collective_fits and measured.layers
    # One profile pass before each pass of runs, the two pooled.
    assert len(measured.settings["pooled_from"]) == 2
    # Layers and the optimizer timed alone, on 2 tp ranks, and on both ranks at once (loaded).
    assert {(m.tp, m.tp_collectives, m.concurrent_ranks) for m in measured.layers} == {
        (1, False, 1),
        (2, False, 1),
        (2, True, 2),
        (1, False, 2),
    }
    assert sorted((o.concurrent_ranks, o.sharded) for o in measured.optimizer) == [(1, False), (2, False), (2, True)]
    assert [(w.micro_batch_size, w.concurrent_ranks) for w in measured.meeting_waits] == [(2, 2)]
    calibrated = load_profile_json(out / "calibrated-profile.json")
    assert calibrated.calibration is not None and calibrated.calibration.num_runs == 3

    store = ApiStore(f"sqlite:///{data_dir / 'paraplan.db'}")
    try:
        runs = store.measured_runs(limit=10)
        assert len(runs) == 3 and len({run.validation_id for run in runs}) == 1
        assert all(run.measured_step_time_s > 0 and run.predicted_step_time_s > 0 for run in runs)
        assert store.profiles.get(figures["calibrated_profile"]).calibration == calibrated.calibration
    finally:
        store.close()

    # The stored calibrated profile is what estimates then read, by its id.
    request = json.loads(runs[0].request)
    request["cluster"]["profile"] = figures["calibrated_profile"]
    (tmp_path / "request.json").write_text(json.dumps(request))
    done = paraplan("estimate", str(tmp_path / "request.json"), "--json", data_dir=data_dir, timeout_s=60)
    assert done.returncode == 0, done.stdout + done.stderr
    estimate = json.loads(done.stdout)
    assert estimate["sources"]["compute_s"] == "profile"
    assert any("calibrated on 3 measured runs" in note for note in estimate["assumptions"]), estimate["assumptions"]
    assert estimate["step_time_s"] != pytest.approx(runs[0].predicted_step_time_s, rel=1e-6)

    # The same runs compared again (--runs): nothing is profiled or run, and with the same profile and cost model
    # the predictions, and so the figures before calibration, are the same.
    again = tmp_path / "again"
    done = paraplan("validate", "--nproc", "2", *SMALL_SPACE, "--steps", "4", "--warm-steps", "1", "--passes", "2",
                    "--runs", str(out / "runs.json"), "--no-store", "--out", str(again), "--json",
                    data_dir=data_dir, timeout_s=120)  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    compared = json.loads(done.stdout.strip().splitlines()[-1])
    assert {k: compared[k] for k in ("mape", "kendall_tau", "regret", "measured")} == {
        k: figures[k] for k in ("mape", "kendall_tau", "regret", "measured")
    }
    assert not (again / "runs").exists() and (again / "report.md").exists()
    steps = [[run["step_times_s"] for run in json.loads((o / "runs.json").read_text())] for o in (out, again)]
    assert steps[0] == steps[1]
    # Flags that describe another validation are refused, naming the run that does not match.
    other = [*SMALL_SPACE]
    other[other.index("--seq-len") + 1] = "64"
    done = paraplan("validate", "--nproc", "2", *other, "--steps", "4", "--warm-steps", "1", "--runs",
                    str(out / "runs.json"), "--no-store", "--out", str(tmp_path / "other"), data_dir=data_dir,
                    timeout_s=60)  # fmt: skip
    assert done.returncode == 1
    assert "--runs:" in done.stdout + done.stderr and "trained another training" in done.stdout + done.stderr
    assert "Traceback" not in done.stdout + done.stderr
    # So is another count of passes, from which the report counts each plan's runs in the sweep.
    done = paraplan("validate", "--nproc", "2", *SMALL_SPACE, "--steps", "4", "--warm-steps", "1", "--passes", "1",
                    "--runs", str(out / "runs.json"), "--no-store", "--out", str(tmp_path / "once"),
                    data_dir=data_dir, timeout_s=60)  # fmt: skip
    assert done.returncode == 1
    assert "was made with passes 2, not --passes 1" in done.stdout + done.stderr, done.stdout + done.stderr


def test_validate_runs_the_technique_entries_and_calibrates_on_them(tmp_path: Path):
    """`--techniques all`: a cp, an fp16, an offload and an ep entry join the search space's plans, each trained
    under torchrun, predicted (fp16 and ep from their own layers' profile) and stored like the plans."""
    out, data_dir = tmp_path / "validation", tmp_path / "data"
    # The tiny model, whose fp16 layers take milliseconds even on a CPU (the default model's fp16 backward is ~20x its
    # fp32 one here), with a profile of it: only the fp16 and ep entries' own layers are measured.
    done = paraplan("validate", "--nproc", "2", *SMALL_SPACE, "--max-plans", "2", "--steps", "3", "--warm-steps",
                    "1", "--confirm", "0", "--techniques", "all", "--profile", str(TINY_PROFILE), "--out", str(out),
                    "--json", data_dir=data_dir, timeout_s=480)  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    ran = {entry["technique"]: entry for entry in figures["techniques"]}
    left_out = {entry["technique"]: entry["reason"] for entry in figures["left_out"]}
    assert set(ran) | set(left_out) == {"cp", "fp16", "offload", "ep"} and {"cp", "offload", "ep"} <= set(ran)
    assert figures["plans"] == figures["measured"] == 2 + len(ran) and figures["failed"] == []
    assert all(entry["measured_s"] > 0 and entry["predicted_s"] > 0 for entry in ran.values())
    assert ran["cp"]["plan"]["cp"] == 2 and ran["ep"]["plan"]["ep"] == 2
    assert ran["offload"]["plan"]["offload"] != "none"
    records = {run["technique"]: run for run in json.loads((out / "runs.json").read_text())}
    assert records["ep"]["request"]["model"]["num_experts"] > 1
    if "fp16" in ran:
        assert records["fp16"]["request"]["training"]["precision"] == "fp16"
        fp16_profile = load_profile_json(Path(records["fp16"]["profile_file"]))
        assert {m.dtype for m in fp16_profile.layers} == {"fp16"}
    else:  # this machine cannot run or profile fp16: the reason is printed
        assert left_out["fp16"] in done.stderr
    # The entries flow into the same calibration and the same stored runs as the search space's plans.
    calibrated = load_profile_json(out / "calibrated-profile.json")
    assert calibrated.calibration is not None and calibrated.calibration.num_runs == figures["measured"]
    report = (out / "report.md").read_text()
    assert "## Technique entries" in report and "[ep entry]" in report and "4 experts top-2" in report
    store = ApiStore(f"sqlite:///{data_dir / 'paraplan.db'}")
    try:
        stored = [json.loads(run.request) for run in store.measured_runs(limit=20)]
    finally:
        store.close()
    assert len(stored) == figures["measured"]
    assert sum(request["plan"]["cp"] == 2 for request in stored) == 1
    assert sum(request["plan"]["ep"] == 2 for request in stored) == 1

    # Compared again (--runs): each entry is checked against, and predicted from, its own setup and profile.
    done = paraplan("validate", "--nproc", "2", *SMALL_SPACE, "--max-plans", "2", "--steps", "3", "--warm-steps",
                    "1", "--techniques", "all", "--runs", str(out / "runs.json"), "--no-store", "--out",
                    str(tmp_path / "again"), "--json", data_dir=data_dir, timeout_s=120)  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    again = json.loads(done.stdout.strip().splitlines()[-1])
    assert {k: again[k] for k in ("mape", "kendall_tau", "measured")} == {
        k: figures[k] for k in ("mape", "kendall_tau", "measured")
    }


def test_a_stopped_validation_keeps_the_runs_it_measured(tmp_path: Path):
    out, data_dir = tmp_path / "validation", tmp_path / "data"
    env = {**os.environ, "PARAPLAN_DATA_DIR": str(data_dir)}
    # The default model with a profile of it: nothing is profiled, the runs start at once.
    command = [sys.executable, "-m", "api.cli", "validate", "--nproc", "2", *FIXTURE_SPACE, "--max-plans", "3",
               "--passes", "2", "--profile", str(FIXTURE_PROFILE), "--no-store", "--out", str(out)]  # fmt: skip
    validation = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                                  cwd=REPO)  # fmt: skip
    try:
        deadline = time.monotonic() + 240
        while not (out / "runs.json").exists() and validation.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        validation.send_signal(signal.SIGTERM)  # as Ctrl-C would, after the first run and before the last
        output, _ = validation.communicate(timeout=120)
    finally:
        validation.kill()
    assert validation.returncode == 130, output
    assert f"the runs measured so far are in {out / 'runs.json'}" in " ".join(output.split()), output
    kept = json.loads((out / "runs.json").read_text())
    assert 1 <= len(kept) < 3 or len(kept[-1]["step_times_s"]) < 4  # not every run of both passes
    assert all(run["measured_s"] > 0 and run["request"]["plan"] == run["plan"] for run in kept)


def test_a_run_killed_by_a_signal_runs_once_more_and_is_measured(tmp_path: Path):
    """A rank that dies by a signal (here SIGKILL, sent as the run steps; in s16, glibc aborting a gloo rank) is a
    crash, not the plan's failure: the run is made again in `<folder>-again`, and the crash reported."""
    out = tmp_path / "validation"
    env = {**os.environ, "PARAPLAN_DATA_DIR": str(tmp_path / "data")}
    space = [*FIXTURE_SPACE, "--steps", "12", "--max-plans", "2"]  # the later --steps wins: long enough to kill
    command = [sys.executable, "-m", "api.cli", "validate", "--nproc", "2", *space, "--confirm", "0",
               "--profile", str(FIXTURE_PROFILE), "--no-store", "--out", str(out), "--json"]  # fmt: skip
    validation = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                                  cwd=REPO)  # fmt: skip
    try:
        kill_a_rank_once_it_steps(validation, out / "runs" / "000" / "metrics.jsonl")
        stdout, stderr = validation.communicate(timeout=240)
    finally:
        validation.kill()
    assert validation.returncode == 0, stdout + stderr
    figures = json.loads(stdout.strip().splitlines()[-1])
    assert figures["measured"] == 2 and figures["failed"] == []
    (crash,) = figures["crashed_once"]
    assert "SIGKILL" in crash["error"], crash
    killed, other = json.loads((out / "runs.json").read_text())
    assert killed["run_dir"] == str(out / "runs" / "000-again") and killed["crash"] == crash["error"]
    assert len(killed["step_times_s"]) == 11 and killed["measured_s"] > 0  # the second run's steps after the first
    assert other["run_dir"] == str(out / "runs" / "001") and other["crash"] is None
    report = (out / "report.md").read_text()
    assert "## Runs that crashed and ran again" in report and crash["error"] in report


def kill_a_rank_once_it_steps(validation: subprocess.Popen[str], metrics: Path) -> None:
    """SIGKILL one training rank of `validation` once its run has logged a step in `metrics`."""
    deadline = time.monotonic() + 180
    while not (metrics.exists() and metrics.read_text().strip()):
        assert validation.poll() is None, f"the validation exited {validation.returncode} before its first step"
        assert time.monotonic() < deadline, f"no step logged in {metrics}"
        time.sleep(0.05)
    ranks = [pid for pid in descendant_pids(validation.pid) if b"executor.train" in command_line(pid)]
    assert ranks, "no training rank found"
    os.kill(ranks[-1], signal.SIGKILL)


def command_line(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:  # it exited while we looked
        return b""


def test_a_paired_validation_predicts_each_run_from_a_profile_measured_just_before_it(tmp_path: Path):
    out = tmp_path / "validation"
    # The tiny model (dp2 and tp2 with sequence parallelism) with its profile: each plan's shapes are profiled again
    # in seconds, where the default model's took 20-35 s a plan on a 2-core box and asserted nothing more.
    space = [*SMALL_SPACE, "--max-plans", "2", "--steps", "3", "--warm-steps", "1"]
    done = paraplan("validate", "--nproc", "2", *space, "--paired", "--confirm", "0", "--profile", str(TINY_PROFILE),
                    "--no-store", "--out", str(out), "--json", data_dir=tmp_path / "data")  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    assert figures["measured"] == 2 and figures["paired"]
    validation_profile = load_profile_json(out / "profile.json")
    for run in json.loads((out / "runs.json").read_text()):
        assert run["profile_file"] == str(Path(run["run_dir"]) / "profile.json")
        own = load_profile_json(Path(run["profile_file"]))
        # The validation's profile with this plan's shapes measured again, on both ranks, before the run started.
        assert own.settings["overlaid_with"] > validation_profile.created
        assert own.collective_fits == validation_profile.collective_fits
        remeasured = [m for m in own.layers if m not in validation_profile.layers]
        assert (1, 2) in {(m.tp, m.concurrent_ranks) for m in remeasured if m.layer == "block"}  # loaded blocks
        assert run["estimate"]["step_time_s"] == pytest.approx(estimate_from(own, run["request"]))
    assert "Paired: each plan's layer shapes were profiled again just before its run" in (out / "report.md").read_text()
    # Compared again (--runs), each run is still predicted from its own profile: the same figures.
    done = paraplan("validate", "--nproc", "2", *space, "--runs", str(out / "runs.json"), "--no-store", "--out",
                    str(tmp_path / "again"), "--json", data_dir=tmp_path / "data", timeout_s=120)  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    again = json.loads(done.stdout.strip().splitlines()[-1])
    assert again["paired"] and {k: again[k] for k in ("mape", "kendall_tau", "regret")} == {
        k: figures[k] for k in ("mape", "kendall_tau", "regret")
    }


def estimate_from(profile: HardwareProfile, request: dict[str, Any]) -> float:
    req = parse_estimate_request(request)
    measured = profile_costs(req.cluster, profile)
    return estimate_step(req.model, req.training, req.cluster, req.plan, measured=measured).step_time_s


def test_validate_names_the_flag_at_fault(tmp_path: Path):
    done = paraplan("validate", "--nproc", "2", "--steps", "3", "--warm-steps", "3", "--out", str(tmp_path / "v"),
                    data_dir=tmp_path / "data", timeout_s=60)  # fmt: skip
    assert done.returncode == 1
    assert "--warm-steps" in done.stdout + done.stderr
    done = paraplan("validate", "--nproc", "2", "--mbs", "3", "--out", str(tmp_path / "v"), data_dir=tmp_path / "data",
                    timeout_s=60)  # fmt: skip
    assert done.returncode == 1
    assert "validating needs two" in done.stdout + done.stderr and "Traceback" not in done.stdout + done.stderr
    done = paraplan("validate", "--nproc", "2", "--paired", "--passes", "2", "--out", str(tmp_path / "v"),
                    data_dir=tmp_path / "data", timeout_s=60)  # fmt: skip
    assert done.returncode == 1
    assert "--paired: each plan runs once" in done.stdout + done.stderr and "Traceback" not in done.stdout + done.stderr
