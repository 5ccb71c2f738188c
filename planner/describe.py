"""A plan in one line, the way every front door prints it (the CLI's tables, the search's explanation, the
benchmarks; the validation's short labels). One copy, so a plan reads the same wherever it is named."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from planner.specs import ParallelPlan

SEPARATOR = " · "


def describe_plan(plan: ParallelPlan) -> str:
    """e.g. "dp16 tp8 pp8 cp1 · ZeRO-1 · mbs 1 · sp · selective recompute · interleaved_1f1b v3". Every degree
    is named, even at 1, so plans in a column line up; sequence parallelism and a layer split only when set."""
    parts = [
        f"dp{plan.dp} tp{plan.tp} pp{plan.pp} cp{plan.cp}",
        f"ZeRO-{plan.zero_stage}",
        f"mbs {plan.micro_batch_size}",
    ]
    if plan.sequence_parallel:
        parts.append("sp")
    parts.append("no recompute" if plan.recompute == "none" else f"{plan.recompute} recompute")
    parts.append(plan.schedule + (f" v{plan.virtual_stages}" if plan.virtual_stages > 1 else ""))
    if plan.layers_per_stage is not None:
        parts.append("layers " + ",".join(str(n) for n in plan.layers_per_stage))
    if plan.offload != "none":
        parts.append("offload " + plan.offload.replace("_", " "))
    return SEPARATOR.join(parts)


def describe_plan_compact(plan: ParallelPlan) -> str:
    """A short label for progress bars, the validation's per-plan rows and its plot's ticks, e.g.
    "dp2 tp1 pp2 zero1 mbs4 none sp 1f1b": only what varies among one machine's plans, nothing that does not
    apply (ZeRO without data parallelism, a schedule without a pipeline, cp or ep at 1)."""
    text = f"dp{plan.dp} tp{plan.tp} pp{plan.pp}" + (f" cp{plan.cp}" if plan.cp > 1 else "")
    text += f" ep{plan.ep}" if plan.ep > 1 else ""
    if plan.dp * plan.cp > 1:  # ZeRO shards over the dp x cp group
        text += f" zero{plan.zero_stage}"
    text += f" mbs{plan.micro_batch_size} {plan.recompute}"
    if plan.sequence_parallel:
        text += " sp"
    if plan.pp > 1:
        text += f" {plan.schedule}" + (f" v{plan.virtual_stages}" if plan.virtual_stages > 1 else "")
    if plan.offload != "none":
        text += f" offload-{plan.offload}"
    return text
