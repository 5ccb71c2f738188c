"""CPU offload (plan.offload = "optimizer_and_params") trains exactly like the same plan without it.

The executor runs it as FSDP2 `fully_shard(..., offload_policy=CPUOffloadPolicy())` (executor/parallel/data.py).
On this CPU-only machine the "device" is the CPU, so the offload moves nothing: the weight shards, gradients and
optimizer state already live in host memory. The test still runs the policy's own code path under torchrun with
gloo (FSDP2 with an offload policy: host-side sharded parameters, the gradient copies it makes after each
reduce-scatter, the optimizer stepping the host shards) and checks that the losses and clipped gradient norms equal
the same plan without offload and a single process (fp32, 1e-5). Optimizer-only offload, which torch has no
feature for, is refused before any process starts.
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

pytest.importorskip("torch")

from planner.errors import InfeasiblePlanError  # noqa: E402
from planner.specs import ParallelPlan  # noqa: E402
from tests.distributed.test_parity import TOLERANCE, launch, launch_cases, reference  # noqa: E402, F401  (reference: a fixture)

CASES = {
    "dp2-zero3": ParallelPlan(dp=2, zero_stage=3),
    "dp1-zero3": ParallelPlan(dp=1, zero_stage=3),  # single-GPU offload: fully_shard over one rank
}


def _max_diff(first: list[float], second: list[float]) -> float:
    return max(abs(a - b) for a, b in zip(first, second, strict=True))


@pytest.mark.parametrize("name", list(CASES))
def test_offload_trains_like_the_plan_without_it(
    name: str,
    reference: Callable[[str], dict],  # noqa: F811  (the fixture imported above)
    tmp_path: Path,
) -> None:
    plan = CASES[name]
    offloaded = plan.model_copy(update={"offload": "optimizer_and_params"})
    both = {"offload": ("llama", offloaded, None), "plain": ("llama", plan, None)}
    runs, _ = launch_cases(both, tmp_path / "runs.json")  # one launch: the same processes run both
    with_offload, without = runs["offload"], runs["plain"]
    expected = reference("llama")
    for result in (without, expected):
        assert _max_diff(with_offload["losses"], result["losses"]) <= TOLERANCE, (with_offload, result)
        assert _max_diff(with_offload["grad_norms"], result["grad_norms"]) <= TOLERANCE, (with_offload, result)
    assert with_offload["misplaced_grads"] == [], with_offload["misplaced_grads"]
    assert with_offload["offload_policies"] == ["CPUOffloadPolicy"], with_offload["offload_policies"]
    assert "CPUOffloadPolicy" not in without["offload_policies"]


def test_optimizer_only_offload_is_refused_before_any_process_starts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_launch(*args: object, **kwargs: object) -> None:
        raise AssertionError("a process was started for a plan the executor cannot run")

    monkeypatch.setattr(subprocess, "run", no_launch)
    with pytest.raises(InfeasiblePlanError) as refused:
        launch("llama", ParallelPlan(dp=2, zero_stage=2, offload="optimizer"), tmp_path / "never.json")
    assert [v.code for v in refused.value.violations] == ["executor_optimizer_offload"]
    assert "CPUOffloadPolicy" in refused.value.violations[0].message
