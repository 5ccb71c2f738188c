"""Every parallel layout the executor runs trains exactly like one process: same losses, same gradient norms.

Each case runs tests/distributed/parity_worker.py under torchrun (gloo on CPU) and compares its 4 losses and
clipped gradient norms with a plain single-process PyTorch run (fp32, SGD with momentum, which is
scale-sensitive). It also checks that each rank really holds only its share of the parameters. The selected cases
of one process count share a launch (one process group, a mesh per case): starting the processes and importing
torch, several seconds a launch on this 2-core box, is paid once per count rather than once per case.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

pytest.importorskip("torch")

from executor.support import require_executable  # noqa: E402
from planner.cost.params import expert_mlp_params  # noqa: E402
from planner.errors import InfeasiblePlanError  # noqa: E402
from planner.specs import ParallelPlan  # noqa: E402
from tests.distributed.parity_worker import MODELS, TRAINING  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
WORKER = "tests/distributed/parity_worker.py"
TOLERANCE = 1e-5
LAUNCH_TIMEOUT_S = 120


def _run_worker(command: list[str], out: Path, timeout_s: float = LAUNCH_TIMEOUT_S) -> tuple[dict, float]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    started = time.perf_counter()
    try:
        done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired as timeout:
        pytest.fail(f"{' '.join(command)} ran past {timeout_s} s:\n{timeout.stderr}")
    wall_s = time.perf_counter() - started
    if done.returncode != 0:
        pytest.fail(f"{' '.join(command)} exited {done.returncode}:\n{done.stdout[-4000:]}\n{done.stderr[-8000:]}")
    return json.loads(out.read_text()), wall_s


Case = tuple[str, ParallelPlan, int | None]  # model, plan, resume after this step (None: no checkpoint)


def launch_cases(cases: dict[str, Case], out: Path) -> tuple[dict[str, dict], float]:
    """Run every case, all plans of the same GPU count, in one torchrun launch with one process per GPU; refuse
    what the executor cannot run before any process starts. Results by case name, and the launch's wall time."""
    (world,) = {plan.num_gpus for _, plan, _ in cases.values()}
    for model, plan, _ in cases.values():
        require_executable(plan, MODELS[model], TRAINING)
    payload = [{"name": name, "model": model, "plan": plan.model_dump(mode="json"), "resume_after": resume_after}
               for name, (model, plan, resume_after) in cases.items()]  # fmt: skip
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={world}"]
    command += [WORKER, "--cases", json.dumps(payload), "--out", str(out)]
    return _run_worker(command, out, LAUNCH_TIMEOUT_S * len(cases))


def launch(model: str, plan: ParallelPlan, out: Path, resume_after: int | None = None) -> tuple[dict, float]:
    """One plan's run in a launch of its own. `resume_after`: go on from a checkpoint of that step, in a freshly
    built model."""
    results, wall_s = launch_cases({"run": (model, plan, resume_after)}, out)
    return results["run"], wall_s


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], dict]:
    """reference(model): the plain single-process run of that model, made once per module on first use."""
    folder = tmp_path_factory.mktemp("reference")
    runs: dict[str, dict] = {}

    def get(model: str) -> dict:
        if model not in runs:
            out = folder / f"{model}.json"
            runs[model], _ = _run_worker(
                [sys.executable, WORKER, "--reference", "--model", model, "--out", str(out)], out
            )
        return runs[model]

    return get


def _sharded_ways(plan: ParallelPlan) -> int:
    """Into how many pieces the plan splits the parameters (TP, PP and ZeRO >= 2 shard; ZeRO 0/1 replicate; ZeRO
    shards over dp x cp, cp ranks holding the same weights)."""
    return plan.tp * plan.pp * (plan.dp * plan.cp if plan.zero_stage >= 2 else 1)


def _expert_ways(plan: ParallelPlan) -> int:
    """Into how many pieces the plan splits the routed experts: ep splits them, ZeRO >= 2 shards each over its edp
    ranks, PP splits the layers."""
    return plan.pp * plan.ep * (plan.expert_data_parallel if plan.zero_stage >= 2 else 1)


def _expected_local_params(model: str, plan: ParallelPlan, full: int) -> float:
    spec = MODELS[model]
    experts = spec.num_layers * spec.num_experts * expert_mlp_params(spec).total if spec.num_experts > 1 else 0
    return (full - experts) / _sharded_ways(plan) + experts / _expert_ways(plan)


