"""The technique entries of a validation's grid: one plan for each technique the search space's sweep leaves out
(context parallelism, fp16 with dynamic loss scaling, CPU offload, expert parallelism), each run and compared
like the search space's plans, where this machine can run and profile it.

Each entry is the data-parallel plan over every rank with one technique added:

- `cp`: cp=2 (dp = nproc / 2), ZeRO-0;
- `fp16`: the training precision fp16 (the executor's autocast and dynamic loss scaling, executor/precision.py);
- `offload`: ZeRO-3 with the weights, gradients and optimizer step on the host (FSDP2's CPUOffloadPolicy);
- `ep`: ep=2 over a mixture of experts: the validation's model with MOE_EXPERTS experts of its MLP's width, each
  token routed to MOE_TOP_K of them (Mixtral's top-2, Jiang et al. 2024 sec. 2.1), or the model itself when it is
  already one.

Whether this machine can run an entry is asked of the same checks every run passes: the planner's rules and the
executor's refusals (executor/support.py) for the entry's plan, model and training, and whether the profiler can
time its layers here (`ComputeSweep.violations`: bf16 only on a GPU, for one). An entry that fails one is left
out of the grid with the reason, which the progress prints and the report keeps.

An entry that trains another model or precision than the validation's (fp16, ep) has its own layers profiled
once, before the runs: a profile of that model at that precision, with the validation's collectives
(`EntryProfiles`); its runs are predicted from it and keep it in their folders, as a paired validation's do.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

from api.commands.defaults import ALL_TECHNIQUES
from api.commands.loop.setup import ValidationSetup, valid_plans
from executor.support import executor_violations
from planner.request import parse_estimate_request
from planner.rules import plan_violations
from planner.specs import HardwareProfile, ModelSpec, ParallelPlan

TECHNIQUES = ALL_TECHNIQUES  # spelled in api/commands/defaults.py, which the CLI imports at start-up
# The mixture of experts the ep entry trains when the validation's model is dense: Mixtral's routing (8 experts,
# top-2) with half the experts, so that ep=2 puts two experts on each rank and the model stays a few MB.
MOE_EXPERTS = 4
MOE_TOP_K = 2


@dataclass(frozen=True)
class Entry:
    """One plan of the grid and the setup it trains: the validation's own for the search space's plans, a
    technique's variant (its model, its precision) for a technique entry."""

    plan: ParallelPlan
    setup: ValidationSetup
    technique: str | None = None
    # The entry trains another model or precision than the validation's, whose profile then lacks its layers.
    own_layers: bool = False


@dataclass(frozen=True)
class Skipped:
    """A technique this machine cannot run here, and why."""

    technique: str
    reason: str


def grid(setup: ValidationSetup) -> tuple[list[Entry], list[Skipped]]:
    """Every entry a validation runs: the search space's plans the executor runs (`valid_plans`), then the
    technique entries this machine can run; and the techniques left out, with their reasons."""
    entries, skipped = technique_entries(setup)
    return [Entry(plan, setup) for plan in valid_plans(setup)] + entries, skipped


def technique_entries(setup: ValidationSetup) -> tuple[list[Entry], list[Skipped]]:
    """The entries of `setup.techniques` this machine can run, and the techniques left out with their reasons."""
    entries: list[Entry] = []
    skipped: list[Skipped] = []
    for technique in setup.techniques:
        entry_or_reason = _BUILDERS[technique](setup)
        reason = entry_or_reason if isinstance(entry_or_reason, str) else _refusal(entry_or_reason)
        if reason is None:
            entries.append(entry_or_reason)  # type: ignore[arg-type]
        else:
            skipped.append(Skipped(technique, reason))
    return entries, skipped


def entry_setup(setup: ValidationSetup, technique: str | None) -> ValidationSetup:
    """The setup a run of `technique`'s entry trains (the validation's own for None): what `--runs` checks an
    earlier run's request against."""
    if technique is None:
        return setup
    if technique not in _VARIANTS:
        raise ValueError(f"unknown technique {technique!r}; known: {', '.join(TECHNIQUES)}")
    return _VARIANTS[technique](setup)


