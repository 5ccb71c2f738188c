"""What a validation runs: its setup (model, batch, ranks, how long each plan runs) and the plans it picks."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from api.commands.defaults import DEFAULT_STEPS
from executor.data import SHIPPED_TEXT
from executor.support import executor_violations
from planner.cost.step import estimate_step
from planner.request import parse_estimate_request, parse_plan_request, profile_costs
from planner.search.space import search_space
from planner.specs import HardwareProfile, ModelSpec, ParallelPlan, SearchOptions


class ValidationStopped(RuntimeError):
    """Ctrl-C, SIGTERM or a cancelled job stopped the validation; what ran so far is kept in its folder."""


DEFAULT_DATA = SHIPPED_TEXT  # the executor's shipped text: a path that does not depend on where this module sits


@dataclass(frozen=True)
class ValidationSetup:
    """What to validate: the model and batch, on `nproc` local ranks of `device`, and how long to run each plan."""

    model: ModelSpec
    seq_len: int
    global_batch_size: int
    nproc: int
    out: Path
    device: str = "cpu"
    gpu: str = "cpu"  # the cluster's GPU preset; `cpu` for CPU ranks
    steps: int = DEFAULT_STEPS
    warm_steps: int = 4  # left out of the median: lazy initialisation and the allocator settle in the first steps
    search: SearchOptions = field(default_factory=SearchOptions)
    max_plans: int | None = None
    data: Path = DEFAULT_DATA
    threads: int = 1  # torch threads per rank, in the profile and the runs alike (a profile holds for one count)
    # Times every plan is run, each pass in the opposite order of the one before, its steady steps pooled, and a
    # profile pass measured before each: a machine whose speed drifts over the validation's minutes then weighs on
    # every plan, and on the profile, alike (see `run_all`, `_profile_and_run`).
    passes: int = 1
    # Each plan's layer shapes profiled again just before its run, and the run predicted from that profile (the
    # collectives from the validation's): the error then measures the cost model, not how far the machine's speed
    # drifted between the profile and the run (`run_all`). One pass only: the pass is the pairing.
    paired: bool = False
    # Runs more of each finalist (the plans predicted and measured fastest) after the sweep, pooled with its first
    # (`confirm_finalists`): the top-1 regret is then taken between times the machine would repeat.
    confirm: int = 3
    # The training precision; None: the device's own (fp32 on a CPU, bf16 on a GPU). A technique entry's setup sets
    # it (the fp16 entry, api/commands/loop/techniques.py); the validation's own plans run at the device's.
    precision: str | None = None
    # The techniques whose entries join the search space's plans (api/commands/loop/techniques.py TECHNIQUES), each
    # where this machine can run and profile it.
    techniques: tuple[str, ...] = ()

    @property
    def training_precision(self) -> str:
        """The precision the setup's runs train at, and its profile times layers at."""
        return self.precision or ("fp32" if self.device == "cpu" else "bf16")

    def request(self, plan: ParallelPlan | None = None) -> dict[str, Any]:
        """The contract request of this setup, with `plan` when given."""
        request: dict[str, Any] = {
            "model": self.model.model_dump(mode="json", exclude_unset=True),
            "training": {"seq_len": self.seq_len, "global_batch_size": self.global_batch_size,
                         "precision": self.training_precision},
            "cluster": {"gpu": self.gpu, "num_nodes": 1, "gpus_per_node": self.nproc},
        }  # fmt: skip
        if plan is not None:
            request["plan"] = plan.model_dump(mode="json")
        return request


def valid_plans(setup: ValidationSetup) -> list[ParallelPlan]:
    """Every plan of the search space that the executor runs, in the search space's order; with `max_plans`, that
    many spread evenly over the list (so every layout keeps some)."""
    req = parse_plan_request({**setup.request(), "search": setup.search.model_dump(mode="json")})
    candidates, _ = search_space(req.model, req.training, req.cluster, req.search)
    plans = [candidates.plan(row, setup.search.overlap_grad_reduce) for row in range(len(candidates))]
    runnable = [plan for plan in plans if not executor_violations(plan, req.model, req.training) and _profiled(plan)]
    if setup.max_plans is None or len(runnable) <= setup.max_plans:
        return runnable
    picks = np.linspace(0, len(runnable) - 1, setup.max_plans).round().astype(int)
    return [runnable[i] for i in sorted(set(picks.tolist()))]


def _profiled(plan: ParallelPlan) -> bool:
    """Whether the search space's plan is one the sweep takes. Not for context parallelism: the profiler times
    blocks with SDPA over the whole sequence, while a cp rank's block runs the executor's ring attention
    (executor/parallel/context.py) on s/cp queries against all s keys, which the cost model derives from the
    whole-sequence block (planner/cost/context.py); a sweep of every cp plan would weigh that one derivation as
    many times as it has cp plans. The cp technique entry (api/commands/loop/techniques.py) runs one."""
    return plan.cp == 1


def profile_needs(plans: list[ParallelPlan]) -> dict[str, list]:
    """The layer shapes the plans' estimates look up: micro-batch sizes, tp degrees and recompute modes."""
    return {
        "micro_batch_sizes": sorted({p.micro_batch_size for p in plans}),
        "tps": sorted({p.tp for p in plans}),
        "recompute_modes": sorted({p.recompute for p in plans}, key=["none", "selective", "full"].index),
        "sequence_parallel": sorted({p.sequence_parallel for p in plans if p.tp > 1}) or [False],
    }


def estimate_of(setup: ValidationSetup, plan: ParallelPlan, profile: HardwareProfile) -> dict[str, Any]:
    """The uncalibrated estimate of `plan` from `profile`, as JSON."""
    req = parse_estimate_request(setup.request(plan))
    measured = profile_costs(req.cluster, profile, req.model)
    return estimate_step(req.model, req.training, req.cluster, req.plan, measured=measured).model_dump(mode="json")