CASES = {
    "dp2-zero0-ddp": ("llama", ParallelPlan(dp=2, zero_stage=0)),
    "dp2-zero1-zero_redundancy_optimizer": ("llama", ParallelPlan(dp=2, zero_stage=1)),
    "dp2-zero2-fsdp2": ("llama", ParallelPlan(dp=2, zero_stage=2)),
    "dp2-zero3-fsdp2": ("llama", ParallelPlan(dp=2, zero_stage=3)),
    "tp2": ("llama", ParallelPlan(tp=2)),
    "tp2-sp": ("llama", ParallelPlan(tp=2, sequence_parallel=True)),
    "pp2-gpipe": ("llama", ParallelPlan(pp=2, schedule="gpipe", micro_batch_size=2)),
    "pp2-1f1b": ("llama", ParallelPlan(pp=2, schedule="1f1b", micro_batch_size=2)),
    "pp2-interleaved-v2": (
        "llama",
        ParallelPlan(pp=2, schedule="interleaved_1f1b", virtual_stages=2, micro_batch_size=2),
    ),
    "dp2xtp2-sp-zero3-fsdp2": ("llama", ParallelPlan(dp=2, tp=2, sequence_parallel=True, zero_stage=3)),
    "dp2xtp2-zero0-replicate": ("llama", ParallelPlan(dp=2, tp=2, zero_stage=0)),
    "pp2xdp2-1f1b-zero1": ("llama", ParallelPlan(pp=2, dp=2, schedule="1f1b", zero_stage=1)),
    "pp2xdp2-1f1b-zero2": ("llama", ParallelPlan(pp=2, dp=2, schedule="1f1b", zero_stage=2)),
    "pp2xtp2-sp-1f1b": (
        "llama",
        ParallelPlan(pp=2, tp=2, sequence_parallel=True, schedule="1f1b", micro_batch_size=2),
    ),
    "pp2xdp2xtp2-sp-1f1b-zero3": (
        "llama",
        ParallelPlan(pp=2, dp=2, tp=2, sequence_parallel=True, schedule="1f1b", zero_stage=3),
    ),
    # Context parallelism: ring attention over the zigzag split; cp ranks average their gradients with dp's.
    "cp2": ("llama", ParallelPlan(cp=2)),
    "cp4": ("llama", ParallelPlan(cp=4)),  # three hops: shards pass through ranks, dK/dV travel home through them
    "cp2xdp2-zero0-ddp": ("llama", ParallelPlan(dp=2, cp=2, zero_stage=0)),
    "cp2-zero1-zero_redundancy_optimizer": ("llama", ParallelPlan(cp=2, zero_stage=1)),
    "cp2xtp2-sp-zero0-replicate": ("llama", ParallelPlan(cp=2, tp=2, sequence_parallel=True)),
    "pp2xcp2-1f1b-recompute-selective": (
        "llama",
        ParallelPlan(pp=2, cp=2, schedule="1f1b", micro_batch_size=2, recompute="selective"),
    ),
    # learned positions at each cp rank's zigzag positions; FSDP2 sharding over dp x cp
    "gpt-cp2xdp2-zero3-fsdp2": ("gpt", ParallelPlan(cp=2, dp=2, zero_stage=3)),
    "recompute-selective": ("llama", ParallelPlan(recompute="selective")),
    "recompute-full": ("llama", ParallelPlan(recompute="full")),
    "tp2-sp-recompute-selective": ("llama", ParallelPlan(tp=2, sequence_parallel=True, recompute="selective")),
    "tp2-recompute-full": ("llama", ParallelPlan(tp=2, recompute="full")),
    # GPT-2 style: tied head re-tied after TP, learned positions under SP, GELU MLP without w3, biases, and an
    # odd vocabulary (255) that TP shards unevenly.
    "gpt-dp2xtp2-sp-zero3": ("gpt", ParallelPlan(dp=2, tp=2, sequence_parallel=True, zero_stage=3)),
    # Mixture of experts, drop-less top-2 routing: experts split over ep ranks, tokens carried by all-to-all, expert
    # gradients reduced over edp only. DDP skipping the experts (edp = 1); FSDP2 expert units on a 2-rank edp mesh.
    "mixtral-dp2xep2-zero0-ddp": ("mixtral", ParallelPlan(dp=2, ep=2)),  # also resumed from a checkpoint
    "mixtral-dp4xep2-zero2-fsdp2": ("mixtral", ParallelPlan(dp=4, ep=2, zero_stage=2)),  # also resumed
    # pipeline stages each with their MoE layers, and the per-sequence aux loss summed over cp ranks
    "mixtral-pp2xcp2xep2-1f1b-zero3": (
        "mixtral",
        ParallelPlan(pp=2, cp=2, ep=2, schedule="1f1b", micro_batch_size=2, zero_stage=3),
    ),
}
# Cases that save their state after step 2 and go on from the checkpoint in a freshly built model of other weights:
# the experts are saved by the ranks that hold them (each expert under its own name) and restored there.
RESUMED_MID_RUN = {"mixtral-dp2xep2-zero0-ddp", "mixtral-dp4xep2-zero2-fsdp2"}


