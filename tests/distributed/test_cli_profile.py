"""`paraplan profile compute|comm|all` and `--profile` on `estimate` / `plan`, run as real processes: the profiler on
this machine's CPU, the collective sweep under real torchrun with gloo (2 processes), profiles stored in a real
SQLite database under the test's temporary folder (PARAPLAN_DATA_DIR, set in each subprocess's environment).

The expensive runs (one compute profile, one collective sweep) are module fixtures that several tests share.

Two departures from the obvious settings keep the file reliable on a small, busy CI box (2 cores):
- the compute profiles run with `--threads 1`: with torch's default of one thread per core, a second process on the
  box makes OpenMP's spinning threads collide and layer times swing by 100x (and the run takes twice as long);
- the collective sweeps go up to 16 MiB, not 64 KiB: over gloo between 1 and 64 KiB the times are all latency and
  scheduler noise, and the alpha-beta fit then often refuses them ("the fitted bandwidth is not positive"). 4 MiB
  was not enough on a CI box whose gloo moved 4 MiB in less than its scheduler's delays.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from planner.cost.params import model_params  # noqa: E402
from planner.profiles import load_profile_json  # noqa: E402
from planner.specs import HardwareProfile  # noqa: E402
from profiler.store import DATABASE_FILE_NAME, ProfileStore  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
TIMEOUT_S = 240

TINY_MODEL = {"name": "llama3-8b", "num_layers": 2, "hidden_size": 64, "num_attention_heads": 4, "num_kv_heads": 2,
              "ffn_hidden_size": 128, "vocab_size": 256}  # fmt: skip
MODEL_FLAG = json.dumps(TINY_MODEL)
# Shared by every compute profile here (see the module docstring for --threads 1).
COMPUTE_FLAGS = ["--model", MODEL_FLAG, "--seq-len", "32", "--warmup", "1", "--repeats", "2", "--threads", "1"]

COMM_MAX_BYTES = 16 * 2**20  # see the module docstring
COMM_SIZES = [1024 * 2**k for k in range(15)]  # 1 KiB .. 16 MiB, doubling
ALL_OPS = {
    "all_reduce",
    "all_gather",
    "reduce_scatter",
    "all_to_all",
    "send_recv",
    "fsdp_all_gather",
    "fsdp_reduce_scatter",
}

STORED_ID = re.compile(r"stored as id ([0-9a-f]{32})\b")


# ---------------------------------------------------------------------------------------------------- helpers


def paraplan(*args: object, data_dir: Path) -> subprocess.CompletedProcess[str]:
    """`paraplan ARGS` as a program, with its database in `data_dir` (and no other database configured)."""
    env = {name: value for name, value in os.environ.items() if name != "PARAPLAN_DATABASE_URL"}
    env["PARAPLAN_DATA_DIR"] = str(data_dir)
    command = [sys.executable, "-m", "api.cli", *(str(arg) for arg in args)]
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)


def output(done: subprocess.CompletedProcess[str]) -> str:
    return f"exit {done.returncode}\n--- stdout\n{done.stdout[-6000:]}\n--- stderr\n{done.stderr[-6000:]}"


def database_url(data_dir: Path) -> str:
    return f"sqlite:///{data_dir / DATABASE_FILE_NAME}"


def stored_ids(data_dir: Path) -> list[str]:
    with ProfileStore(database_url(data_dir)) as store:
        return [summary.id for summary in store.summaries()]


def names_flag(text: str, flag: str) -> bool:
    """`flag` appears in `text` as itself: "--tp" is not named by "--tps", nor "--mbs" by "--mbs-max"."""
    return re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", text) is not None


def assert_refused(done: subprocess.CompletedProcess[str], *phrases: str) -> None:
    """Exit 1 with an error message, not a crash."""
    assert done.returncode == 1, output(done)
    assert "Traceback" not in done.stdout + done.stderr, output(done)
    assert done.stderr.startswith("error: "), output(done)
    for phrase in phrases:
        assert phrase in done.stderr, output(done)


def processes_naming(folder: Path) -> list[int]:
    """Live processes whose command line names `folder` (torchrun and its workers: their --out is in it)."""
    needle = str(folder).encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if needle in (entry / "cmdline").read_bytes():
                found.append(int(entry.name))
        except OSError:
            continue
    return found


@dataclass(frozen=True)
class Profiled:
    """A profile a `paraplan profile ...` run wrote (and stored, with its id)."""

    path: Path
    profile_id: str | None
    done: subprocess.CompletedProcess[str]

    @property
    def profile(self) -> HardwareProfile:
        return load_profile_json(self.path)


# ----------------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The database folder of the stored compute profile and collective sweep."""
    return tmp_path_factory.mktemp("data")


