"""How `estimate` and `plan` answer people: the request in a header, the estimate's headline, breakdown and memory
tables, and a search's ranked plans, why the winner wins and what was left out."""

from __future__ import annotations

from typing import TYPE_CHECKING

from rich.console import Console
from rich.table import Table

from api.cli.app import console as _console
from planner.describe import describe_plan
from planner.units import GiB

if TYPE_CHECKING:
    from planner.request import EstimateRequest, PlanRequest
    from planner.search.result import SearchResult
    from planner.specs import EstimateUncertainty, ModelSpec, StepEstimate


def print_report(request: EstimateRequest, result: StepEstimate) -> None:
    console = _console()
    console.print(_header(request), highlight=False)
    console.print()
    console.print(_headline(result))
    console.print()
    console.print(_breakdown_table(result))
    console.print(_memory_table(result))
    _print_fit(console, result)
    _print_offload(console, result)
    _print_bands(console, result.uncertainty)
    if result.assumptions:
        console.print("\n[bold]Assumptions[/bold]")
        for note in result.assumptions:
            console.print(f"  - {note}", markup=False, highlight=False)


def _header(request: EstimateRequest | PlanRequest) -> str:
    from planner.cost.params import model_params

    model, cluster, training = request.model, request.cluster, request.training
    nodes = f"{cluster.num_nodes} node{'s' if cluster.num_nodes > 1 else ''}"
    gpus = f"{cluster.num_gpus} × {cluster.gpu.name} ({nodes} × {cluster.gpus_per_node})"
    # A GPU without bf16 (V100) is costed in fp16 unless told otherwise: say why the precision is not the usual bf16.
    precision = training.precision if cluster.gpu.supports("bf16") else f"{training.precision} (no bf16 on this GPU)"
    setup = (
        f"seq {training.seq_len} · global batch {training.global_batch_size} · {precision} · "
        f"{training.optimizer} · {training.attention_kernel} attention"
    )
    lines = [f"[bold]{_model_name(model)}[/bold] · {format_count(model_params(model))} params · {gpus}", setup]
    plan = getattr(request, "plan", None)  # a search request has none
    if plan is not None:
        lines.append(f"plan: {describe_plan(plan)}")
    return "\n".join(lines)


def _model_name(model: ModelSpec) -> str:
    from rich.markup import escape

    return escape(model.name or "custom model")


def _headline(result: StepEstimate) -> Table:
    table = Table.grid(padding=(0, 3))
    table.add_column(style="bold")
    table.add_column(justify="right")
    table.add_column()
    rows = [
        ("Step time", format_seconds(result.step_time_s), step_time_band(result.uncertainty)),
        ("Tokens/s", f"{result.tokens_per_s:,.0f}"),
        ("Tokens/s per GPU", f"{result.tokens_per_s_per_gpu:,.1f}"),
        ("Model TFLOP/s per GPU", f"{result.model_tflops_per_gpu:.1f}"),
        ("MFU", f"{result.mfu:.1%}"),
        ("HFU", f"{result.hfu:.1%}"),
        ("Micro-batches", str(result.num_microbatches)),
    ]
    for row in rows:
        table.add_row(*row)
    return table


def step_time_band(band: EstimateUncertainty) -> str:
    """The step time's error band as the headline shows it, next to the step time."""
    if band.step_time_low_s is None or band.step_time_high_s is None:
        return "no error band (see Error bands)"
    return (
        f"{band.coverage:.0%} band {format_seconds(band.step_time_low_s)} – {format_seconds(band.step_time_high_s)} "
        f"({_ratio_range(band.step_time_low_ratio, band.step_time_high_ratio)}, {band.step_time_runs} runs)"
    )


def _ratio_range(low: float | None, high: float | None) -> str:
    assert low is not None and high is not None  # a band has both ends
    return f"{low - 1:+.1%} / {high - 1:+.1%}"


def _print_bands(console: Console, band: EstimateUncertainty) -> None:
    """Where the error bands come from: comparable validated runs of the estimate's regime and scale."""
    fitted = f"; fitted {band.fitted}" if band.fitted else ""
    console.print(f"\n[bold]Error bands[/bold] (regime {band.regime}, {band.scale}{fitted})", highlight=False)
    console.print(f"  - step time: {band.step_time_basis}", markup=False, highlight=False)
    memory = band.peak_memory_basis
    if band.peak_bytes_low is not None and band.peak_bytes_high is not None:
        memory += (
            f": peak {band.peak_bytes_low / GiB:.2f} to {band.peak_bytes_high / GiB:.2f} GiB "
            f"({_ratio_range(band.peak_bytes_low_ratio, band.peak_bytes_high_ratio)})"
        )
    console.print(f"  - peak memory: {memory}", markup=False, highlight=False)