def moe_model(model: ModelSpec) -> ModelSpec:
    """The ep entry's mixture of experts: `model` itself if it is one, else `model` with MOE_EXPERTS experts of its
    MLP's width and top-MOE_TOP_K routing."""
    if model.num_experts > 1:
        return model
    return model.model_copy(
        update={"name": f"{model.name}-moe{MOE_EXPERTS}", "num_experts": MOE_EXPERTS, "experts_per_token": MOE_TOP_K}
    )


def _same(setup: ValidationSetup) -> ValidationSetup:
    return replace(setup, techniques=())


def _fp16(setup: ValidationSetup) -> ValidationSetup:
    return replace(setup, techniques=(), precision="fp16")


def _moe(setup: ValidationSetup) -> ValidationSetup:
    return replace(setup, techniques=(), model=moe_model(setup.model))


_VARIANTS: dict[str, Callable[[ValidationSetup], ValidationSetup]] = {
    "cp": _same, "fp16": _fp16, "offload": _same, "ep": _moe,
}  # fmt: skip


def _data_parallel(setup: ValidationSetup, technique: str, **fields: object) -> Entry | str:
    """The entry of `technique`: the plan over every rank as data parallelism (less `cp`), with `fields`, at the
    largest micro-batch of the search's list that fills one replica's batch (the whole of it if none is listed),
    recompute the search's first mode; or why no such plan exists on `nproc` ranks."""
    variant = _VARIANTS[technique](setup)
    cp = int(fields.get("cp", 1))  # type: ignore[call-overload]
    if setup.nproc % cp:
        return f"cp={cp} needs an even number of ranks, not --nproc {setup.nproc}"
    dp = setup.nproc // cp
    per_replica, remainder = divmod(setup.global_batch_size, dp)
    fitting = [size for size in setup.search.micro_batch_sizes or (per_replica,) if per_replica % size == 0]
    if remainder or per_replica < 1 or not fitting:
        return f"global batch {setup.global_batch_size} does not split into equal micro-batches over dp={dp}"
    plan = ParallelPlan(dp=dp, micro_batch_size=max(fitting), recompute=setup.search.recompute[0], **fields)
    own_layers = (variant.model, variant.training_precision) != (setup.model, setup.training_precision)
    return Entry(plan, variant, technique, own_layers)


_BUILDERS: dict[str, Callable[[ValidationSetup], Entry | str]] = {
    "cp": lambda setup: _data_parallel(setup, "cp", cp=2, zero_stage=0),
    "fp16": lambda setup: _data_parallel(setup, "fp16", zero_stage=0),
    "offload": lambda setup: _data_parallel(setup, "offload", zero_stage=3, offload="optimizer_and_params"),
    "ep": lambda setup: _data_parallel(setup, "ep", ep=2, zero_stage=0),
}


def _refusal(entry: Entry) -> str | None:
    """Why this machine cannot run and profile `entry`, or None: the planner's rules, the executor's refusals, and
    the profiler's sweep of its layers (api/commands/loop/profile.py `layer_sweep`)."""
    from api.commands.loop.profile import layer_sweep

    try:
        request = parse_estimate_request(entry.setup.request(entry.plan))
    except ValueError as error:
        return str(error)
    found = plan_violations(request.plan, request.model, request.training, request.cluster)
    found += executor_violations(request.plan, request.model, request.training)
    if found:
        return "; ".join(str(violation) for violation in found)
    problems = layer_sweep(entry.setup, [entry.plan]).violations()
    if problems:
        return "the profiler cannot time its layers here: " + "; ".join(f"{f}: {why}" for f, why in problems)
    return None


def entry_profile(base: HardwareProfile, own_layers: HardwareProfile) -> HardwareProfile:
    """An entry's profile: the layers, optimizer steps and meeting waits measured for its model and precision,
    with the validation's collectives."""
    from api.commands.profile import merge

    return merge(own_layers, base)