@pytest.fixture(scope="module")
def compute(tmp_path_factory: pytest.TempPathFactory, data_dir: Path) -> Profiled:
    out = tmp_path_factory.mktemp("compute") / "p.json"
    done = paraplan("profile", "compute", *COMPUTE_FLAGS, "--mbs", "1,2", "--recompute", "none,full", "--out", out,
                    data_dir=data_dir)  # fmt: skip
    assert done.returncode == 0, output(done)
    found = STORED_ID.search(done.stdout)
    assert found is not None, output(done)
    return Profiled(out, found.group(1), done)


@pytest.fixture(scope="module")
def comm(tmp_path_factory: pytest.TempPathFactory, data_dir: Path) -> Profiled:
    root = tmp_path_factory.mktemp("comm")
    out = root / "c.json"
    done = paraplan("profile", "comm", "--nproc", "2", "--min-bytes", "1024", "--max-bytes", COMM_MAX_BYTES,
                    "--ops", "all_reduce,send_recv", "--warmup", "1", "--repeats", "3", "--out", out,
                    data_dir=data_dir)  # fmt: skip
    assert done.returncode == 0, output(done)
    found = STORED_ID.search(done.stdout)
    assert found is not None, output(done)
    return Profiled(out, found.group(1), done)


# ------------------------------------------------------------------------------------------------ profile compute


@pytest.mark.slow
def test_profile_compute_writes_every_layer_and_the_optimizer(compute: Profiled) -> None:
    profile = compute.profile
    assert (profile.device_kind, profile.device_count, profile.cuda_version) == ("cpu", 1, None)
    assert profile.model is not None
    shape = ("num_layers", "hidden_size", "num_attention_heads", "num_kv_heads", "ffn_hidden_size", "vocab_size")
    assert {name: getattr(profile.model, name) for name in shape} == {name: TINY_MODEL[name] for name in shape}

    blocks = {(m.recompute, m.micro_batch_size): m for m in profile.layers if m.layer == "block"}
    assert sorted(blocks) == [("full", 1), ("full", 2), ("none", 1), ("none", 2)]
    for kind in ("embedding", "head"):
        assert sorted((m.micro_batch_size, m.recompute) for m in profile.layers if m.layer == kind) == [
            (1, "none"),
            (2, "none"),
        ]
    assert len(profile.layers) == 8
    for m in profile.layers:
        assert (m.tp, m.seq_len, m.dtype, m.peak_allocated_bytes) == (1, 32, "fp32", None)
        assert m.forward.median_s > 0 and m.backward.median_s > 0
        assert m.forward.repeats == m.backward.repeats == 2
    # What a block keeps for backward: full recompute keeps its input alone, far less than the whole graph, and
    # without recompute twice the sequences keep about twice the bytes.
    for mbs in (1, 2):
        assert 0 < blocks["full", mbs].saved_bytes < blocks["none", mbs].saved_bytes / 4
    assert blocks["none", 2].saved_bytes == pytest.approx(2 * blocks["none", 1].saved_bytes, rel=0.2)

    [optimizer] = profile.optimizer
    assert optimizer.optimizer == "adamw" and optimizer.num_params > 0 and optimizer.time.median_s > 0
    settings = profile.settings
    assert (settings["kind"], settings["threads"], settings["warmup"], settings["repeats"]) == ("compute", 1, 1, 2)
    assert (settings["micro_batch_sizes"], settings["recompute_modes"]) == ([1, 2], ["none", "full"])