def term_label(term: str) -> str:
    """How a reader sees a breakdown term: its description in the contract (planner/specs/estimate.py)."""
    from planner.specs import TimeBreakdown

    field = TimeBreakdown.model_fields.get(term)
    return field.description if field is not None and field.description else term


def _breakdown_table(result: StepEstimate) -> Table:
    table = Table(title="Step time breakdown", title_justify="left")
    table.add_column("term")
    table.add_column("seconds", justify="right")
    table.add_column("% of step", justify="right")
    table.add_column("from")
    step = result.step_time_s
    for term, seconds in result.breakdown.model_dump().items():
        source = result.sources.get(term, "analytic")
        table.add_row(term_label(term), f"{seconds:.4f}", f"{seconds / step:.1%}", source)
    table.add_row("[bold]total[/bold]", f"{step:.4f}", "100.0%", "")
    return table


def _memory_table(result: StepEstimate) -> Table:
    memory = result.memory
    table = Table(title="Memory per GPU, by pipeline stage (GiB)", title_justify="left")
    for column in ("stage", "layers", "params", "grads", "optimizer", "activations", "other", "total", "capacity"):
        table.add_column(column, justify="right")
    table.add_column("status")
    for stage in memory.by_stage:
        amounts = (stage.params_bytes, stage.grads_bytes, stage.optimizer_bytes, stage.activations_bytes,
                   stage.other_bytes, stage.total_bytes, stage.capacity_bytes)  # fmt: skip
        status = f"[red]over by {stage.over_bytes / GiB:.2f}[/red]" if stage.over_bytes > 0 else "fits"
        label = f"{stage.stage}*" if stage.stage == memory.peak_stage else str(stage.stage)
        table.add_row(label, str(stage.layers), *(f"{amount / GiB:.2f}" for amount in amounts), status)
    table.caption = "* peak stage"
    return table


def _print_fit(console: Console, result: StepEstimate) -> None:
    memory = result.memory
    peak = f"peak {memory.peak_bytes / GiB:.2f} GiB on stage {memory.peak_stage}"
    peak += f" of {memory.capacity_bytes / GiB:.2f} GiB"
    if result.fits:
        console.print(f"[bold green]FITS[/bold green]: {peak}")
        return
    console.print(f"[bold red]DOES NOT FIT[/bold red]: {peak}")
    for reason in result.why_not_fits:
        console.print(f"  - {reason}", markup=False, highlight=False)


def _print_offload(console: Console, result: StepEstimate) -> None:
    """CPU offload's host memory, PCIe traffic and CPU step (planner/cost/offload.py), when the plan offloads."""
    traffic, memory = result.offload, result.memory
    if traffic is None:
        return
    capacity = "unknown" if memory.host_capacity_bytes is None else f"{memory.host_capacity_bytes / 1e12:.2f} TB"
    console.print(f"\n[bold]CPU offload[/bold] ({traffic.offload})", highlight=False)
    lines = [
        f"host memory per node: {memory.host_bytes_per_node / 1e12:.2f} TB of {capacity}",
        f"PCIe per GPU and step at {traffic.host_link_GBps:.0f} GB/s: "
        f"device->host {traffic.device_to_host_bytes / 1e9:.1f} GB ({format_seconds(traffic.device_to_host_s)}), "
        f"host->device {traffic.host_to_device_bytes / 1e9:.1f} GB ({format_seconds(traffic.host_to_device_s)}); "
        f"exposed {format_seconds(traffic.exposed_s)}",
        f"CPU optimizer step: {format_seconds(traffic.cpu_optimizer_s)}",
    ]
    for line in lines:
        console.print(f"  - {line}", markup=False, highlight=False)


def format_seconds(seconds: float) -> str:
    return f"{seconds:.3f} s" if seconds >= 1 else f"{seconds * 1e3:.1f} ms"


def format_count(count: float) -> str:
    """Parameter counts as people quote them: 174.6B, 8.0B, 124.4M."""
    for scale, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if count >= scale:
            return f"{count / scale:.1f}{suffix}"
    return str(int(count))


def print_search(request: PlanRequest, result: SearchResult) -> None:
    console = _console()
    console.print(_header(request), highlight=False)
    console.print()
    if result.found:
        console.print(_ranked_table(result))
        _print_explanation(console, result)
    elif result.closest:
        console.print(
            f"[bold red]NO PLAN FITS[/bold red] under {result.memory_limit_bytes / GiB:.2f} GiB per GPU "
            f"({_limit_source(result)}){_host_limit(result)}. The closest candidates:"
        )
        console.print(_closest_table(result))
    else:
        console.print("[bold red]NO VALID PLAN[/bold red]: every layout breaks a rule (see what was left out).")
    for note in result.notes:
        console.print(f"  - {note}", markup=False, highlight=False)
    _print_counts(console, result)