@pytest.fixture(scope="module")
def case_run(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], dict]:
    """case_run(name): the result of CASES[name], launched on first use with every other selected case of its
    process count."""
    folder = tmp_path_factory.mktemp("cases")
    selected = [item.callspec.params["name"] for item in request.session.items
                if getattr(item, "function", None) is test_plan_trains_like_one_process]  # fmt: skip
    results: dict[str, dict] = {}
    failures: dict[str, str] = {}

    def get(name: str) -> dict:
        if name not in results and name not in failures:
            world = CASES[name][1].num_gpus
            batch = {other: (*CASES[other], 2 if other in RESUMED_MID_RUN else None)
                     for other in selected if CASES[other][1].num_gpus == world}  # fmt: skip
            try:
                found, wall_s = launch_cases(batch, folder / f"{world}-processes.json")
            except pytest.fail.Exception as failed:  # every case of the launch fails with its output
                failures.update(dict.fromkeys(batch, str(failed)))
            else:
                print(f"\nparity launch of {len(batch)} cases on {world} processes: wall {wall_s:.1f} s")
                results.update(found)
        if name in failures:
            pytest.fail(failures[name])
        return results[name]

    return get


@pytest.mark.parametrize("name", list(CASES))
def test_plan_trains_like_one_process(name: str, reference: Callable[[str], dict], case_run: Callable[[str], dict]):
    model, plan = CASES[name]
    expected = reference(model)
    result = case_run(name)
    loss_diff = max(abs(a - b) for a, b in zip(result["losses"], expected["losses"], strict=True))
    norm_diff = max(abs(a - b) for a, b in zip(result["grad_norms"], expected["grad_norms"], strict=True))
    print(f"\nparity {name}: {plan.num_gpus} processes, max |loss diff| {loss_diff:.1e}, "
          f"max |grad norm diff| {norm_diff:.1e}, worker {result['worker_s']:.1f} s")  # fmt: skip
    assert loss_diff <= TOLERANCE, (result["losses"], expected["losses"])
    assert norm_diff <= TOLERANCE, (result["grad_norms"], expected["grad_norms"])
    if MODELS[model].num_experts > 1:  # the load-balancing loss the step logs, averaged as one process has it
        aux_diff = max(abs(a - b) for a, b in zip(result["aux_losses"], expected["aux_losses"], strict=True))
        assert aux_diff <= TOLERANCE, (result["aux_losses"], expected["aux_losses"])
    (full,) = expected["local_params"]
    assert len(result["local_params"]) == plan.num_gpus
    # Each rank holds its share, plus the few parameters every layout replicates (norms, positions, row biases).
    assert max(result["local_params"]) <= 1.05 * _expected_local_params(model, plan, full), result["local_params"]
    # Gradients reach the optimizer reduced and in their parameters' layouts (after the last step's backward), so
    # the optimizer issues no collective but ZeRO-1's broadcasts of updated shares.
    assert result["misplaced_grads"] == [], result["misplaced_grads"]
    zero1_broadcasts = {"c10d.broadcast_"} if plan.zero_stage == 1 and plan.dp * plan.cp > 1 else set()
    assert set(result["optimizer_collectives"]) == zero1_broadcasts, result["optimizer_collectives"]


def test_an_unsupported_plan_is_refused_before_any_process_starts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_launch(*args: object, **kwargs: object) -> None:
        raise AssertionError("a process was started for a plan the executor cannot run")

    monkeypatch.setattr(subprocess, "run", no_launch)
    plan = ParallelPlan(pp=2, dp=2, schedule="gpipe", zero_stage=1)
    with pytest.raises(InfeasiblePlanError) as refused:
        launch("llama", plan, tmp_path / "never.json")
    assert refused.value.reason == "not_executable"
    assert [v.code for v in refused.value.violations] == ["executor_zero1_schedule"]


def test_an_expert_parallel_plan_at_zero1_is_refused_before_any_process_starts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_launch(*args: object, **kwargs: object) -> None:
        raise AssertionError("a process was started for a plan the executor cannot run")

    monkeypatch.setattr(subprocess, "run", no_launch)
    with pytest.raises(InfeasiblePlanError) as refused:
        launch("mixtral", ParallelPlan(dp=2, ep=2, zero_stage=1), tmp_path / "never.json")
    assert [(v.field, v.code) for v in refused.value.violations] == [("plan.zero_stage", "executor_ep_zero1")]
