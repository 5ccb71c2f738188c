"""A plan in one line: api/'s one place for it (the CLI's tables and headers, the validation's progress, report and
plot), to be swapped for the planner's own once it has one (planner/search/solve.py `_describe` is its third form)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from planner.specs import ParallelPlan


def describe_plan(plan: ParallelPlan, compact: bool = False) -> str:
    """Every field that matters, e.g. "dp16 tp8 pp8 cp1 · ZeRO-1 · mbs 1 · sp · selective recompute ·
    interleaved_1f1b v3"; `compact`, for progress bars and the validation's per-plan rows, only what varies among
    one machine's plans and nothing that does not apply, e.g. "dp2 tp1 pp2 zero1 mbs4 none sp 1f1b"."""
    return _compact(plan) if compact else _full(plan)


def _full(plan: ParallelPlan) -> str:
    degrees = f"dp{plan.dp} tp{plan.tp} pp{plan.pp} cp{plan.cp}"
    parts = [degrees, f"ZeRO-{plan.zero_stage}", f"mbs {plan.micro_batch_size}"]
    if plan.sequence_parallel:
        parts.append("sp")
    parts.append("no recompute" if plan.recompute == "none" else f"{plan.recompute} recompute")
    parts.append(plan.schedule + (f" v{plan.virtual_stages}" if plan.virtual_stages > 1 else ""))
    if plan.layers_per_stage is not None:
        parts.append("layers " + ",".join(str(n) for n in plan.layers_per_stage))
    return " · ".join(parts)


def _compact(plan: ParallelPlan) -> str:
    text = f"dp{plan.dp} tp{plan.tp} pp{plan.pp}"
    if plan.dp > 1:
        text += f" zero{plan.zero_stage}"
    text += f" mbs{plan.micro_batch_size} {plan.recompute}"
    if plan.sequence_parallel:
        text += " sp"
    if plan.pp > 1:
        text += f" {plan.schedule}" + (f" v{plan.virtual_stages}" if plan.virtual_stages > 1 else "")
    return text