def _limit_source(result: SearchResult) -> str:
    limit = "search.max_memory_fraction x GPU memory"
    if result.memory_safety_factor > 1:
        limit += f" / {result.memory_safety_factor:.3f}, the upper memory band (search.memory_safety)"
    return limit


def _ranked_table(result: SearchResult) -> Table:
    from planner.search.rank import LAYOUT_TIE_TOLERANCE

    times = [ranked.estimate.step_time_s for ranked in result.plans]
    tie_broken = any(later < earlier for earlier, later in zip(times, times[1:], strict=False))
    caption = (
        f"step times within {LAYOUT_TIE_TOLERANCE:.0%} are a tie: the layout with fewer model-parallel axes "
        "(then smaller cp, tp, pp) ranks first"
    )
    table = Table(
        title="Fastest plans that fit", title_justify="left", caption=caption if tie_broken else None,
        caption_justify="left",
    )  # fmt: skip
    for column in ("#", "plan", "step", "tokens/s", "MFU", "peak GiB"):
        table.add_column(column, justify="left" if column == "plan" else "right")
    for ranked in result.plans:
        est = ranked.estimate
        table.add_row(
            str(ranked.rank),
            describe_plan(ranked.plan),
            format_seconds(est.step_time_s),
            f"{est.tokens_per_s:,.0f}",
            f"{est.mfu:.1%}",
            f"{est.memory.peak_bytes / GiB:.2f}",
        )
    return table


def _closest_table(result: SearchResult) -> Table:
    table = Table()
    for column in ("plan", "step", "peak GiB", "over GiB", "on stage", "host over TB"):
        table.add_column(column, justify="left" if column == "plan" else "right")
    for near in result.closest:
        table.add_row(
            describe_plan(near.plan),
            format_seconds(near.estimate.step_time_s),
            f"{near.estimate.memory.peak_bytes / GiB:.2f}",
            f"{near.over_bytes / GiB:.2f}",
            str(near.over_stage),
            f"{near.over_host_bytes / 1e12:.2f}" if near.over_host_bytes > 0 else "-",
        )
    return table


def _print_explanation(console: Console, result: SearchResult) -> None:
    explanation = result.explanation
    assert explanation is not None  # a search that found plans explains the winner
    console.print("[bold]Why this plan[/bold]")
    for line in explanation.summary:
        console.print(f"  - {line}", markup=False, highlight=False)
    for row in explanation.versus_runner_up[:4]:
        verb = "saves" if row.difference_s > 0 else "costs"
        console.print(
            f"    {verb} {abs(row.difference_s):.3f} s of {term_label(row.term)} "
            f"({row.winner_s:.3f} s vs {row.runner_up_s:.3f} s)",
            highlight=False,
        )
    console.print(f"  - binding constraint: {explanation.binding_constraint}", markup=False, highlight=False)


def _print_counts(console: Console, result: SearchResult) -> None:
    counts, timing = result.counts, result.timing
    console.print(
        f"\n{counts.enumerated:,} candidates from {counts.layouts} layouts; {counts.evaluated:,} costed "
        f"({counts.fits:,} fit, {counts.out_of_memory:,} out of memory{_over_band(counts.over_memory_band)}"
        f"{_over_host(counts.over_host_memory)}), "
        f"{counts.pruned_by_bound:,} pruned by the "
        f"bound, {counts.partitioned} re-split by the ILP; {timing.total_s:.2f} s "
        f"({timing.candidates_per_s:,.0f} candidates/s)",
        highlight=False,
    )
    if result.rejected:
        console.print("[bold]Left out[/bold]")
        for rejection in result.rejected[:8]:
            console.print(
                f"  {rejection.count:>10,} {rejection.level}s  {rejection.code}: {rejection.example}",
                markup=False,
                highlight=False,
            )


def _over_host(count: int) -> str:
    return f", {count:,} over a node's host memory" if count else ""


def _host_limit(result: SearchResult) -> str:
    """The host-memory limit, when CPU offload candidates ran into it."""
    if not result.counts.over_host_memory:
        return ""
    capacity = next((c.estimate.memory.host_capacity_bytes for c in result.closest), None)
    return f" and, offloading, {capacity / 1e12:.2f} TB of host memory per node" if capacity else ""


def _over_band(count: int) -> str:
    return f", {count:,} over it at the upper memory band" if count else ""