@pytest.mark.slow
def test_profile_compute_prints_the_layer_table_and_stores_the_profile(compute: Profiled, data_dir: Path) -> None:
    out = compute.done.stdout
    assert "layer times on" in out and "fwd ms" in out and "saved MiB" in out, output(compute.done)
    assert len(re.findall(r"^\W*block\b", out, flags=re.MULTILINE)) == 4, out
    assert "adamw step:" in out and "ns per parameter" in out
    assert f"profile written to {compute.path} and stored as id {compute.profile_id}" in out
    assert f"plan with it: --profile {compute.profile_id}" in out

    assert compute.profile_id in stored_ids(data_dir)
    with ProfileStore(database_url(data_dir)) as store:
        assert store.get(compute.profile_id) == compute.profile


@pytest.mark.slow
def test_profile_compute_measures_the_model_asked_for(compute: Profiled) -> None:
    model = compute.profile.model
    assert model is not None
    assert model.head_dim == TINY_MODEL["hidden_size"] // TINY_MODEL["num_attention_heads"]


@pytest.mark.slow
def test_profile_compute_no_store_writes_the_file_and_no_database(tmp_path: Path) -> None:
    out, data = tmp_path / "p.json", tmp_path / "data"
    done = paraplan("profile", "compute", *COMPUTE_FLAGS, "--mbs", "1", "--recompute", "none", "--out", out,
                    "--no-store", data_dir=data)  # fmt: skip
    assert done.returncode == 0, output(done)
    assert [(m.layer, m.micro_batch_size) for m in load_profile_json(out).layers] == [
        ("block", 1),
        ("embedding", 1),
        ("head", 1),
    ]
    assert "stored as id" not in done.stdout
    assert f"profile written to {out}; plan with it: --profile {out}" in done.stdout
    assert not data.exists()


COMPUTE_REFUSALS = {
    "cuda-without-a-gpu": (["--device", "cuda"], "--device"),
    "bf16-on-cpu": (["--dtype", "bf16", "--device", "cpu"], "--dtype"),
    "mbs-not-a-number": (["--mbs", "x"], "--mbs"),
}
# api/commands/profile.py compute_sweep names a ComputeSweep violation with flag_name(field), which turns the sweep's
# field names into flags the command does not have: tps -> --tps, micro_batch_sizes -> --micro-batch-sizes, seq_lens ->
# --seq-lens, recompute_modes -> --recompute-modes.
# Refusals of settings whose ComputeSweep field is named differently from the flag: the flag is what is named.
COMPUTE_REFUSALS_NAMING_A_FIELD = {
    "tp-3-of-4-heads": (["--tp", "3"], "--tp"),
    "mbs-0": (["--mbs", "0"], "--mbs"),
    "seq-len-0": (["--seq-len", "0"], "--seq-len"),
    "unknown-recompute-mode": (["--recompute", "bogus"], "--recompute"),
}


def _refusal_cases() -> list[object]:
    cases: list[object] = []
    for case, (args, flag) in COMPUTE_REFUSALS.items():
        marks = []
        if case == "cuda-without-a-gpu":
            marks = [pytest.mark.slow, pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")]
        cases.append(pytest.param(args, flag, id=case, marks=marks))
    for case, (args, flag) in COMPUTE_REFUSALS_NAMING_A_FIELD.items():
        cases.append(pytest.param(args, flag, id=case))
    return cases


@pytest.mark.parametrize(("args", "flag"), _refusal_cases())
def test_profile_compute_refuses_bad_settings_naming_the_flag(tmp_path: Path, args: list[str], flag: str) -> None:
    out, data = tmp_path / "p.json", tmp_path / "data"
    done = paraplan("profile", "compute", *COMPUTE_FLAGS, "--out", out, *args, data_dir=data)  # the last value wins
    assert_refused(done)
    assert names_flag(done.stderr, flag), output(done)
    assert not out.exists() and not data.exists()
    assert sorted(tmp_path.iterdir()) == []


def test_profile_compute_refuses_a_tp_that_does_not_divide_the_heads(tmp_path: Path) -> None:
    # What the refusal says beyond the flag's name.
    done = paraplan("profile", "compute", *COMPUTE_FLAGS, "--tp", "3", "--out", tmp_path / "p.json",
                    data_dir=tmp_path / "data")  # fmt: skip
    assert_refused(done, "tp=3 does not divide num_attention_heads (4)")
    assert sorted(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------------- estimate / plan --profile

ESTIMATE_REQUEST = {
    "model": TINY_MODEL,
    "cluster": {"gpu": "cpu", "num_nodes": 1, "gpus_per_node": 1},
    "training": {"seq_len": 32, "global_batch_size": 4, "precision": "fp32"},
    "plan": {"micro_batch_size": 2, "recompute": "full"},
}


def request_file(folder: Path, profile: object = None) -> Path:
    request = json.loads(json.dumps(ESTIMATE_REQUEST))
    if profile is not None:
        request["cluster"]["profile"] = str(profile)
    path = folder / "request.json"
    path.write_text(json.dumps(request))
    return path


def estimate(request: Path, *flags: object, data_dir: Path) -> tuple[subprocess.CompletedProcess[str], dict]:
    done = paraplan("estimate", request, "--json", *flags, data_dir=data_dir)
    return done, json.loads(done.stdout) if done.stdout.strip() else {}


@pytest.mark.slow
def test_estimate_from_the_profile_file_uses_its_times(compute: Profiled, data_dir: Path, tmp_path: Path) -> None:
    done, result = estimate(request_file(tmp_path, compute.path), data_dir=data_dir)
    assert done.returncode == 0, output(done)
    assert result["sources"]["compute_s"] == "profile"
    assert result["sources"]["optimizer_s"] == "profile"
    # One stage, 2 micro-batches of 2 sequences: each runs the embedding, both blocks (full recompute) and the head.
    profile = compute.profile
    times = {(m.layer, m.recompute, m.micro_batch_size): m.forward.median_s + m.backward.median_s
             for m in profile.layers}  # fmt: skip
    per_microbatch = 2 * times["block", "full", 2] + times["embedding", "none", 2] + times["head", "none", 2]
    assert result["breakdown"]["compute_s"] == pytest.approx(2 * per_microbatch, rel=1e-6)
    [optimizer] = profile.optimizer
    assert profile.model is not None
    per_param = optimizer.time.median_s / optimizer.num_params
    assert result["breakdown"]["optimizer_s"] == pytest.approx(per_param * model_params(profile.model), rel=1e-6)

    analytic, without = estimate(request_file(tmp_path), data_dir=data_dir)
    assert analytic.returncode == 0, output(analytic)
    assert without["sources"]["compute_s"] == "analytic"


@pytest.mark.slow
def test_estimate_from_the_stored_id_matches_the_file(compute: Profiled, data_dir: Path, tmp_path: Path) -> None:
    by_id, from_id = estimate(request_file(tmp_path), "--profile", compute.profile_id, data_dir=data_dir)
    assert by_id.returncode == 0, output(by_id)
    by_path, from_path = estimate(request_file(tmp_path), "--profile", compute.path, data_dir=data_dir)
    assert by_path.returncode == 0, output(by_path)
    assert from_id["sources"]["compute_s"] == "profile"
    assert from_id == from_path


def test_estimate_with_a_missing_profile_is_a_bad_profile(tmp_path: Path) -> None:
    done, answer = estimate(request_file(tmp_path), "--profile", "/nonexistent.json", data_dir=tmp_path / "data")
    assert done.returncode == 1, output(done)
    error = answer["error"]
    assert error["kind"] == "bad_profile"
    assert "cluster.profile" in error["message"] and "/nonexistent.json" in error["message"]
    assert [field["field"] for field in error["fields"]] == ["cluster.profile"]
    assert not (tmp_path / "data").exists()  # resolving a reference creates no database


@pytest.mark.slow
def test_estimate_refuses_a_cpu_profile_for_a_gpu(compute: Profiled, data_dir: Path, tmp_path: Path) -> None:
    done, answer = estimate(request_file(tmp_path, compute.path), "--gpu", "h100-sxm", data_dir=data_dir)
    assert done.returncode == 1, output(done)
    error = answer["error"]
    assert error["kind"] == "bad_profile"
    assert "measured on cpu" in error["message"] and "h100-sxm" in error["message"]
    assert [field["field"] for field in error["fields"]] == ["cluster.profile"]


@pytest.mark.slow
def test_plan_with_a_profile_ranks_plans_from_its_times(compute: Profiled, data_dir: Path) -> None:
    done = paraplan("plan", "--model", MODEL_FLAG, "--gpu", "cpu", "--gpus-per-node", "1", "--seq-len", "32",
                    "--global-batch", "4", "--precision", "fp32", "--mbs", "2", "--recompute", "full",
                    "--profile", compute.profile_id, "--json", data_dir=data_dir)  # fmt: skip
    assert done.returncode == 0, output(done)
    plans = json.loads(done.stdout)["plans"]
    assert plans, done.stdout
    for ranked in plans:
        assert (ranked["plan"]["micro_batch_size"], ranked["plan"]["recompute"]) == (2, "full")
        assert ranked["estimate"]["sources"]["compute_s"] == "profile"


# --------------------------------------------------------------------------------------------------- profile comm


@pytest.mark.slow
def test_profile_comm_sweeps_each_op_and_fits_it(comm: Profiled, data_dir: Path) -> None:
    profile = comm.profile
    assert (profile.device_kind, profile.device_count, profile.nccl_version) == ("cpu", 2, None)
    assert profile.settings["backend"] == "gloo" and profile.settings["kind"] == "collectives"
    assert profile.layers == [] and profile.optimizer == []
    for op in ("all_reduce", "send_recv"):
        measured = [m for m in profile.collectives if m.op == op]
        assert sorted(m.size_bytes for m in measured) == COMM_SIZES
        for m in measured:
            assert (m.tier, m.group_size, m.time.repeats) == ("intra_node", 2, 3)
            assert m.time.median_s > 0 and m.busbw_GBps > 0
    assert {m.op for m in profile.collectives} == {"all_reduce", "send_recv"}
    assert [(f.op, f.tier, f.group_size) for f in profile.collective_fits] == [
        ("all_reduce", "intra_node", 2),
        ("send_recv", "intra_node", 2),
    ]
    for fit in profile.collective_fits:
        assert fit.bandwidth_GBps > 0 and fit.latency_s >= 0 and fit.num_samples == len(COMM_SIZES)

    out = comm.done.stdout
    assert "bus bandwidth, GB/s" in out and "all_reduce" in out and "send_recv" in out, output(comm.done)
    assert "4 MiB" in out and "busbw" in out and "log-R2" in out
    assert comm.path.with_name("c.sweep.json").is_file()
    assert comm.profile_id in stored_ids(data_dir)
    assert processes_naming(comm.path.parent) == []  # torchrun and its workers are gone


def test_profile_comm_refuses_one_rank_before_starting_anything(tmp_path: Path) -> None:
    done = paraplan("profile", "comm", "--nproc", "1", "--out", tmp_path / "c.json", data_dir=tmp_path / "data")
    assert_refused(done, "at least 2 ranks", "--nproc")
    assert "collectives" not in done.stdout  # no progress bar: no torchrun was started
    assert sorted(tmp_path.iterdir()) == []


def test_profile_comm_on_two_nodes_prints_each_nodes_command(tmp_path: Path) -> None:
    out = tmp_path / "c2.json"
    sweep = tmp_path / "c2.sweep.json"
    done = paraplan("profile", "comm", "--nproc", "2", "--nnodes", "2", "--rdzv-endpoint", "127.0.0.1:29555",
                    "--out", out, data_dir=tmp_path / "data")  # fmt: skip
    assert done.returncode == 0, output(done)
    commands = [line for line in done.stdout.splitlines() if "torch.distributed.run" in line]
    assert len(commands) == 2, done.stdout
    for node, command in enumerate(commands):
        for part in (f"--node-rank={node}", "--nnodes=2", "--nproc-per-node=2", "--rdzv-endpoint=127.0.0.1:29555",
                     "-m profiler.collectives", f"--out {sweep}"):  # fmt: skip
            assert part in command, command
    assert done.stdout.splitlines()[-1] == f"# then: paraplan profile comm --from-sweep {sweep} --out {out}"
    assert sorted(tmp_path.iterdir()) == []  # nothing written, no database


def test_profile_comm_on_two_nodes_needs_a_rendezvous_endpoint(tmp_path: Path) -> None:
    done = paraplan("profile", "comm", "--nproc", "2", "--nnodes", "2", "--out", tmp_path / "c2.json",
                    data_dir=tmp_path / "data")  # fmt: skip
    assert_refused(done, "--rdzv-endpoint")
    assert "torch.distributed.run" not in done.stdout
    assert sorted(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_profile_comm_from_sweep_rebuilds_the_profile(comm: Profiled, data_dir: Path) -> None:
    before = stored_ids(data_dir)
    out = comm.path.with_name("c3.json")
    done = paraplan("profile", "comm", "--from-sweep", comm.path.with_name("c.sweep.json"), "--out", out,
                    "--no-store", data_dir=data_dir)  # fmt: skip
    assert done.returncode == 0, output(done)
    rebuilt, original = load_profile_json(out), comm.profile
    assert rebuilt.collectives == original.collectives
    assert rebuilt.collective_fits == original.collective_fits
    assert (rebuilt.device_count, rebuilt.hosts, rebuilt.created) == (2, original.hosts, original.created)
    assert "bus bandwidth, GB/s" in done.stdout and "stored as id" not in done.stdout
    assert stored_ids(data_dir) == before  # --no-store: no row added


CRASHES_ON_VALUE_ERROR = (
    "api/commands/flags.py error_payload re-raises any ValueError it does not know; profile comm lets through the "
    "plain ValueErrors of profiler.collectives (read_result, SweepSettings) and profiler.fit (fit_all), so the user "
    "gets a traceback instead of an error line"
)


def test_profile_comm_from_a_missing_sweep_file_is_refused(tmp_path: Path) -> None:
    missing = tmp_path / "none.sweep.json"
    done = paraplan("profile", "comm", "--from-sweep", missing, "--out", tmp_path / "c.json", "--no-store",
                    data_dir=tmp_path / "data")  # fmt: skip
    assert_refused(done, str(missing))
    assert sorted(tmp_path.iterdir()) == []


def test_profile_comm_refuses_an_unknown_op(tmp_path: Path) -> None:
    done = paraplan("profile", "comm", "--ops", "all_reduce,bogus", "--out", tmp_path / "c.json",
                    data_dir=tmp_path / "data")  # fmt: skip
    assert_refused(done, "--ops", "bogus")
    assert sorted(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_profile_comm_from_a_sweep_that_cannot_be_fitted_is_refused(comm: Profiled, tmp_path: Path) -> None:
    # The real sweep with all_reduce's times made to halve as messages double, which no bandwidth explains.
    sweep = json.loads(comm.path.with_name("c.sweep.json").read_text())
    for row in sweep["measurements"]:
        if row["op"] == "all_reduce":
            row["time"]["median_s"] = 1e-3 * COMM_SIZES[0] / row["size_bytes"]
    bad = tmp_path / "bad.sweep.json"
    bad.write_text(json.dumps(sweep))
    done = paraplan("profile", "comm", "--from-sweep", bad, "--out", tmp_path / "c.json", "--no-store",
                    data_dir=tmp_path / "data")  # fmt: skip
    assert_refused(done, "bandwidth")
    assert sorted(tmp_path.iterdir()) == [bad]


# ---------------------------------------------------------------------------------------------------- profile all


@pytest.mark.slow
def test_profile_all_measures_layers_and_collectives_in_one_profile(tmp_path: Path) -> None:
    """Layers alone, on tp ranks and on both ranks busy; the optimizer alone, busy and on DTensor shards; the
    ranks' meeting wait; the collectives. Two passes: each times all three phases, and the passes are pooled."""
    out, data = tmp_path / "a.json", tmp_path / "data"
    done = paraplan("profile", "all", *COMPUTE_FLAGS, "--mbs", "1", "--recompute", "none", "--tp", "2", "--nproc",
                    "2", "--passes", "2", "--max-bytes", COMM_MAX_BYTES, "--out", out, "--no-store",
                    data_dir=data)  # fmt: skip
    assert done.returncode == 0, output(done)
    profile = load_profile_json(out)
    assert (profile.device_kind, profile.device_count) == ("cpu", 2)
    timed = {(m.layer, m.tp, m.tp_collectives, m.concurrent_ranks) for m in profile.layers}
    layers = ("block", "embedding", "head")
    alone = {(layer, tp, False, 1) for layer in layers for tp in (1, 2)}  # tp 1 added for the busy ranks
    assert timed == alone | {(layer, 2, True, 2) for layer in layers} | {(layer, 1, False, 2) for layer in layers}
    assert {(m.micro_batch_size, m.recompute) for m in profile.layers} == {(1, "none")}
    assert {(o.concurrent_ranks, o.sharded) for o in profile.optimizer} == {(1, False), (2, False), (2, True)}
    assert [(w.concurrent_ranks, w.micro_batch_size) for w in profile.meeting_waits] == [(2, 1)]
    assert "2 tp ranks" in done.stdout and "2 ranks busy" in done.stdout, output(done)
    assert {m.op for m in profile.collectives} == ALL_OPS
    assert {f.op for f in profile.collective_fits} == ALL_OPS and len(profile.collective_fits) == len(ALL_OPS)
    assert all(f.bandwidth_GBps > 0 and f.group_size == 2 for f in profile.collective_fits)
    assert 0 <= profile.comm_compute_overlap <= 1  # measured by the collectives worker, carried by the merge
    assert profile.settings["compute"]["kind"] == "compute"
    assert profile.settings["compute"]["passes"] == 2 and len(profile.settings["compute"]["pooled_from"]) == 2
    repeats = int(COMPUTE_FLAGS[COMPUTE_FLAGS.index("--repeats") + 1])
    assert {m.forward.repeats for m in profile.layers} == {2 * repeats}  # every phase in both passes
    assert done.stdout.count("layers on 2 loaded ranks") == 2, output(done)
    assert profile.settings["collectives"]["kind"] == "collectives"
    assert "layer times on" in done.stdout and "bus bandwidth, GB/s" in done.stdout, output(done)
    assert "stored as id" not in done.stdout
    assert not data.exists()  # --no-store
    assert out.with_name("a.sweep.json").is_file()
    assert processes_naming(tmp_path) == []
